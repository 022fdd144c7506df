"""Warm-up covers what the scheduler emits: after it, serving varied requests (text and image prompts,
chunked prefills, every decode batch size) meets no new shape class and compiles nothing new; it
leaves every slot clean; /health reports the start-up phases."""
from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
import time

import pytest
import torch
from conftest import OneRank, make_image

from ds_qwen_vision.config import CacheConfig, LimitsConfig, load_config_json
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.engine.warmup import warm_up
from ds_qwen_vision.model import load_model, load_processor
from ds_qwen_vision.runner import ModelRunner
from ds_qwen_vision.runner.warmup import GAP_MARGIN, gap_bound_reachable, prefill_budget


def request(text: str, images: list[bytes] = (), max_tokens: int = 6, temperature: float = 0.0) -> dict:
    content = [{"type": "image", "data_b64": base64.b64encode(b).decode()} for b in images]
    return {"messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}],
            "max_tokens": max_tokens, "temperature": temperature, "seed": 1, "chat_template_kwargs": {}}


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def warmed(tiny_ckpt):
    return _warm(tiny_ckpt)


@pytest.fixture(scope="module")
def warmed_graph_path(tiny_ckpt):
    """Prefill from the graphs' fixed buffers (run eagerly on CPU), chunks of up to 64 tokens with the
    decode rows in one forward (runner/prefill_graphs.py)."""
    return _warm(tiny_ckpt, prefill_graph_tokens=64, mixed_prefill=True)


def _warm(tiny_ckpt, **runner_kw):
    processor = load_processor(tiny_ckpt)
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    # fuse=True: the compiled RMSNorms (dynamo, dynamic shapes), whose compilations are counted below
    runner = ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=320, fuse=True, **runner_kw)
    limits = LimitsConfig(max_prompt_tokens=256, max_new_tokens=64, max_concurrent=4, prefill_chunk_tokens=16,
                          max_images_per_request=2)
    engine = Engine(runner, OneRank(), processor, limits)
    engine.phase = "warming_up"
    seen = []
    warm_up(engine, lambda msg: seen.append((msg, engine.health())))
    engine.heartbeat()
    engine.phase = "ready"
    return engine, seen


def test_warm_up_reports_its_phase_and_leaves_every_slot_clean(warmed):
    engine, seen = warmed
    assert seen and all(h["phase"] == "warming_up" and h["ready"] is False for _, h in seen)
    assert any("decode batch 4" in msg for msg, _ in seen)
    assert engine.health()["ready"] is True and engine.health()["phase"] == "ready"
    runner = engine.runner
    # KV blocks keep what warm-up wrote (no sequence reads a position it has not written); no slot holds a
    # block any more, and the GDN state is zero
    state = [runner.state.table, *runner.state.conv.values(), *runner.state.recurrent.values(), runner.next_tokens]
    assert all(not t.any() for t in state), "warm-up left state in a slot"
    assert runner.length == [0] * 4 and not runner.pending


@pytest.fixture(params=["warmed", "warmed_graph_path"])
def each_warmed(request):
    return request.param, request.getfixturevalue(request.param)


def test_after_warm_up_requests_meet_no_new_shape_and_no_compilation(each_warmed):
    setup, (engine, _) = each_warmed
    runner = engine.runner
    warm, graphs = set(runner.shapes), unique_graphs()
    assert graphs > 0  # the compiled norms were compiled (by warm-up): the count below means something
    assert {("decode", b) for b in runner.batch_sizes} <= warm
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    requests = [request(" ".join(words[:n])) for n in (1, 3, 7, 12)]
    requests += [request("Describe it.", [make_image(48, 32)]),
                 request("Compare", [make_image(32, 32, seed=3), make_image(80, 48, seed=4)], temperature=0.8),
                 request(" ".join(words * 6), max_tokens=3)]  # 72+ words: several chunks of 16
    results = [None] * len(requests)

    def client(i):
        results[i] = list(e for e in engine.generate(requests[i]) if e is not None)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for c in clients:
        c.start()
        time.sleep(0.05)  # arrivals spread over steps: prompts join while others decode
    for c in clients:
        c.join(300)
    engine.stop()
    loop.join(30)
    assert all(r and r[-1]["event"] == "done" for r in results), results
    assert runner.shapes - warm == set(), f"met after warm-up: {runner.shapes - warm}"
    assert unique_graphs() == graphs, "a request compiled a graph that warm-up did not"
    assert runner.status()["graphs_compiled_after_ready"] == 0
    if setup == "warmed_graph_path":  # prompts that joined while others decoded rode in their forward
        assert any(c[0] == "prefill-graph-mixed" for c in runner.shapes)


def test_prefill_budget_keeps_the_gap_within_max_gap_steps():
    # a chunk of n tokens costs 10 ms + 0.05 ms * n; a decode step 20 ms; 3 steps allowed, of which the
    # budget aims at GAP_MARGIN (0.9): 20 + 10 + 0.05 n <= 54 ms -> n <= 480; each further prompt in the
    # step costs its 10 ms = 200 tokens' worth
    assert GAP_MARGIN == 0.9
    prefill = {64: 0.010 + 0.05e-3 * 64, 2048: 0.010 + 0.05e-3 * 2048}
    assert prefill_budget(0.020, prefill, 3.0, cap=2048) == (480, 200)
    # with prefill graphs a chunk runs padded to the next graph's size: the budget is one of them
    assert prefill_budget(0.020, prefill, 3.0, cap=2048, sizes=[16, 32, 64, 128, 256, 512, 768, 1024]) == (256, 200)
    assert prefill_budget(0.020, prefill, None, cap=2048) == (2048, 0)
    assert prefill_budget(0.020, prefill, 100.0, cap=2048) == (2048, 200)
    assert gap_bound_reachable(0.020, prefill, 3.0)
    # in reach but only with chunks smaller than their fixed cost in tokens (2 steps: n <= 120): the bound
    # is what the knob promises, so it is kept (the rate of prefill is what it costs)
    assert prefill_budget(0.020, prefill, 2.0, cap=2048) == (112, 200)
    assert prefill_budget(0.020, prefill, 2.0, cap=2048, sizes=[16, 32, 64, 128]) == (64, 200)
    assert gap_bound_reachable(0.020, prefill, 2.0)
    # unattainable (the 10 ms fixed cost alone is over the allowance of 1 ms decode steps): chunks no
    # smaller than that fixed cost in tokens (200, up to a multiple of 16), so it does not multiply
    assert prefill_budget(0.001, prefill, 3.0, cap=2048) == (208, 200)
    assert not gap_bound_reachable(0.001, prefill, 3.0)
    # the H200 figures of 2026-12-02 (27B widths, 8 layers): 64 tokens 15.9 ms, 2048 tokens 25.9 ms, decode
    # 4.3 ms -> the fixed cost is ~3,100 tokens' worth: whole chunks
    assert prefill_budget(0.0043, {64: 0.0159, 2048: 0.0259}, 3.0, cap=2048) == (2048, 3090)
    assert not gap_bound_reachable(0.0043, {64: 0.0159, 2048: 0.0259}, 3.0)
    # the chunk rides in the decode forward: a step costs 2 ms + 0.05 ms * n beyond the decode step ->
    # n <= 640, a mixed graph's size; a further prompt's chunk runs alone, its fixed cost (10 ms) in tokens
    step = {64: 0.002 + 0.05e-3 * 64, 256: 0.002 + 0.05e-3 * 256}
    assert prefill_budget(0.020, step, 3.0, cap=256, sizes=[16, 32, 64, 128, 256], alone_s=prefill) == (256, 200)


def scheduler_of(engine, limits, cache=None):
    """A fresh engine's scheduler (and intake) over the warmed runner: driven directly, no loop."""
    e = Engine(engine.runner, OneRank(), engine.processor, limits, cache=cache)
    return e.scheduler, e.intake


def test_whole_chunks_when_no_stream_decodes(warmed):
    """The gap budget protects decoding streams; with none, a new prompt is prefilled in whole chunks."""
    engine, _ = warmed
    s, intake = scheduler_of(engine, engine.limits.model_copy(update={"prefill_chunk_tokens": 64}))
    s.prefill_budget, s.prefill_overhead = 16, 0
    first = intake.prepare(request("one two three four five six seven eight nine ten"))
    assert 16 < len(first.input_ids) <= 64
    s.add(first.group)
    plan = s.schedule()
    assert [(p.start, p.end) for p in plan.prefill] == [(0, len(first.input_ids))] and not plan.decode
    second = intake.prepare(request("eleven twelve thirteen fourteen fifteen sixteen seventeen"))
    s.add(second.group)
    plan = s.schedule()
    assert plan.decode  # the first prompt's stream decodes now: the second gets the gap budget
    assert [(p.start, p.end) for p in plan.prefill] == [(0, 16)]


def test_the_scheduler_charges_each_prompt_its_overhead(warmed):
    """Two short prompts would fit the token budget together, but not with the second one's fixed cost."""
    engine, _ = warmed
    s, intake = scheduler_of(engine, engine.limits)
    s.prefill_budget, s.prefill_overhead = 64, 200
    for text in ("one two", "three four"):
        s.add(intake.prepare(request(text)).group)
    plan = s.schedule()
    assert len(plan.prefill) == 1 and len(s.running) == 1  # the second waits for the next step
    s2, intake2 = scheduler_of(engine, engine.limits)
    s2.prefill_budget = 64
    for text in ("one two", "three four"):
        s2.add(intake2.prepare(request(text)).group)
    assert len(s2.schedule().prefill) == 2


def test_a_snapshot_split_waits_for_room_for_its_second_forward(warmed):
    """The prefix cache splits a chunk at its snapshot position into two forwards; under the gap budget the
    second one's fixed cost is charged too, so the part after the snapshot waits for the next step."""
    engine, _ = warmed
    cache = CacheConfig(prefix_bytes=1 << 30, image_bytes=0)
    text = "one two three four five six seven eight nine ten"
    for overhead, steps in ((200, 2), (0, 1)):
        s, intake = scheduler_of(engine, engine.limits, cache)
        seq = intake.prepare(request(text))
        n, b = len(seq.input_ids), seq.prefix.boundary
        assert 0 < b < n <= 64  # the snapshot before the generation prompt, inside the only chunk
        s.prefill_budget, s.prefill_overhead = 64, overhead
        s.add(seq.group)
        plan = s.schedule()
        chunks = [(p.start, p.end) for p in plan.prefill]
        assert plan.prefill[0].save is not None
        if steps == 2:  # 64 + 200 tokens' room: the chunk and one forward's cost, not a second one's
            assert chunks == [(0, b)] and seq.in_flight == 0
            assert [(p.start, p.end) for p in s.schedule().prefill] == [(b, n)] and seq.in_flight == 1
        else:  # no fixed cost to charge (no max_gap_steps): both forwards in one step
            assert chunks == [(0, b), (b, n)] and seq.in_flight == 1
        s.running.clear()


@pytest.fixture
def front(tmp_path):
    from ds_qwen_vision.ipc import IpcServer
    from ds_qwen_vision.serve import Starting
    from ds_qwen_vision.server.app import create_app

    d = tempfile.mkdtemp(prefix="dsqv-wu-", dir="/tmp")
    sock = f"{d}/e.sock"
    ipc = IpcServer(sock, Starting(2)).start()
    cfg = load_config_json(json.dumps({"server": {"ipc_socket": sock}}))
    yield ipc, create_app(cfg).test_client()
    ipc.close()
    shutil.rmtree(d, ignore_errors=True)


def test_health_says_loading_then_warming_up(front, warmed):
    ipc, client = front
    r = client.get("/health")
    assert r.status_code == 503 and r.get_json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json={"model": "ds-qwen-vision-demo", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "loading"
    warmed_engine, _ = warmed
    engine = Engine(warmed_engine.runner, OneRank(), warmed_engine.processor, warmed_engine.limits)
    ipc.handler = engine
    engine.phase = "warming_up"
    engine.heartbeat()
    r = client.get("/health")
    assert r.status_code == 503 and r.get_json()["status"] == "warming_up"
    events = list(engine.generate(request("hi")))
    assert events[0]["status"] == 503 and events[0]["code"] == "warming_up"
    engine.phase = "ready"
    assert client.get("/health").status_code == 200


def test_timed_chunks_stay_within_the_prefill_graphs():
    from ds_qwen_vision.runner.warmup import timed_chunks

    assert timed_chunks(2048, 1024, largest=True) == [64, 1024]   # both replays: one path's fixed cost
    assert timed_chunks(2048, None, largest=True) == [64, 2048]
    assert timed_chunks(2048, None, largest=False) == [64, 256]
    assert timed_chunks(64, None, largest=False) == [16, 64]
    assert timed_chunks(16, None, largest=False) == [16]


@pytest.mark.parametrize("mixed", [False, True])
def test_with_prefill_graphs_a_gap_bound_chunk_is_a_replay(tiny_ckpt, mixed):
    """Chunks cut while a stream decodes stay within the largest prefill graph (with mixed steps: the
    largest mixed one), and the timed ones too; without the gap knob the budget is the chunk limit."""
    processor = load_processor(tiny_ckpt)
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=2, max_len=320, prefill_graph_tokens=32,
                         mixed_prefill=mixed)
    for gap in (100.0, None):
        limits = LimitsConfig(max_prompt_tokens=256, max_new_tokens=16, max_concurrent=2, prefill_chunk_tokens=128,
                              max_images_per_request=0, max_gap_steps=gap)
        engine = Engine(runner, OneRank(), processor, limits)
        lines = []
        warm_up(engine, lines.append)
        done = [line for line in lines if "warm-up done" in line][0]
        if gap is None:
            assert engine.scheduler.prefill_budget == limits.prefill_chunk_tokens, done
            continue
        assert engine.scheduler.prefill_budget <= 32 < limits.prefill_chunk_tokens
        assert "prefill 16 tokens" in done and "32 tokens" in done and "128 tokens" not in done
        assert ("with the decode rows" in done) == mixed
