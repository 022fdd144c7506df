"""The HTTP front and the IPC link, against a fake engine (no model, no torch in the front).

A real `IpcServer` on a temporary socket serves `FakeEngine`; the app is driven with Flask's
test client, and once more as a real gunicorn process on a free loopback port through the
official ``openai`` client.  What the fake engine does is chosen by a marker in the last user
message (``engine:429``, ``engine:slow``, ...).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from PIL import Image
from test_protocol import bomb_png, data_url, encode, jpeg, png, png_chunk

from ds_qwen_vision.config import DeployConfig, load_config_json
from ds_qwen_vision.ipc import (EngineClient, EngineUnavailable, IpcServer, delta_event, done_event, error_event,
                                start_event)
from ds_qwen_vision.server.app import create_app

REPO = Path(__file__).resolve().parents[1]
MODEL = "fake-qwen"
KEY_ENV = "DSQV_TEST_API_KEY"
KEY = "sk-test-0123456789"
CONTENT = ["Hello", ", wörld ", "🌍 你好"]  # multi-byte characters on the wire
REASONING = ["Let me think… ", "🤔"]
MAX_BODY = 300_000

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# ---------------------------------------------------------------------------------------------
# The fake engine
# ---------------------------------------------------------------------------------------------


def last_user_text(request: dict) -> str:
    user = [m for m in request["messages"] if m["role"] == "user"][-1]
    return " ".join(p["text"] for p in user["content"] if p["type"] == "text")


class FakeEngine:
    """Echo-ish engine handler: fixed deltas, or a behaviour picked by a marker in the prompt."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict] = []
        self.cancelled = threading.Event()  # set when a generator is closed before its end
        self.ranks_ready = [True, True]
        self.fail_unary = False
        self.memory = None  # the memory plan in the health report (None: not planned yet)

    def health(self) -> dict:
        if self.fail_unary:
            raise RuntimeError("boom")
        report = {"ready": all(self.ranks_ready),
                  "ranks": [{"rank": i, "ready": r, "device": "cpu"} for i, r in enumerate(self.ranks_ready)]}
        return report if self.memory is None else {**report, "memory": self.memory}

    def metrics(self) -> str:
        if self.fail_unary:
            raise RuntimeError("boom")
        return "# HELP dsqv_engine_queue_depth Requests waiting.\n# TYPE dsqv_engine_queue_depth gauge\n" \
               "dsqv_engine_queue_depth 0.0\n"

    def generate(self, request: dict, client_gone=None):
        self.requests.append(request)
        text = last_user_text(request)
        if "engine:429" in text:
            yield error_event(429, "The queue is full (64 requests waiting).", code="queue_full")
            return
        if "engine:400" in text:
            yield error_event(400, "The prompt has 9000 tokens; this server accepts at most 8192.",
                              param="messages", code="context_length_exceeded")
            return
        images = sum(p["type"] == "image" for m in request["messages"] for p in m["content"])
        prompt_tokens = 10 + images
        yield start_event(prompt_tokens)
        try:
            if "engine:fail-mid" in text:
                yield delta_event("partial")
                yield error_event(503, "Rank 1 stopped answering.", code="rank_lost")
                return
            if "engine:crash" in text:
                yield delta_event("partial")
                raise RuntimeError("kaboom")
            if "engine:no-done" in text:
                yield delta_event("partial")
                return
            if "engine:slow" in text or "engine:silent" in text:
                for _ in range(400):  # ~10 s at most
                    for _ in range(5):
                        time.sleep(0.005)
                        yield None  # idle tick: lets the IPC server notice a disconnect
                    if "engine:slow" in text:
                        yield delta_event("tick ")
                yield done_event("length", prompt_tokens, 400)
                return
            deltas = []
            if request["chat_template_kwargs"].get("enable_thinking"):
                deltas += [delta_event(reasoning_content=r) for r in REASONING]
            deltas += [delta_event(c) for c in CONTENT] + [delta_event(f" images={images}")]
            limit = request["max_tokens"] or len(deltas)
            for d in deltas[:limit]:
                yield d
            yield done_event("length" if limit < len(deltas) else "stop", prompt_tokens, min(limit, len(deltas)))
        except GeneratorExit:
            self.cancelled.set()
            raise


def full_text(n_images: int = 0) -> str:
    return "".join(CONTENT) + f" images={n_images}"


@pytest.fixture(scope="module")
def sock_dir():
    # Short path under /tmp: a Unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    d = tempfile.mkdtemp(prefix="dsqv-test-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def engine_server(sock_dir):
    engine = FakeEngine()
    server = IpcServer(os.path.join(sock_dir, "engine.sock"), engine).start()
    yield engine, server
    server.close()


@pytest.fixture
def engine(engine_server):
    engine_server[0].reset()
    return engine_server[0]


@pytest.fixture(scope="module")
def socket_path(engine_server):
    return engine_server[1].socket_path


def make_config(socket_path: str, *, api_key: bool = False, port: int = 8000, workers: int = 1) -> DeployConfig:
    # The key's env var is checked where the app is created (create_app / the gunicorn worker).
    return load_config_json(check_env=False, text=json.dumps({
        "model": f"/models/{MODEL}",
        "server": {"ipc_socket": socket_path, "max_body_bytes": MAX_BODY, "timeout_s": 30, "step_timeout_s": 30,
                   "port": port, "workers": workers, "shutdown_grace_s": 1},
        "limits": {"max_images_per_request": 2, "max_image_pixels": 1_000_000, "max_new_tokens": 64},
        "security": {"api_key_env": KEY_ENV if api_key else None,
                     "allowed_image_url_prefixes": ["https://images.example/"]},
    }))


@pytest.fixture(scope="module")
def client(socket_path):
    return create_app(make_config(socket_path)).test_client()


@pytest.fixture(scope="module")
def auth_client(socket_path):
    os.environ[KEY_ENV] = KEY
    try:
        return create_app(make_config(socket_path, api_key=True)).test_client()
    finally:
        del os.environ[KEY_ENV]


def chat(content="hi", **fields) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    body.update(fields)
    return body


def with_image(url: str, text: str = "what is this?") -> list:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


def sse_events(text: str) -> list:
    """The ``data:`` payloads of an SSE body, JSON-decoded except the final ``[DONE]``."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


def assert_error(resp, status: int, code: str | None = None, contains: str = "", param=...) -> dict:
    """The OpenAI error body, and nothing else, with a status and a helpful message."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 15
    assert contains in err["message"], err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------------
# IPC
# ---------------------------------------------------------------------------------------------


def test_ipc_generate_roundtrip(engine, socket_path):
    events = list(EngineClient(socket_path).generate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "max_tokens": None, "chat_template_kwargs": {}}))
    assert events[0] == {"event": "start", "prompt_tokens": 10}
    assert [e["content"] for e in events[1:-1]] == CONTENT + [" images=0"]
    assert events[-1] == {"event": "done", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}


def test_ipc_health_and_metrics(engine, socket_path):
    c = EngineClient(socket_path)
    assert c.health()["ranks"][1] == {"rank": 1, "ready": True, "device": "cpu"}
    assert "dsqv_engine_queue_depth 0.0" in c.metrics()
    engine.fail_unary = True
    with pytest.raises(EngineUnavailable, match="engine health failed: RuntimeError: boom"):
        c.health()


def test_ipc_engine_missing(sock_dir):
    c = EngineClient(os.path.join(sock_dir, "nobody.sock"))
    with pytest.raises(EngineUnavailable, match="not reachable"):
        c.health()
    with pytest.raises(EngineUnavailable, match="not reachable"):
        next(c.generate({}))


def request_for(text: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "max_tokens": None,
            "chat_template_kwargs": {}}


@pytest.mark.parametrize("marker, last", [
    ("engine:crash", {"event": "error", "status": 500, "type": "server_error", "message": "internal engine error",
                      "param": None, "code": None}),
    ("engine:no-done", {"event": "error", "status": 500, "type": "server_error",
                        "message": "the engine ended the stream without a result", "param": None, "code": None}),
])
def test_ipc_handler_failures_become_error_events(engine, socket_path, marker, last):
    events = list(EngineClient(socket_path).generate(request_for(marker)))
    assert [e["event"] for e in events] == ["start", "delta", "error"] and events[-1] == last


def test_ipc_client_close_cancels_within_half_a_second(engine, socket_path):
    gen = EngineClient(socket_path).generate(request_for("engine:silent"))
    assert next(gen)["event"] == "start"
    t = time.perf_counter()
    gen.close()
    assert engine.cancelled.wait(2.0)
    assert time.perf_counter() - t < 0.5


def test_ipc_silent_disconnect_of_a_raw_peer(engine, socket_path):
    """A peer that just vanishes (as a killed worker would) is noticed by polling, not by a write."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(socket_path)
    s.sendall(json.dumps({"op": "generate", "request": request_for("engine:silent")}).encode() + b"\n")
    assert json.loads(s.recv(4096).split(b"\n")[0])["event"] == "start"
    t = time.perf_counter()
    s.close()
    assert engine.cancelled.wait(2.0)
    assert time.perf_counter() - t < 0.5


def test_ipc_bad_requests(engine, socket_path):
    for line, expect in [(b'{"op": "bogus"}\n', {"error": "unknown op 'bogus'"}),
                         (b'{"op": "generate", "request": 5}\n', {"event": "error", "status": 400}),
                         (b"not json\n", None)]:
        s = socket.socket(socket.AF_UNIX)
        s.connect(socket_path)
        s.sendall(line)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
        if expect is None:
            assert reply == b""  # dropped, and the server lives on
        else:
            assert expect.items() <= json.loads(reply).items()
    assert EngineClient(socket_path).health()["ready"] is True


def test_ipc_server_lifecycle(sock_dir):
    path = os.path.join(sock_dir, "life.sock")
    # A stale socket file (its server died) is replaced.
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    engine = FakeEngine()
    server = IpcServer(path, engine).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(RuntimeError, match="already serving"):
            IpcServer(path, engine).start()
        # Closing the server ends open streams: the client sees it, the generator is closed.
        gen = EngineClient(path).generate(request_for("engine:silent"))
        assert next(gen)["event"] == "start"
    finally:
        server.close()
    with pytest.raises(EngineUnavailable, match="closed the connection before finishing"):
        next(gen)
    assert engine.cancelled.wait(2.0)
    assert not os.path.exists(path)
    Path(path).write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        IpcServer(path, engine).start()


# ---------------------------------------------------------------------------------------------
# HTTP through Flask's test client
# ---------------------------------------------------------------------------------------------


def test_non_streaming(engine, client):
    resp = client.post("/v1/chat/completions", json=chat(temperature=0, seed=7))
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": full_text()},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    assert engine.requests[-1]["temperature"] == 0.0 and engine.requests[-1]["seed"] == 7


def test_non_streaming_reasoning_and_length(engine, client):
    body = client.post("/v1/chat/completions", json=chat(
        max_tokens=3, chat_template_kwargs={"enable_thinking": True})).get_json()
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Hello", "reasoning_content": "".join(REASONING)}
    assert body["choices"][0]["finish_reason"] == "length"


def test_streaming_with_usage(engine, client):
    resp = client.post("/v1/chat/completions", json=chat(
        with_image(data_url(png())), stream=True, stream_options={"include_usage": True},
        chat_template_kwargs={"enable_thinking": True}))
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    events = sse_events(resp.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "".join(REASONING)
    assert "".join(d.get("content", "") for d in deltas) == full_text(1)
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 11


def test_streaming_without_usage(engine, client):
    events = sse_events(client.post("/v1/chat/completions", json=chat(stream=True)).get_data(as_text=True))
    assert all("usage" not in c for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_engine_request_is_forwarded(engine, client):
    img = jpeg(10, 6)
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "developer", "content": "sys"}, {"role": "user", "content": with_image(data_url(img, "jpeg"))}],
        "stop": ["x", "y"], "top_k": 5, "max_completion_tokens": 9})
    req = engine.requests[-1]
    assert req["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "sys"}]}
    assert base64.b64decode(req["messages"][1]["content"][1]["data_b64"]) == img
    assert (req["stop"], req["top_k"], req["max_tokens"]) == (["x", "y"], 5, 9)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusals_are_plain_http_errors(engine, client, stream):
    resp = client.post("/v1/chat/completions", json=chat("engine:429", stream=stream))
    assert_error(resp, 429, "queue_full", "queue is full")
    assert resp.headers["Retry-After"] == "1"
    resp = client.post("/v1/chat/completions", json=chat("engine:400", stream=stream))
    assert_error(resp, 400, "context_length_exceeded", "at most 8192", param="messages")


def test_engine_error_mid_stream(engine, client):
    events = sse_events(client.post("/v1/chat/completions", json=chat("engine:fail-mid", stream=True))
                        .get_data(as_text=True))
    assert events[1]["choices"][0]["delta"] == {"content": "partial"}
    assert events[2] == {"error": {"message": "Rank 1 stopped answering.", "type": "service_unavailable_error",
                                   "param": None, "code": "rank_lost"}}
    assert events[3] == "[DONE]"
    # Without streaming the same failure is a 503.
    resp = client.post("/v1/chat/completions", json=chat("engine:fail-mid"))
    assert_error(resp, 503, "rank_lost", "stopped answering")
    assert resp.headers["Retry-After"] == "5"
    resp = client.post("/v1/chat/completions", json=chat("engine:crash"))
    assert_error(resp, 500, None, "internal engine error")


def test_client_disconnect_cancels_the_request(engine, client):
    resp = client.post("/v1/chat/completions", json=chat("engine:slow", stream=True), buffered=False)
    it = iter(resp.response)
    assert b'"role":"assistant"' in next(it)
    assert b"tick" in next(it)
    resp.close()  # what gunicorn does when the client goes away
    assert engine.cancelled.wait(2.0)


def test_disconnect_before_the_first_chunk_cancels_too(engine, client):
    resp = client.post("/v1/chat/completions", json=chat("engine:silent", stream=True), buffered=False)
    assert resp.status_code == 200  # the engine said "start"; no byte of the body was read
    resp.close()
    assert engine.cancelled.wait(2.0)


def test_engine_dies_mid_stream(sock_dir):
    engine = FakeEngine()
    server = IpcServer(os.path.join(sock_dir, "dies.sock"), engine).start()
    try:
        c = create_app(make_config(server.socket_path)).test_client()
        resp = c.post("/v1/chat/completions", json=chat("engine:slow", stream=True), buffered=False)
        it = iter(resp.response)
        assert b"tick" in next(it) + next(it)
    finally:
        server.close()  # rank 0 goes away with the stream open
    events = sse_events(b"".join(it).decode())
    assert events[-2]["error"]["code"] == "engine_unavailable" and events[-1] == "[DONE]"
    assert "during generation" in events[-2]["error"]["message"]


def test_unexpected_failure_is_a_json_500(socket_path):
    class BrokenClient(EngineClient):
        def generate(self, request, client_gone=None):
            raise RuntimeError("a bug")

    c = create_app(make_config(socket_path), client=BrokenClient(socket_path)).test_client()
    err = assert_error(c.post("/v1/chat/completions", json=chat()), 500, None, "Internal server error")
    assert "a bug" not in err["message"]


def test_engine_down(sock_dir):
    c = create_app(make_config(os.path.join(sock_dir, "down.sock"))).test_client()
    resp = c.post("/v1/chat/completions", json=chat())
    assert_error(resp, 503, "engine_unavailable", "engine is unavailable before generation; retry later")
    assert "down.sock" not in resp.get_data(as_text=True)  # no internals in API errors
    assert resp.headers["Retry-After"] == "5"
    resp = c.get("/health")
    assert resp.status_code == 503 and resp.get_json()["status"] == "unavailable"
    resp = c.get("/metrics")  # the front's own part is still served
    assert resp.status_code == 200 and b"dsqv_front_requests_total" in resp.data
    assert b"dsqv_engine" not in resp.data


def test_images_are_counted_against_the_planned_prompt_limit(engine, socket_path, tmp_path):
    """limits.max_prompt_tokens null: the front takes the memory planner's figure from the engine's health once
    it is there, and refuses images whose tokens alone are over it before decoding them (test_protocol has the
    rule); the checkpoint's resize rule comes from its preprocessor_config.json."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 16, "merge_size": 2, "size": {"shortest_edge": 65536, "longest_edge": 16777216}}))
    cfg = make_config(socket_path).model_dump(mode="json")
    assert cfg["limits"]["max_prompt_tokens"] is None
    app = create_app(load_config_json(json.dumps({**cfg, "model": str(tmp_path)}), check_env=False)).test_client()
    flat = io.BytesIO()
    Image.new("RGB", (1000, 1000), "teal").save(flat, "PNG")  # 963 tokens
    request = chat(with_image(data_url(flat.getvalue()[:120])))  # cut off: never decoded if refused for length
    assert_error(app.post("/v1/chat/completions", json=request), 400, "invalid_image")  # no figure yet: decoded
    engine.memory = {"max_prompt_tokens": 500, "max_slots": 4}
    err = assert_error(app.post("/v1/chat/completions", json=request), 400, "context_length_exceeded",
                       "963 tokens as the model's image processor resizes them; this server accepts at most 500",
                       param="messages")
    assert err["type"] == "invalid_request_error" and not engine.requests
    small = chat(with_image(data_url(png(64, 48))))
    assert app.post("/v1/chat/completions", json=small).status_code == 200 and len(engine.requests) == 1


def test_health(engine, client):
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "engine": {"ready": True, "ranks": [
        {"rank": 0, "ready": True, "device": "cpu"}, {"rank": 1, "ready": True, "device": "cpu"}]}}
    engine.ranks_ready = [True, False]
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.get_json()["engine"]["ranks"][1]["ready"] is False
    engine.ranks_ready = [True, True]
    engine.fail_unary = True
    assert client.get("/health").status_code == 503


def test_metrics(engine, client):
    client.get("/v1/models")
    client.get("/no/such/route")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    text = resp.get_data(as_text=True)
    assert 'dsqv_front_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert 'route="<unmatched>",status="404"' in text
    assert "dsqv_front_request_duration_seconds_bucket" in text
    assert text.rstrip().endswith("dsqv_engine_queue_depth 0.0")


def test_models(client):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").get_json()["id"] == MODEL
    assert_error(client.get("/v1/models/gpt-4"), 404, "model_not_found", "does not exist")


def test_auth(engine, auth_client):
    assert_error(auth_client.post("/v1/chat/completions", json=chat()), 401, "invalid_api_key", "Missing API key")
    resp = auth_client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert_error(resp, 401, "invalid_api_key", "Incorrect API key")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_error(auth_client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}), 401)
    ok = {"Authorization": f"Bearer {KEY}"}
    assert auth_client.get("/v1/models", headers=ok).status_code == 200
    assert auth_client.post("/v1/chat/completions", json=chat(), headers=ok).status_code == 200
    # Probes and scrapers need no key; unknown routes do not reveal themselves without one.
    assert auth_client.get("/health").status_code == 200
    assert auth_client.get("/metrics").status_code == 200
    assert_error(auth_client.get("/nope"), 401)
    assert_error(auth_client.get("/nope", headers=ok), 404, "not_found")


def test_http_level_errors_are_json(client):
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed", "POST")
    assert_error(client.post("/v1/models"), 405)
    assert_error(client.get("/"), 404, "not_found", "/v1/chat/completions")
    resp = client.post("/v1/chat/completions", data=b"x" * (MAX_BODY + 1), content_type="application/json")
    assert_error(resp, 413, "request_too_large", f"limit {MAX_BODY} bytes")


# ---------------------------------------------------------------------------------------------
# The malformed-request corpus
# ---------------------------------------------------------------------------------------------

B64_PNG = base64.b64encode(png()).decode()
FLAT_1001x1000 = encode(Image.new("L", (1001, 1000)), "PNG")  # compresses to ~1 KB
ZERO_PX_PNG = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0))


def msgs(*messages) -> dict:
    return {"model": MODEL, "messages": list(messages)}


def user(content) -> dict:
    return {"role": "user", "content": content}


def img_part(url) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# (id, body (bytes: sent raw; dict: as JSON), status, code, message fragment, param)
MALFORMED = [
    ("truncated_json", b'{"model": "fake-qwen", "messages": [', 400, "invalid_json", "not valid JSON", None),
    ("empty_body", b"", 400, "invalid_json", "not valid JSON", None),
    ("trailing_garbage", b'{"model": "fake-qwen"} x', 400, "invalid_json", "not valid JSON", None),
    ("bad_utf8", b'{"model": "\xff\xfe"}', 400, "invalid_json", "not valid JSON", None),
    ("json_array", b"[1, 2]", 400, "invalid_type", "must be a JSON object, got an array", None),
    ("json_string", b'"hello"', 400, "invalid_type", "must be a JSON object, got a string", None),
    ("missing_model", {"messages": [user("hi")]}, 400, "missing_required_parameter", "'model'", "model"),
    ("missing_messages", {"model": MODEL}, 400, "missing_required_parameter", "'messages'", "messages"),
    ("model_not_string", {"model": 7, "messages": [user("hi")]}, 400, "invalid_type", "valid string", "model"),
    ("unknown_model", {"model": "gpt-4o", "messages": [user("hi")]}, 404, "model_not_found", "serves 'fake-qwen'",
     "model"),
    ("messages_not_list", {"model": MODEL, "messages": "hi"}, 400, "invalid_type", "valid array (got a string)",
     "messages"),
    ("empty_messages", msgs(), 400, "invalid_value", "at least one message", "messages"),
    ("message_not_object", msgs(5), 400, "invalid_type", "got an integer", "messages[0]"),
    ("missing_role", msgs({"content": "hi"}), 400, "missing_required_parameter", "messages[0].role",
     "messages[0].role"),
    ("unknown_role", msgs({"role": "bot", "content": "hi"}), 400, "invalid_role", "unknown role 'bot'",
     "messages[0].role"),
    ("tool_role_without_call_id", msgs(user("hi"), {"role": "tool", "content": "x"}), 400,
     "missing_required_parameter", "needs 'tool_call_id'", "messages[1]"),
    ("function_role", msgs(user("hi"), {"role": "function", "content": "x"}), 400, "unsupported_role",
     "use tools and 'tool' messages", "messages[1].role"),
    ("role_not_string", msgs({"role": 1, "content": "hi"}), 400, "invalid_type", "valid string", "messages[0].role"),
    ("missing_content", msgs({"role": "user"}), 400, "missing_required_parameter", "needs 'content'", "messages[0]"),
    ("null_user_content", msgs(user(None)), 400, "missing_required_parameter", "needs 'content'", "messages[0]"),
    ("content_number", msgs(user(5)), 400, "invalid_type", "string or an array of content parts",
     "messages[0].content"),
    ("content_empty_list", msgs(user([])), 400, "invalid_value", "must not be an empty array", "messages[0]"),
    ("part_not_object", msgs(user(["hi"])), 400, "invalid_type", "must be an object with a 'type'",
     "messages[0].content[0]"),
    ("part_missing_type", msgs(user([{"text": "hi"}])), 400, "missing_required_parameter", "no 'type'",
     "messages[0].content[0]"),
    ("part_audio", msgs(user([{"type": "input_audio", "input_audio": {}}])), 400, "unsupported_content",
     "'input_audio' is not supported", "messages[0].content[0]"),
    ("text_not_string", msgs(user([{"type": "text", "text": ["a"]}])), 400, "invalid_type", "valid string",
     "messages[0].content[0].text"),
    ("image_url_missing_url", msgs(user([{"type": "image_url", "image_url": {}}])), 400,
     "missing_required_parameter", "'messages[0].content[0].image_url.url'", "messages[0].content[0].image_url.url"),
    ("image_detail_bad", msgs(user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64_PNG,
                                                                       "detail": "ultra"}}])),
     400, "invalid_value", "'auto', 'low' or 'high'", "messages[0].content[0].image_url.detail"),
    ("system_not_first", msgs(user("hi"), {"role": "system", "content": "late"}), 400, "invalid_value",
     "only be the first message", "messages"),
    ("no_user_message", msgs({"role": "system", "content": "only"}), 400, "invalid_value", "at least one user message",
     "messages"),
    ("image_in_system", msgs({"role": "system", "content": [img_part("data:image/png;base64," + B64_PNG)]}, user("hi")),
     400, "invalid_value", "only allowed in user messages", "messages[0]"),
    ("assistant_tool_call_no_type", msgs(user("hi"), {"role": "assistant", "content": None,
                                                      "tool_calls": [{"id": "1"}]}),
     400, "missing_required_parameter", "messages[1].tool_calls[0].type", "messages[1].tool_calls[0].type"),
    ("assistant_tool_call_bad_arguments", msgs(user("hi"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{'a': 1}"}}]}),
     400, "invalid_value", "must be a JSON object in a string", "messages[1].tool_calls[0].function.arguments"),
    ("tool_calls_on_user", msgs({"role": "user", "content": "hi", "tool_calls": []}), 400, "invalid_value",
     "only assistant messages carry tool_calls", "messages[0]"),
    ("bad_base64", msgs(user(with_image("data:image/png;base64,iVBO$$w0KGgo="))), 400, "invalid_base64",
     "not valid base64", "messages[0].content[1].image_url"),
    ("empty_base64", msgs(user(with_image("data:image/png;base64,"))), 400, "invalid_image", "empty",
     "messages[0].content[1].image_url"),
    ("non_image_bytes", msgs(user(with_image(data_url(b"just some text, not a picture")))), 400, "invalid_image",
     "not an image in a supported format", "messages[0].content[1].image_url"),
    ("truncated_png", msgs(user(with_image(data_url(png(64, 64)[:500])))), 400, "invalid_image",
     "truncated or corrupt PNG", "messages[0].content[1].image_url"),
    ("truncated_jpeg", msgs(user(with_image(data_url(jpeg(64, 64)[:-500], "jpeg")))), 400, "invalid_image",
     "truncated or corrupt JPEG", "messages[0].content[1].image_url"),
    ("decompression_bomb", msgs(user(with_image(data_url(bomb_png())))), 413, "image_too_large",
     "more than 1000000 pixels", "messages[0].content[1].image_url"),
    ("image_over_limit", msgs(user(with_image(data_url(FLAT_1001x1000)))), 413, "image_too_large",
     "1001x1000 = 1001000 pixels", "messages[0].content[1].image_url"),
    ("zero_pixel_image", msgs(user(with_image(data_url(ZERO_PX_PNG)))), 400, "invalid_image", "not an image",
     "messages[0].content[1].image_url"),
    ("too_many_images", msgs(user([img_part("data:image/png;base64," + B64_PNG)] * 3)), 400, "too_many_images",
     "at most 2 per request", "messages"),
    ("http_image_url", msgs(user(with_image("http://169.254.169.254/latest/meta-data"))), 400, "invalid_image_url",
     "remote URLs are not fetched", "messages[0].content[1].image_url"),
    ("allowed_prefix_url", msgs(user(with_image("https://images.example/cat.png"))), 400, "unsupported_image_url",
     "remote image fetching is not supported", "messages[0].content[1].image_url"),
    ("data_url_not_image", msgs(user(with_image("data:text/plain;base64,aGVsbG8="))), 400, "invalid_image_url",
     "data:image/<format>;base64", "messages[0].content[1].image_url"),
    ("max_tokens_zero", chat(max_tokens=0), 400, "invalid_value", "greater than or equal to 1 (got 0)", "max_tokens"),
    ("max_tokens_negative", chat(max_tokens=-5), 400, "invalid_value", "(got -5)", "max_tokens"),
    ("max_tokens_huge", chat(max_tokens=10**12), 400, "invalid_value", "limit of 64 new tokens", "max_tokens"),
    ("max_tokens_string", chat(max_tokens="10"), 400, "invalid_type", "valid integer (got a string)", "max_tokens"),
    ("max_tokens_float", chat(max_tokens=10.5), 400, "invalid_type", "valid integer", "max_tokens"),
    ("max_tokens_conflict", chat(max_tokens=10, max_completion_tokens=20), 400, "invalid_value",
     "differs from max_tokens=10", "max_completion_tokens"),
    ("max_completion_tokens_huge", chat(max_completion_tokens=65), 400, "invalid_value", "limit of 64",
     "max_completion_tokens"),
    ("temperature_negative", chat(temperature=-0.1), 400, "invalid_value", "greater than or equal to 0", "temperature"),
    ("temperature_too_high", chat(temperature=2.5), 400, "invalid_value", "less than or equal to 2", "temperature"),
    ("temperature_string", chat(temperature="hot"), 400, "invalid_type", "valid number", "temperature"),
    ("temperature_nan", b'{"model": "fake-qwen", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, "invalid_value", "finite number", "temperature"),
    ("top_p_zero", chat(top_p=0), 400, "invalid_value", "greater than 0", "top_p"),
    ("top_p_too_high", chat(top_p=1.5), 400, "invalid_value", "less than or equal to 1", "top_p"),
    ("top_k_negative", chat(top_k=-2), 400, "invalid_value", "greater than or equal to -1", "top_k"),
    ("seed_too_big", chat(seed=2**64), 400, "invalid_value", "less than 9223372036854775808", "seed"),
    ("stop_too_many", chat(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "at most 4 stop sequences", "stop"),
    ("stop_empty_string", chat(stop=[""]), 400, "invalid_value", "must not be empty strings", "stop"),
    ("stop_number", chat(stop=5), 400, "invalid_type", "string or an array of strings", "stop"),
    ("n_over_limit", chat(n=5), 400, "invalid_value", "limit of 4 choices", "n"),
    ("n_zero", chat(n=0), 400, "invalid_value", "greater than or equal to 1", "n"),
    ("stream_string", chat(stream="yes"), 400, "invalid_type", "valid boolean", "stream"),
    ("stream_options_without_stream", chat(stream_options={"include_usage": True}), 400, "invalid_value",
     "only allowed when stream is true", "stream_options"),
    ("include_usage_not_bool", chat(stream=True, stream_options={"include_usage": "yes"}), 400, "invalid_type",
     "valid boolean", "stream_options.include_usage"),
    ("frequency_penalty_too_high", chat(frequency_penalty=2.5), 400, "invalid_value", "less than or equal to 2",
     "frequency_penalty"),
    ("presence_penalty_too_low", chat(presence_penalty=-3), 400, "invalid_value", "greater than or equal to -2",
     "presence_penalty"),
    ("repetition_penalty_zero", chat(repetition_penalty=0), 400, "invalid_value", "greater than 0",
     "repetition_penalty"),
    ("min_p_too_high", chat(min_p=1.5), 400, "invalid_value", "less than or equal to 1", "min_p"),
    ("stop_token_ids_negative", chat(stop_token_ids=[3, -1]), 400, "invalid_value", "greater than or equal to 0",
     "stop_token_ids[1]"),
    ("stop_token_ids_string", chat(stop_token_ids="7"), 400, "invalid_type", "valid array", "stop_token_ids"),
    ("tools_bad_name", chat(tools=[{"type": "function", "function": {"name": "f g"}}]), 400, "invalid_value",
     "not a valid function name", "tools[0].function.name"),
    ("logprobs_string", chat(logprobs="yes"), 400, "invalid_type", "valid boolean", "logprobs"),
    ("top_logprobs_without_logprobs", chat(top_logprobs=3), 400, "invalid_value", "needs logprobs: true",
     "top_logprobs"),
    ("top_logprobs_too_many", chat(logprobs=True, top_logprobs=21), 400, "invalid_value", "less than or equal to 20",
     "top_logprobs"),
    ("response_format_unknown", chat(response_format={"type": "yaml"}), 400, "invalid_value",
     "'text', 'json_object' or 'json_schema'", "response_format.type"),
    ("template_kwargs_list", chat(chat_template_kwargs=["enable_thinking"]), 400, "invalid_type", "must be an object",
     "chat_template_kwargs"),
    ("template_kwargs_nested", chat(chat_template_kwargs={"enable_thinking": {"x": 1}}), 400, "invalid_type",
     "string, number, boolean or null", "chat_template_kwargs"),
    ("template_kwargs_reserved", chat(chat_template_kwargs={"add_generation_prompt": False}), 400, "invalid_value",
     "'add_generation_prompt' cannot be set", "chat_template_kwargs"),
    ("user_not_string", chat(user=5), 400, "invalid_type", "valid string", "user"),
]


@pytest.mark.parametrize("name, body, status, code, fragment, param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request(engine, client, name, body, status, code, fragment, param):
    if isinstance(body, bytes):
        resp = client.post("/v1/chat/completions", data=body, content_type="application/json")
    else:
        resp = client.post("/v1/chat/completions", json=body)
    err = assert_error(resp, status, code, fragment, param)
    if param is not None and status == 400:
        assert f"'{param}'" in err["message"]  # the message names what to fix
    assert engine.requests == []  # refused before anything reached the engine
    # ... and the server is none the worse for it.
    ok = client.post("/v1/chat/completions", json=chat())
    assert ok.status_code == 200 and ok.get_json()["choices"][0]["message"]["content"] == full_text()


def test_corpus_is_big_enough():
    assert len(MALFORMED) >= 40


def test_front_imports_no_torch(socket_path):
    env = dict(os.environ, DSQV_CONFIG_JSON=make_config(socket_path).model_dump_json(), PYTHONPATH=str(REPO))
    code = ("import sys, ds_qwen_vision.server.app, ds_qwen_vision.server.gunicorn_conf; "
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# A real gunicorn, driven by the official openai client
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(cfg: DeployConfig, env_extra: dict, log: Path) -> subprocess.Popen:
    """The front exactly as launch.sh starts it."""
    env = dict(os.environ, DSQV_CONFIG_JSON=cfg.model_dump_json(), PYTHONPATH=str(REPO), **env_extra)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn_conf makes its own
    with open(log, "wb") as f:  # a file, not a pipe: nobody drains a pipe while tests run
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:ds_qwen_vision.server.gunicorn_conf",
             "ds_qwen_vision.server.app:create_app_from_env()"],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("gunicorn did not become ready")


@pytest.fixture(scope="module")
def servers(socket_path, sock_dir):
    """Two fronts on the same engine: with an API key and 2 workers, and without a key."""
    port_auth, port_open = free_port(), free_port()
    logs = [Path(sock_dir) / "gunicorn-auth.log", Path(sock_dir) / "gunicorn-open.log"]
    procs = [start_gunicorn(make_config(socket_path, api_key=True, port=port_auth, workers=2), {KEY_ENV: KEY}, logs[0]),
             start_gunicorn(make_config(socket_path, port=port_open), {}, logs[1])]
    bases = [f"http://127.0.0.1:{port_auth}", f"http://127.0.0.1:{port_open}"]
    try:
        for proc, base, log in zip(procs, bases, logs, strict=True):
            wait_ready(proc, base, log)
        yield {"auth": bases[0], "open": bases[1]}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # A clean shutdown: gunicorn's graceful stop works with our hooks.
        assert all(p.returncode == 0 for p in procs), [log.read_text() for log in logs]


def oa(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=20)


def test_openai_non_streaming(engine, servers):
    resp = oa(servers["auth"]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=32, temperature=0.2, seed=1)
    assert resp.choices[0].message.content == full_text()
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (10, 4, 14)


def test_openai_streaming_with_usage_and_image(engine, servers):
    stream = oa(servers["auth"]).chat.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "describe"},
                                               {"type": "image_url", "image_url": {"url": data_url(png(32, 24))}}]}],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == full_text(1) and reasoning == "".join(REASONING)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 11
    assert engine.requests[-1]["chat_template_kwargs"] == {"enable_thinking": True}


def test_openai_auth(engine, servers):
    with pytest.raises(openai.AuthenticationError) as e:
        oa(servers["auth"], key="sk-wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    # No key configured: any key (or none) is fine.
    assert [m.id for m in oa(servers["open"], key="anything").models.list()] == [MODEL]
    with urllib.request.urlopen(f"{servers['auth']}/health") as r:  # open route
        assert json.load(r)["status"] == "ok"


def test_openai_errors(engine, servers):
    client = oa(servers["open"])
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    # Its own client: gunicorn drains at most 64 KiB of a body the app did not read, then closes
    # the connection (after announcing keep-alive), so that connection is not reused here.
    with pytest.raises(openai.APIStatusError) as e:
        oa(servers["open"]).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}])
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "engine:429"}])
    assert e.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=5)
    assert e.value.param == "n"
    # Still serving after the errors.
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]) \
        .choices[0].message.content == full_text()


def test_gunicorn_client_disconnect_cancels(engine, servers):
    host, port = servers["open"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat("engine:slow", stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and b"tick" in resp.read1(4096) + resp.read1(4096)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert engine.cancelled.wait(3.0)


def raw_exchange(base: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Bytes to the server as they are (no client library would send them); its (status, headers, body)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("name, request_bytes, status, code, fragment", [
    ("request line over limit_request_line", b"GET /v1/models?q=" + b"x" * 6000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
     414, "request_line_too_long", "request line (method, path and query string) is too long"),
    ("a header over limit_request_field_size", b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 9000
     + b"\r\n\r\n", 431, "request_headers_too_large", "request headers are too large"),
    ("more headers than limit_request_fields", b"GET /v1/models HTTP/1.1\r\nHost: a\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(120)) + b"\r\n", 431, "request_headers_too_large",
     "request headers are too large"),
    ("a malformed request line", b"NOT-HTTP\r\n\r\n", 400, "invalid_request", "Bad Request"),
])
def test_gunicorn_refusals_are_json(engine, servers, name, request_bytes, status, code, fragment):
    """What gunicorn refuses before the app runs comes back in the OpenAI error shape, not as an HTML page."""
    got, headers, body = raw_exchange(servers["auth"], request_bytes)
    assert got == status, body
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close" and headers["x-request-id"]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == code and fragment in err["message"], err
    assert not engine.requests
    # the worker goes on serving
    assert [m.id for m in oa(servers["auth"]).models.list()] == [MODEL]


def test_gunicorn_metrics_multiprocess(engine, servers):
    client = oa(servers["auth"])
    for _ in range(4):  # spread over both workers
        client.models.list()
    with urllib.request.urlopen(f"{servers['auth']}/metrics") as r:
        text = r.read().decode()
    line = next(row for row in text.splitlines() if row.startswith("dsqv_front_requests_total{")
                and 'route="/v1/models"' in row and 'status="200"' in row)
    assert float(line.rsplit(" ", 1)[1]) >= 4  # summed over the workers' files
    assert "dsqv_engine_queue_depth 0.0" in text
