"""Prefill from fixed buffers (runner/prefill_graphs.py, the function a CUDA graph captures), run eagerly
on CPU: padded chunks, a tensor slot and start, Gated DeltaNet padding that leaves the state alone. Checked
against transformers (its forward's logits, its generate's tokens) and against the eager prefill's state."""
import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from conftest import make_image
from ds_qwen_vision.kernels.decode_attention import gather_kv
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.plan import StepPlan
from ds_qwen_vision.runner import ModelRunner
from ds_qwen_vision.runner.prefill_graphs import buckets
from driver import ReplayedGraph, drive, prefill_item

N = 8
PROMPTS = [
    ([{"role": "user", "content": "Hello there, how are you? Hello there, how are you?"}], []),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], [make_image(64, 48)]),
    ([{"role": "user", "content": "A different question, longer than the first one by far, with more words."}], []),
]


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    inputs, expected, last_logits = [], [], []
    for messages, images in PROMPTS:
        x = chat_inputs(processor, messages, images)
        with torch.inference_mode():
            out = reference.generate(**x, max_new_tokens=N, do_sample=False)
            last_logits.append(reference(**x).logits[0, -1])
        expected.append(out[0, x["input_ids"].shape[1]:].tolist())
        inputs.append(x)
    return inputs, expected, last_logits


def runner(ckpt, graph_tokens: int, **kw):
    model = load_model(ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=kw.get("speculative") is not None)
    return ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256, prefill_graph_tokens=graph_tokens, **kw)


@pytest.fixture(scope="module")
def static(tiny_ckpt):
    # buckets 16, 32, 64: every chunk below pads; a chunk while others decode rides in their forward
    return runner(tiny_ckpt, 64, mixed_prefill=True)


@pytest.fixture(scope="module")
def eager(tiny_ckpt):
    return runner(tiny_ckpt, 0)


def test_buckets():
    assert buckets(2048) == [16, 32, 64, 128, *range(256, 2049, 256)]
    assert buckets(64) == [16, 32, 64]
    assert buckets(1000)[-1] == 1024 and buckets(100) == [16, 32, 64, 128]


@pytest.mark.parametrize("chunk", [None, 7, 20])
def test_padded_chunks_match_transformers(setup, static, chunk):
    x, expected, last_logits = setup
    # 0 in slot 0; 1 (an image) joins at step 1; 2 joins at step 3 while the others decode; when 0 ends, 0
    # again takes its slot: a new sequence in a used row starts from zero state
    jobs = [(0, x[0]), (1, x[1]), (3, x[2]), (("after", 0), x[0])]
    assert drive(static, jobs, N, chunk=chunk) == [expected[i] for i in (0, 1, 2, 0)]
    # chunks that joined while others decoded rode in the decode rows' forward (prefill_graphs.mixed_forward)
    assert {c[0] for c in static.shapes if c[0].startswith("prefill")} >= {"prefill-graph", "prefill-graph-mixed"}
    static.reset()
    item, px = prefill_item(1, x[2])
    logits = static.run(StepPlan(prefill=[item]), px)[1]
    # relative to the logits' scale: the chunked delta rule's fp32 rounding (the eager prefill's is alike)
    assert (logits - last_logits[2]).abs().max() <= 1e-5 * last_logits[2].abs().max()
    static.reset()


def test_state_after_a_padded_chunk_is_the_eager_prefills(setup, static, eager):
    """KV of the prompt, conv window and recurrent state after chunks of 5 and 11 (padded to 16) equal the
    eager prefill's: padding positions leave the Gated DeltaNet state and the prompt's KV alone."""
    x, _, _ = setup
    for r in (static, eager):
        r.reset()
        for start, end in ((0, 5), (5, 16), (16, 27)):
            item, px = prefill_item(0, x[2], start, end)
            r.run(StepPlan(prefill=[item]), px)
    close = dict(rtol=1e-4, atol=1e-4)  # fp32 rounding; a padding position that moved the state: O(1)
    for layer in static.state.kv:
        for a, b in zip(static.state.kv[layer], eager.state.kv[layer]):  # slot 0's positions, through its table
            a, b = (gather_kv(pool, r.state.table[:1], r.state.block_size) for pool, r in ((a, static), (b, eager)))
            torch.testing.assert_close(a[0, :, :27], b[0, :, :27], **close)
    torch.testing.assert_close(static.state.conv_all[:, 0], eager.state.conv_all[:, 0], **close)
    torch.testing.assert_close(static.state.rec_all[:, 0], eager.state.rec_all[:, 0], **close)
    # rows of other slots are untouched
    assert static.state.rec_all[:, 1:].abs().max() == 0 and static.state.conv_all[:, 1:].abs().max() == 0
    static.reset()
    eager.reset()


def test_a_chunk_above_the_largest_bucket(setup, tiny_ckpt):
    """A chunk longer than the largest graph: below the runner's eager threshold (compiled_prefill_tokens) as
    replays of graph-sized pieces, the slot's state carried from piece to piece; from it eagerly. Both give
    transformers' tokens."""
    x, expected, _ = setup
    n = x[2]["input_ids"].shape[1]
    pieces = runner(tiny_ckpt, 16)
    assert n > 16 and pieces.prefill_graphs.split(n, pieces.compiled_prefill_tokens) == \
        [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert drive(pieces, [(0, x[2])], N, chunk=None) == [expected[2]]
    assert not any(c[0] == "prefill" for c in pieces.shapes)  # no eager forward
    eager = runner(tiny_ckpt, 16)
    eager.compiled_prefill_tokens = n  # a chunk of n tokens runs eagerly now
    assert eager.prefill_graphs.split(n, n) is None
    assert drive(eager, [(0, x[2])], N, chunk=None) == [expected[2]]
    assert any(c[0] == "prefill" for c in eager.shapes)
    assert eager.chunk_classes(0, 16) == {("prefill-graph", 16)}


def test_mtp_head_sees_the_real_tokens_hidden_states(setup, tiny_ckpt):
    """With MTP speculation the head's KV is built from the chunk's hidden states: with padded chunks the
    drafts, so the accepted counts, are the eager prefill's, and the tokens transformers'."""
    x, expected, _ = setup
    spec = {"method": "mtp", "num_tokens": 2}
    results = []
    for tokens in (64, 0):
        r = runner(tiny_ckpt, tokens, speculative=spec)
        stats = {}
        results.append((drive(r, [(0, x[0]), (1, x[1])], N, chunk=9, stats=stats), stats))
    (static_tokens, static_stats), (eager_tokens, eager_stats) = results
    assert static_tokens == eager_tokens == [expected[0], expected[1]]
    assert static_stats == eager_stats and static_stats["drafts"] > 0


def test_a_mixed_step_is_the_prefill_and_the_decode_step(setup, tiny_ckpt):
    """One forward carrying a slot's chunk and the other slots' decode tokens (prefill_graphs.mixed_forward)
    gives the logits of, and leaves every slot's state as, the chunk's prefill and then the decode step."""
    x, _, _ = setup
    mixed, separate = runner(tiny_ckpt, 64, mixed_prefill=True), runner(tiny_ckpt, 64)  # separate: the default
    for r in (mixed, separate):
        for slot, i in ((0, 0), (2, 1)):  # slots 0 and 2 hold prompts (one with an image) and decode
            item, px = prefill_item(slot, x[i])
            r.run(StepPlan(prefill=[item]), px)
    n = x[2]["input_ids"].shape[1]
    close = dict(rtol=1e-4, atol=1e-4)  # fp32 rounding of the same sums in other shapes
    for (start, end), tokens in (((0, 11), (5, 7)), ((11, n), (9, 4))):  # slot 1: a first chunk, then the rest
        item, px = prefill_item(1, x[2], start, end)
        plan = StepPlan(prefill=[item], decode=[(0, tokens[0]), (2, tokens[1])])
        assert mixed.mixed(plan) == 0 and separate.mixed(plan) is None
        got, want = (r.run(plan, px) for r in (mixed, separate))
        assert sorted(got) == sorted(want) == ([0, 1, 2] if end == n else [0, 2])
        for slot in want:
            torch.testing.assert_close(got[slot], want[slot], **close)
        assert mixed.length == separate.length
        for layer in mixed.state.kv:
            for a, b in zip(mixed.state.kv[layer], separate.state.kv[layer]):
                for slot, length in enumerate(mixed.length):
                    torch.testing.assert_close(a[slot, :, :length], b[slot, :, :length], **close)
        torch.testing.assert_close(mixed.state.conv_all, separate.state.conv_all, **close)
        torch.testing.assert_close(mixed.state.rec_all, separate.state.rec_all, **close)
    assert ("prefill-graph-mixed", 16) in mixed.shapes and ("prefill-graph-mixed", 64) in mixed.shapes


@pytest.mark.parametrize("speculative", [None, {"method": "mtp", "num_tokens": 2}])
def test_the_graph_capture_and_replay_plumbing(setup, tiny_ckpt, monkeypatch, speculative):
    """Every graph the runner captures (decode, prefill chunks, mixed steps, speculative verify) through
    runner/graphs.capture, replayed by a stand-in that reruns the captured function: the outputs each
    step reads are the captured ones, refilled, and the greedy tokens are transformers'."""
    from ds_qwen_vision.runner import graphs

    x, expected, _ = setup
    captured = []

    def fake_capture(fn, pool, warm_runs=1):
        for _ in range(warm_runs):
            fn()
        out = fn()
        captured.append(fn)
        return ReplayedGraph(fn, out), out

    monkeypatch.setattr(graphs, "capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    r = runner(tiny_ckpt, 64, mixed_prefill=True, speculative=speculative)
    r.capture()
    if r.spec is not None:
        r.spec.capture(r.pool)
    r.prefill_graphs.capture(r.pool)
    r.reset()
    sizes = len(r.batch_sizes)
    assert len(captured) == sizes * (2 if r.spec is not None else 1) + 3 + len(r.prefill_graphs.mixed)
    assert r.prefill_graphs.mixed == ([] if speculative else [16, 32, 64])
    jobs = [(0, x[0]), (1, x[1]), (3, x[2])]
    assert drive(r, jobs, N, chunk=20) == [expected[i] for i in (0, 1, 2)]
