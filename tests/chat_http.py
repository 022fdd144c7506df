"""Raw HTTP to a running server, for the end-to-end tests of test_faults, test_load and
test_bad_input_corpus.

One connection per call (stdlib http.client), so that a test controls exactly what goes on the wire:
malformed or chunked bodies, a client that vanishes mid-stream, a server that closes early.
"""
from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    seconds: float           # request sent -> body read

    def json(self) -> Any:
        return json.loads(self.body)

    def sse(self) -> list:
        """The ``data:`` payloads of an SSE body, JSON-decoded except the final ``[DONE]``."""
        return sse_events(self.body.decode())

    @property
    def error(self) -> dict:
        return self.json()["error"]


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


def chat(model: str, text: str = "hi", **fields) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    body.update(fields)
    return body


def _connect(base_url: str, timeout: float) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(base_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def _headers(key: str | None, request_id: str | None, extra: dict | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    headers.update(extra or {})
    return headers


def post(base_url: str, body: dict | bytes, *, key: str | None = None, request_id: str | None = None,
         headers: dict | None = None, timeout: float = 60, chunked: bool = False,
         path: str = "/v1/chat/completions") -> Reply:
    """POST ``body`` (a dict is sent as JSON, bytes as they are) and read the whole reply."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = _connect(base_url, timeout)
    t = time.perf_counter()
    try:
        if chunked:
            pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
            conn.request("POST", path, iter(pieces), _headers(key, request_id, headers), encode_chunked=True)
        else:
            try:
                conn.request("POST", path, data, _headers(key, request_id, headers))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered before reading the whole body (413): its reply is still there
        resp = conn.getresponse()
        content = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, content, time.perf_counter() - t)
    finally:
        conn.close()


def get(base_url: str, path: str, *, key: str | None = None, timeout: float = 10) -> Reply:
    conn = _connect(base_url, timeout)
    t = time.perf_counter()
    try:
        conn.request("GET", path, headers=_headers(key, None, None))
        resp = conn.getresponse()
        content = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, content, time.perf_counter() - t)
    finally:
        conn.close()


def open_stream(base_url: str, body: dict, *, key: str | None = None,
                timeout: float = 60) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a streaming request; read it with ``resp.read1()``, or walk away with ``conn.sock``."""
    conn = _connect(base_url, timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), _headers(key, None, None))
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def read_chunks(resp: http.client.HTTPResponse, n: int) -> bytes:
    """At least ``n`` SSE frames' worth of the stream (or all of it, if it ends first)."""
    got = b""
    while got.count(b"\n\n") < n:
        piece = resp.read1(65536)
        if not piece:
            break
        got += piece
    return got


def answer(reply: Reply) -> dict:
    """What a completion says, streamed or not: content, reasoning, finish_reason, usage (if sent)."""
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        chunks = [e for e in reply.sse() if e != "[DONE]"]
        errors = [c["error"] for c in chunks if "error" in c]
        assert not errors, errors
        choices = [c["choices"][0] for c in chunks if c.get("choices")]
        usage = next((c["usage"] for c in chunks if c.get("usage")), None)
        return {"content": "".join(ch["delta"].get("content") or "" for ch in choices),
                "reasoning": "".join(ch["delta"].get("reasoning_content") or "" for ch in choices),
                "finish_reason": choices[-1]["finish_reason"], "usage": usage}
    body = reply.json()
    message = body["choices"][0]["message"]
    return {"content": message["content"], "reasoning": message.get("reasoning_content") or "",
            "finish_reason": body["choices"][0]["finish_reason"], "usage": body["usage"]}


def health(base_url: str) -> tuple[int, dict | None]:
    """(status, body) of /health; (0, None) when nothing answers."""
    try:
        reply = get(base_url, "/health", timeout=5)
    except OSError:
        return 0, None
    try:
        return reply.status, reply.json()
    except ValueError:
        return reply.status, None


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if there are none)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())
