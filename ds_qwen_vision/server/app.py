"""The HTTP front: an OpenAI-compatible Flask app that holds no model.

Three thin layers (STYLE): `protocol` validates and converts, the serving functions below turn a
valid request into an engine call over the IPC socket (`EngineClient`) and its events into
OpenAI objects or SSE, and the routes map typed errors to responses through `errors`.

gunicorn builds the app with the factory (launch.sh exports the merged config first)::

    DSQV_CONFIG_JSON="$(python -m ds_qwen_vision.config --config ds_config/demo.json --dump)" \\
    gunicorn -c python:ds_qwen_vision.server.gunicorn_conf 'ds_qwen_vision.server.app:create_app_from_env()'

Imports no torch / transformers / deepspeed (a test checks): the workers stay small and start fast.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Generator, Iterator
from itertools import chain
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest,
                               multiprocess)
from werkzeug.exceptions import RequestEntityTooLarge

from ds_qwen_vision.config import DeployConfig, config_from_env
from ds_qwen_vision.ipc import EVENT_DELTA, EVENT_DONE, EVENT_ERROR, ClientGone, EngineClient, EngineUnavailable
from ds_qwen_vision.server.errors import (EngineDown, ModelNotFound, Unauthorized, from_engine_event,
                                          register_error_handlers)
from ds_qwen_vision.server.protocol import (ChatRequest, CompletionMeta, RequestLimits, assemble_tool_calls,
                                            chat_choice, chat_completion, completion_chunk, model_card, model_list,
                                            parse_chat_request, usage_chunk)

log = logging.getLogger(__name__)

# The engine's start-up phases before "ready" (serve.py), as /health's status.
STARTING_PHASES = ("loading", "warming_up")
# Routes that a load balancer / Prometheus reach without the API key.
OPEN_PATHS = frozenset({"/health", "/metrics"})
# A client's X-Request-Id is echoed if it looks like an id; otherwise the response carries a new one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# ---------------------------------------------------------------------------------------------
# Serving: engine events -> OpenAI objects
# ---------------------------------------------------------------------------------------------


Events = Generator[dict[str, Any], None, None]


def _engine_down(e: EngineUnavailable, when: str) -> EngineDown:
    # The details (socket path, errno) go to the log, not to API clients.
    log.warning("engine unavailable %s: %s", when, e)
    return EngineDown(f"The model engine is unavailable {when}; retry later.")


def _open_stream(client: EngineClient, chat: ChatRequest, client_gone=None) -> tuple[dict[str, Any], Events]:
    """Send the request and wait for its first event, so that a refusal (queue full, prompt too
    long, engine down) is still a plain HTTP error even for a streaming request."""
    # the engine names it in its log and in a 500 of this request's own (X-Request-Id on every reply)
    events = client.generate({**chat.engine_request, "request_id": g.get("request_id")}, client_gone=client_gone)
    try:
        first = next(events)
    except EngineUnavailable as e:
        raise _engine_down(e, "before generation") from None
    if first["event"] == EVENT_ERROR:
        events.close()
        raise from_engine_event(first)
    return first, events


def complete(client: EngineClient, chat: ChatRequest, meta: CompletionMeta) -> dict[str, Any]:
    # Nothing is written to the client until the end, so its leaving is noticed by watching its socket:
    # the generation is then cancelled (its slot freed) instead of running to max_tokens for nobody.
    first, events = _open_stream(client, chat, _http_client_gone(request.environ.get("gunicorn.socket")))
    n = chat.engine_request.get("n", 1)
    want_logprobs = bool(chat.engine_request.get("logprobs"))
    content: list[list[str]] = [[] for _ in range(n)]
    reasoning: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # tool-call deltas (engine/tools.py)
    finish: list[str | None] = [None] * n
    try:
        for event in chain([first], events):
            if event["event"] == EVENT_DELTA:  # of choice `index`; its last one carries its finish_reason
                i = event.get("index", 0)
                content[i].append(event.get("content") or "")
                reasoning[i].append(event.get("reasoning_content") or "")
                logprobs[i] += event.get("logprobs") or []
                calls[i] += event.get("tool_calls") or []
                finish[i] = event.get("finish_reason") or finish[i]
            elif event["event"] == EVENT_DONE:
                choices = [chat_choice(i, "".join(content[i]), "".join(reasoning[i]),
                                       finish[i] or event["finish_reason"], logprobs[i] if want_logprobs else None,
                                       assemble_tool_calls(calls[i]))
                           for i in range(n)]
                return chat_completion(meta, choices, event["usage"])
            elif event["event"] == EVENT_ERROR:
                raise from_engine_event(event)
    except EngineUnavailable as e:
        raise _engine_down(e, "during generation") from None
    finally:
        events.close()
    raise EngineDown("The model engine ended the generation without a result.")  # EngineClient prevents it


def _http_client_gone(sock: socket.socket | None):
    """A check that the HTTP client has closed its connection (None without gunicorn's socket)."""
    if sock is None:
        return None

    def gone() -> bool:
        try:  # a closed peer reads as EOF; a pipelined next request reads as data: still there
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SseStream:
    """The SSE body of a streaming completion, as a WSGI iterable.

    The request is sent and its first event awaited before the first byte (``_open_stream``).
    ``close()`` -- called by the WSGI server when the HTTP client goes away, even before the
    first chunk was sent -- closes the IPC socket, which the engine sees as a cancellation.
    """

    def __init__(self, client: EngineClient, chat: ChatRequest, meta: CompletionMeta):
        self._first, self._events = _open_stream(client, chat)
        self._chat, self._meta = chat, meta

    def __iter__(self) -> Iterator[str]:
        meta, usage_field = self._meta, self._chat.include_usage
        n = self._chat.engine_request.get("n", 1)
        finished: set[int] = set()
        try:
            for i in range(n):
                yield _sse(completion_chunk(meta, {"role": "assistant", "content": ""}, with_usage_field=usage_field,
                                            index=i))
            for event in chain([self._first], self._events):
                if event["event"] == EVENT_DELTA:  # of choice `index`; its last one carries its finish_reason
                    i = event.get("index", 0)
                    delta = {k: event[k] for k in ("content", "reasoning_content", "tool_calls") if event.get(k)}
                    if delta or event.get("logprobs"):
                        yield _sse(completion_chunk(meta, delta, with_usage_field=usage_field, index=i,
                                                    logprobs=event.get("logprobs")))
                    if event.get("finish_reason"):
                        finished.add(i)
                        yield _sse(completion_chunk(meta, {}, event["finish_reason"], with_usage_field=usage_field,
                                                    index=i))
                elif event["event"] == EVENT_DONE:
                    for i in range(n):
                        if i not in finished:
                            yield _sse(completion_chunk(meta, {}, event["finish_reason"],
                                                        with_usage_field=usage_field, index=i))
                    if usage_field:
                        yield _sse(usage_chunk(meta, event["usage"]))
                    break
                elif event["event"] == EVENT_ERROR:
                    # The status line is long gone: the error travels in the stream.
                    yield _sse(from_engine_event(event).body())
                    break
        except EngineUnavailable as e:
            yield _sse(_engine_down(e, "during generation").body())
        finally:
            self.close()
        yield "data: [DONE]\n\n"

    def close(self) -> None:
        self._events.close()


# ---------------------------------------------------------------------------------------------
# Metrics of the front
# ---------------------------------------------------------------------------------------------


class FrontMetrics:
    """Requests by route and status, and latency, of this front.

    With several gunicorn workers each is its own process, so prometheus_client's multiprocess
    mode (``PROMETHEUS_MULTIPROC_DIR``, set by gunicorn_conf) aggregates them from files.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Multiprocess metrics are collected from the files, so they register nowhere.
        target = None if multiproc else self.registry
        self.requests = Counter("dsqv_front_requests", "HTTP requests answered by the front",
                                ["route", "method", "status"], registry=target)
        self.latency = Histogram("dsqv_front_request_duration_seconds",
                                 "Time from request to the end of the response body (streams included)",
                                 ["route"], registry=target,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        if multiproc:
            multiprocess.MultiProcessCollector(self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(config: DeployConfig, client: EngineClient | None = None) -> Flask:
    if client is None:
        client = EngineClient(config.socket_path(), read_timeout=config.server.timeout_s)
    limits = RequestLimits.from_config(config)
    api_key = config.api_key()
    metrics = FrontMetrics()
    started = int(time.time())

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_error_handlers(app, config.server.max_body_bytes)

    @app.errorhandler(ClientGone)
    def _client_left(e: ClientGone) -> Response:
        log.info("client left before its completion was ready; generation cancelled")
        return Response(status=499)  # nginx's "client closed request": nobody reads it

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()
        sent = request.headers.get("X-Request-Id", "")
        g.request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex

    @app.before_request
    def _authenticate() -> None:
        if api_key is None or request.path in OPEN_PATHS:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        try:
            # WSGI hands headers over as latin-1-decoded text: this gives back the bytes sent.
            sent = token.strip().encode("latin-1")
        except UnicodeEncodeError:
            sent = b""
        if not hmac.compare_digest(sent, api_key.encode()):
            raise Unauthorized("Incorrect API key provided.")

    @app.after_request
    def _record(resp: Response) -> Response:
        # The rule, not the path: unknown paths must not create one time series each.
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        metrics.requests.labels(route, request.method, str(resp.status_code)).inc()
        started_at = g.get("started", time.perf_counter())
        resp.call_on_close(lambda: metrics.latency.labels(route).observe(time.perf_counter() - started_at))
        # Every answer, errors included, names the request it answers (for logs and for clients' retries).
        resp.headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        return resp

    planned: list[RequestLimits] = []  # `limits` with the memory planner's prompt limit, once the engine has one

    def request_limits() -> RequestLimits:
        """limits.max_prompt_tokens null is decided by the memory planner at start-up: its figure comes from the
        engine's health (`memory`), asked until it is there, so that images can be counted against it early."""
        if limits.max_prompt_tokens is not None or limits.image_tokens is None:
            return limits
        if not planned:
            try:
                figure = (client.health().get("memory") or {}).get("max_prompt_tokens")
            except EngineUnavailable:
                figure = None
            if not isinstance(figure, int):
                return limits  # not planned yet: the engine refuses requests until it is ready anyway
            planned.append(dataclasses.replace(limits, max_prompt_tokens=figure))
        return planned[0]

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        chat = parse_chat_request(_request_body(config.server.max_body_bytes), request_limits())
        meta = CompletionMeta.new(chat.model)
        if chat.stream:
            return Response(SseStream(client, chat, meta), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return jsonify(complete(client, chat, meta))

    @app.get("/v1/models")
    def models() -> Response:
        return jsonify(model_list(limits.served_model_name, started))

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str) -> Response:
        if model_id != limits.served_model_name:
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
        return jsonify(model_card(model_id, started))

    @app.get("/health")
    def health() -> tuple[Response, int]:
        try:
            engine = client.health()
        except EngineUnavailable as e:
            log.warning("health: engine unavailable: %s", e)
            return jsonify({"status": "unavailable", "error": "engine unreachable", "engine": None}), 503
        if engine_ready(engine):
            return jsonify({"status": "ok", "engine": engine}), 200
        # Starting up (the engine's phase: loading, then warming_up) is not a failure: say which.
        phase = engine.get("phase") if engine.get("alive", True) else None
        status = phase if phase in STARTING_PHASES else "unavailable"
        return jsonify({"status": status, "engine": engine}), 503

    @app.get("/metrics")
    def prometheus() -> Response:
        body = metrics.render()
        try:
            engine_text = client.metrics()
        except EngineUnavailable:
            engine_text = ""  # the front's own metrics are still worth scraping
        if engine_text:
            body += engine_text.encode() + (b"" if engine_text.endswith("\n") else b"\n")
        return Response(body, mimetype=CONTENT_TYPE_LATEST)

    return app


def _request_body(max_bytes: int) -> bytes:
    """The request body; a 413 when it is over ``max_bytes``, chunked bodies included.

    With a Content-Length werkzeug refuses an oversized body itself (MAX_CONTENT_LENGTH); a chunked
    body has none, and werkzeug's stream then stops *silently* at the limit, which would make a
    too-large body look like truncated JSON.  One more byte from the server's stream tells the two
    apart.
    """
    body = request.get_data(cache=False)
    if request.content_length is None and len(body) >= max_bytes and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return body


def engine_ready(health: dict[str, Any]) -> bool:
    """Ready only if the engine lists its ranks and every one of them says ``ready: true``."""
    ranks = health.get("ranks")
    return (health.get("ready", True) is True and isinstance(ranks, list) and len(ranks) > 0
            and all(isinstance(r, dict) and r.get("ready") is True for r in ranks))


def create_app_from_env() -> Flask:
    """gunicorn's factory: the config comes from ``DSQV_CONFIG_JSON`` (or ``DSQV_CONFIG``)."""
    return create_app(config_from_env())

