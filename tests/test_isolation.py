"""One request's failure stays its own: an exception in one sequence's host work (engine/output.py) ends that
request alone with a 500 `internal_error` naming its request id, which the log carries with the traceback;
its slot and KV blocks are freed and every other request answers as transformers does.

In process at tp=1: the real Engine over the tiny checkpoint's ModelRunner (as test_prefix_cache.py), fault
injection on (engine/faults.py: DSQV_FAULT_INJECTION=1, a marker in the prompt names the stage). For each
stage, 20 concurrent requests over 4 slots, one of them marked; without speculation and with MTP.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import OneRank
from prometheus_client.parser import text_string_to_metric_families
from test_prefix_cache import Reference, engine_request, user

from ds_qwen_vision.config import LimitsConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.engine.faults import STAGES
from ds_qwen_vision.model import load_model, load_processor
from ds_qwen_vision.runner import ModelRunner

PROMPTS = ["Hello there, how are you?", "What is the capital of France?", "Tell me a story about the sea.",
           "Count to five.", "Why is the sky blue?"]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
# what the marked request needs for its stage to run at all
NEEDS = {"grammar": {"response_format": {"type": "json_object"}}, "logprobs": {"logprobs": True, "top_logprobs": 2},
         "tools": {"tools": [WEATHER], "tool_choice": "auto"}}
MARKED = 7


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


@pytest.fixture(scope="module", params=["none", "mtp"])
def engine(tiny_ckpt, request):
    """The engine without speculation, and with MTP: there a held step's text goes out during the next step
    (Engine.deliver_held), so a request failing in its delivery has a verify already launched."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSQV_FAULT_INJECTION", "1")  # read when the engine is built
        mtp = request.param == "mtp"
        model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=mtp)
        runner = ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=512,
                             speculative={"method": "mtp", "num_tokens": 3} if mtp else None)
        limits = LimitsConfig(max_prompt_tokens=400, max_new_tokens=64, max_concurrent=4, max_queue=64)
        e = Engine(runner, OneRank(), load_processor(tiny_ckpt), limits)
    e.heartbeat()  # every rank (one) reports ready
    loop = threading.Thread(target=e.run, daemon=True)
    loop.start()
    yield e
    e.stop()
    loop.join(30)


def failed(engine) -> float:
    return sum(s.value for f in text_string_to_metric_families(engine.metrics()) for s in f.samples
               if s.name == "dsqv_engine_requests_total" and s.labels.get("outcome") == "failed")


@pytest.mark.parametrize("stage", STAGES)
def test_one_failing_request_of_twenty_leaves_the_others_alone(engine, ref, stage, capfd):
    conversations = [[user(PROMPTS[i % len(PROMPTS)])] for i in range(20)]
    conversations[MARKED] = [user(f"Say hello. dsqv-fault:{stage}")]
    requests = [{**engine_request(c), "request_id": f"{stage}-{i}"} for i, c in enumerate(conversations)]
    requests[MARKED].update(NEEDS.get(stage, {}))
    before = failed(engine)
    results = [None] * 20

    def client(i):
        results[i] = [e for e in engine.generate(requests[i]) if e is not None]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    bad = results[MARKED][-1]
    assert results[MARKED][0]["event"] == "start" and bad["event"] == "error", results[MARKED]
    assert (bad["status"], bad["type"], bad["code"]) == (500, "server_error", "internal_error")
    assert f"request id {stage}-{MARKED}" in bad["message"]
    for i, events in enumerate(results):
        if i == MARKED:
            continue
        assert events[-1]["event"] == "done", (i, events[-1])
        assert "".join(e["content"] for e in events if e["event"] == "delta") == ref.answer(conversations[i]), i
    assert engine.health()["ready"] is True and engine.alive
    assert failed(engine) - before == 1
    log = capfd.readouterr().err
    assert f"request {stage}-{MARKED}: choice 0 failed" in log and "Traceback" in log and "InjectedFault" in log
    deadline = time.monotonic() + 10  # the failed sequence's slot and blocks, freed at the next plan
    while engine.running or not engine.idle():
        assert time.monotonic() < deadline, engine.running
        time.sleep(0.01)
    assert engine.blocks.used == 0 and all(r == 0 for r in engine.blocks.refs)
