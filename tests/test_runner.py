"""The runner's slots: static caches that live for the server's lifetime, reused without leaking state,
interleaved sequences (continuous batching) giving the same tokens as transformers' generate."""
import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from conftest import make_image
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.plan import Prefill, StepPlan
from ds_qwen_vision.runner import ModelRunner

N = 12
PROMPTS = [
    ([{"role": "user", "content": "Hello there, how are you?"}], []),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], [make_image(64, 48)]),
    ([{"role": "user", "content": "A different question, longer than the first one by far."}], []),
]


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    runner = ModelRunner(model, processor, torch.device("cpu"), max_slots=2, max_len=256)
    expected, inputs = [], []
    for messages, images in PROMPTS:
        x = chat_inputs(processor, messages, images)
        with torch.inference_mode():
            out = reference.generate(**x, max_new_tokens=N, do_sample=False)
        expected.append(out[0, x["input_ids"].shape[1]:].tolist())
        inputs.append((x["input_ids"][0].tolist(), images))
    return runner, inputs, expected


def test_interleaved_sequences_match_transformers_and_slots_are_reused(setup):
    runner, inputs, expected = setup
    # Sequence 0 in slot 0; sequence 1 joins slot 1 after 4 steps; when 0 ends, sequence 2 reuses slot 0
    # while 1 is still running: the static caches are never reallocated, only reset at prefill.
    addresses = [s.cache.layers[-1].keys.data_ptr() for s in runner.slots]
    got = {0: [], 1: [], 2: []}
    slot_of = {0: 0}
    logits = runner.run(StepPlan(prefill=[Prefill(0, *inputs[0])]))
    pending = {0: logits[0]}
    step = 0
    while pending:
        plan = StepPlan()
        for seq, row in list(pending.items()):
            token = int(torch.argmax(row))
            got[seq].append(token)
            if len(got[seq]) == N:
                del pending[seq]
                free = slot_of.pop(seq)
                if seq == 0:
                    slot_of[2] = free
                    plan.prefill.append(Prefill(free, *inputs[2]))
            else:
                plan.decode.append((slot_of[seq], token))
        if step == 4:
            slot_of[1] = 1
            plan.prefill.append(Prefill(1, *inputs[1]))
        step += 1
        out = runner.run(plan)
        by_slot = {slot: seq for seq, slot in slot_of.items()}
        pending = {by_slot[slot]: row for slot, row in out.items()}
    assert [got[i] for i in range(3)] == expected
    assert [s.cache.layers[-1].keys.data_ptr() for s in runner.slots] == addresses


def test_a_reused_slot_answers_like_a_fresh_one(setup):
    runner, inputs, expected = setup
    for prompt in (0, 2, 0):  # slot 0 every time: state of the previous sequence must not leak
        row = runner.run(StepPlan(prefill=[Prefill(0, *inputs[prompt])]))[0]
        tokens = []
        for _ in range(N):
            tokens.append(int(torch.argmax(row)))
            row = runner.run(StepPlan(decode=[(0, tokens[-1])]))[0]
        assert tokens == expected[prompt]
