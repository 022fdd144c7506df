"""The runner: batched decode over slot rows, chunked prefill, slots reused without leaking state;
every schedule gives the same greedy tokens as transformers' generate, one request at a time."""
import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from conftest import make_image
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.plan import Prefill, StepPlan
from ds_qwen_vision.runner import ModelRunner
from driver import drive

N = 10
PROMPTS = [
    ([{"role": "user", "content": "Hello there, how are you?"}], []),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], [make_image(64, 48)]),
    ([{"role": "user", "content": "A different question, longer than the first one by far, with more words."}], []),
    ([{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                                   {"type": "image"}]}], [make_image(32, 32, seed=3), make_image(48, 80, seed=4)]),
]


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=256)
    expected, inputs = [], []
    for messages, images in PROMPTS:
        x = chat_inputs(processor, messages, images)
        with torch.inference_mode():
            out = reference.generate(**x, max_new_tokens=N, do_sample=False)
        expected.append(out[0, x["input_ids"].shape[1]:].tolist())
        inputs.append(x)
    return runner, inputs, expected


def state_addresses(runner):
    return [t.data_ptr() for kv in runner.state.kv.values() for t in kv] + \
        [t.data_ptr() for t in (*runner.state.conv.values(), *runner.state.recurrent.values())]


def test_concurrent_sequences_match_transformers(setup):
    runner, x, expected = setup
    addresses = state_addresses(runner)
    # 0 in slot 0; 1 (an image) joins at step 2; 2 joins at step 4 and is prefilled 5 tokens a step while 0
    # and 1 decode around it; when 0 ends, 3 (two images) takes its slot (an idle row inside the decode batch
    # while it is prefilled), and 0 again takes 1's (no state may leak).
    jobs = [(0, x[0]), (2, x[1]), (4, x[2]), (("after", 0), x[3]), (("after", 1), x[0])]
    logits, plans = [], []
    got = drive(runner, jobs, N, chunk=5, logits=logits, plans=plans)
    assert got == [expected[i] for i in (0, 1, 2, 3, 0)]
    assert any(p.decode and max(s for s, _ in p.decode) >= len(p.decode) for p in plans)  # an idle row inside
    # Closer than tokens: each job's logits as when it runs alone (a leaked state moved them by 0.3 and flipped no token).
    for (_, xj), row in zip(jobs, logits):
        alone = []
        drive(runner, [(0, xj)], N, logits=alone)
        torch.testing.assert_close(row, alone[0], rtol=1e-3, atol=1e-3)
    assert state_addresses(runner) == addresses  # never reallocated


def test_chunked_prefill_and_one_at_a_time_match(setup):
    runner, x, expected = setup
    filler = {"input_ids": torch.tensor([[100]])}  # one token, one new token: holds a slot for one step
    for i in range(len(PROMPTS)):  # three fillers take slots 0-2, so this one decodes in slot 3: a batch of 4
        plans = []
        assert drive(runner, [(0, filler, 1)] * 3 + [(0, x[i])], N, chunk=7, plans=plans)[3] == expected[i]
        assert plans[-2].decode == [(3, -1)]
    # slot 0 every time, the previous sequence's state must not leak into the next one
    assert drive(runner, [(0, x[2]), (("after", 0), x[0]), (("after", 1), x[2])], N) == \
        [expected[2], expected[0], expected[2]]


def test_refusals(setup):
    runner, x, _ = setup
    with pytest.raises(ValueError, match="does not fit"):
        runner.run(StepPlan(prefill=[Prefill(0, [1] * 256)]))
    with pytest.raises(ValueError, match="does not continue"):
        runner.run(StepPlan(prefill=[Prefill(1, [1] * 20, start=10, end=20)]))


def test_compiled_norms_answer_the_same(setup, tiny_ckpt):
    """fuse=True (the CUDA default): torch.compile'd RMSNorms, decode batches of 1 and 2, chunked prefill."""
    _, x, expected = setup
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)  # compile patches modules
    runner = ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=256, fuse=True)
    assert drive(runner, [(0, x[0]), (1, x[1])], N, chunk=6) == expected[:2]


def test_prefill_runs_the_norms_eagerly(setup, tiny_ckpt):
    """The compiled RMSNorms serve the graph-replayed steps; a prefill forward runs no compiled code
    (model_runner.prefill: an eager prefill pays a compiled call's host time on every norm)."""
    from torch.profiler import profile

    _, x, expected = setup
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=256, fuse=True)

    def compiled_regions(plan):
        with profile() as p:
            out = runner.run(plan)
        return sum("Compiled" in e.name for e in p.events()), out

    prompt = x[0]["input_ids"][0].tolist()
    regions, logits = compiled_regions(StepPlan(prefill=[Prefill(0, prompt)]))
    assert regions == 0
    token = int(logits[0].argmax())
    assert token == expected[0][0]
    regions, _ = compiled_regions(StepPlan(decode=[(0, token)]))
    assert regions > 0  # a decode step runs the compiled ones
