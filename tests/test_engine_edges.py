"""The engine's edges, in process over the tiny checkpoint's ModelRunner: a tool call cut by max_tokens keeps
its arguments as generated (finish_reason length, no made-up `{}`) and leaves no call markup in the content;
queued requests' images are held within limits.max_queued_pixels; a client that leaves while queued frees
its place at once."""
from __future__ import annotations

import base64
import json
import threading

import pytest
import torch
from conftest import OneRank, make_image

from ds_qwen_vision.config import LimitsConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.model import load_model, load_processor
from ds_qwen_vision.runner import ModelRunner

# bounded values, so that the random model finishes the forced call in a few tokens
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}


@pytest.fixture(scope="module")
def parts(tiny_ckpt):
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    return ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=1024), load_processor(tiny_ckpt)


def request(text: str, image: bytes | None = None, **extra) -> dict:
    content = [{"type": "image", "data_b64": base64.b64encode(image).decode()}] if image else []
    return {"messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}], "max_tokens": 8,
            "temperature": 0.0, "chat_template_kwargs": {"enable_thinking": False}, **extra}


def answer(events: list[dict]) -> tuple[str, list[dict], str]:
    """content, tool calls (assembled from their deltas), finish reason"""
    content, calls, finish = "", [], None
    for e in events:
        if e["event"] == "delta":
            content += e["content"]
            for d in e.get("tool_calls", []):
                if d["index"] == len(calls):
                    calls.append({"name": d["function"]["name"], "arguments": ""})
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
            finish = e.get("finish_reason") or finish
    assert events[-1]["event"] == "done", events[-1]
    return content, calls, finish


def test_a_tool_call_cut_by_max_tokens_keeps_its_arguments_as_generated(parts):
    runner, processor = parts
    engine = Engine(runner, OneRank(), processor, LimitsConfig(max_new_tokens=128, max_concurrent=4, max_queue=128))
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    forced = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    try:
        events = [e for e in engine.generate(request("Weather in Paris?", max_tokens=128, **forced)) if e]
        content, calls, finish = answer(events)
        n = events[-1]["usage"]["completion_tokens"]
        assert finish == "tool_calls" and content == "" and len(calls) == 1
        whole = calls[0]["arguments"]
        assert set(json.loads(whole)) == {"city", "days"}
        results = [None] * n
        cuts = range(1, n, 3)  # the tiny tokenizer spells the call out in ~100 tokens: every third cut

        def cut(k):  # the same answer cut after k tokens
            results[k] = [e for e in engine.generate(request("Weather in Paris?", max_tokens=k, **forced)) if e]

        threads = [threading.Thread(target=cut, args=(k,)) for k in cuts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        seen = set()
        for k in cuts:
            content, calls, finish = answer(results[k])
            assert finish == "length" and content == "", (k, content)  # no call markup as content
            if calls:  # once the function's name is out
                assert calls[0]["name"] == "weather" and whole.startswith(calls[0]["arguments"]), (k, calls)
                seen.add(calls[0]["arguments"])
        assert "{}" not in seen and any(a not in ("", whole) for a in seen)  # some cut inside the arguments
    finally:
        engine.stop()
        loop.join(30)


def no_loop_engine(parts, **limits) -> Engine:
    """An engine whose loop does not run: what is queued stays queued."""
    runner, processor = parts
    return Engine(runner, OneRank(), processor, LimitsConfig(max_new_tokens=64, **limits))


def first(events) -> dict:
    return next(e for e in events if e is not None)


def test_queued_images_are_held_within_max_queued_pixels(parts):
    engine = no_loop_engine(parts, max_queued_pixels=1)  # one request's images alone always fit
    image = make_image(64, 48)
    a = engine.generate(request("first", image))
    assert first(a)["event"] == "start"
    refused = first(engine.generate(request("second", image)))
    assert (refused["status"], refused["code"]) == (429, "queue_full") and "limits.max_queued_pixels" in refused["message"]
    assert first(engine.generate(request("no image"))).get("event") == "start"  # a text prompt holds no pixels
    a.close()  # its client leaves: its pixels go with it
    assert first(engine.generate(request("second", image)))["event"] == "start"


def test_a_client_that_leaves_while_queued_frees_its_place_at_once(parts):
    engine = no_loop_engine(parts, max_queue=1)
    a = engine.generate(request("first"))
    assert first(a)["event"] == "start"
    refused = first(engine.generate(request("second")))
    assert (refused["status"], refused["code"]) == (429, "queue_full")
    a.close()  # the IPC server closes the generator when the client disconnects
    assert engine.health()["queue_depth"] == 0
    b = engine.generate(request("second"))
    assert first(b)["event"] == "start" and engine.health()["queue_depth"] == 1
    assert 'dsqv_engine_requests_total{outcome="cancelled"} 1.0' in engine.metrics()
