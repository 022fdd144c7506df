"""Typed API errors and the ONE place that turns them into OpenAI error responses.

Every failure a client can see leaves through `error_response`: validation errors raised by
`protocol`, engine error events, an unreachable engine, and Flask's own HTTP errors (unknown
route, wrong method, body over ``MAX_CONTENT_LENGTH``), so a client always gets
``{"error": {"message", "type", "param", "code"}}`` and never an HTML page.  The refusals gunicorn
writes itself, before the app runs (a request line or headers over its limits, a malformed
request), leave through `raw_error_response` in the same shape (gunicorn_conf installs it).
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from ds_qwen_vision.ipc import ERROR_TYPES

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying a full queue / a restarting engine.
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_ENGINE_DOWN_S = 5


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, **kw: Any):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"}, **kw)


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"


class QueueFull(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, **kw: Any):
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL_S)}, **kw)


class EngineDown(ApiError):
    status = 503
    type = "service_unavailable_error"
    code = "engine_unavailable"

    def __init__(self, message: str, **kw: Any):
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_ENGINE_DOWN_S)}, **kw)


class InternalError(ApiError):
    status = 500
    type = "server_error"


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 413: PayloadTooLarge, 429: QueueFull, 503: EngineDown}


def from_engine_event(event: dict[str, Any]) -> ApiError:
    """An ``error`` event of the IPC stream as the matching typed error."""
    status = event.get("status")
    cls = _BY_STATUS.get(status, InternalError)  # type: ignore[arg-type]
    err = cls(str(event.get("message") or "engine error"), param=event.get("param"))
    if event.get("code"):
        err.code = event["code"]
    if event.get("type") and status in ERROR_TYPES:
        err.type = event["type"]
    return err


def error_response(err: ApiError) -> Response:
    resp = jsonify(err.body())
    resp.status_code = err.status
    for name, value in err.headers.items():
        resp.headers[name] = value
    return resp


def _from_http_exception(e: HTTPException) -> ApiError:
    """Werkzeug's errors (raised by Flask before any of our code runs) as typed errors."""
    if e.code == 404:
        return NotFound("Not found: no such route. The API is served under /v1 "
                        "(POST /v1/chat/completions, GET /v1/models).", code="not_found")
    if e.code == 405:
        allowed = getattr(e, "valid_methods", None) or []
        err = MethodNotAllowed(f"Method not allowed; this route accepts {', '.join(sorted(allowed))}.")
        if allowed:
            err.headers["Allow"] = ", ".join(sorted(allowed))
        return err
    if e.code == 413:
        return PayloadTooLarge("Request body is too large.", code="request_too_large")
    if e.code is not None and 400 <= e.code < 500:
        return ApiError(e.description or e.name, status=e.code, type="invalid_request_error")
    return InternalError(e.description or "internal server error")


def register_error_handlers(app: Flask, max_body_bytes: int) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> Response:
        return error_response(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        err = _from_http_exception(e)
        if isinstance(err, PayloadTooLarge):
            err.message = f"Request body is too large (limit {max_body_bytes} bytes)."
        return error_response(err)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(InternalError("Internal server error."))


# gunicorn's own refusals: status -> the OpenAI error code (gunicorn/workers/base.py `handle_error`).
_GUNICORN_CODES = {400: "invalid_request", 403: "forbidden", 414: "request_line_too_long", 417: "expectation_failed",
                   431: "request_headers_too_large", 501: "unsupported_transfer_coding"}


def raw_error_response(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP response (status line, headers, OpenAI error body) for a refusal gunicorn makes
    before any app code runs; ``reason`` and ``detail`` are gunicorn's (e.g. "URI Too Long",
    "Request Line is too large (8200 > 4094)"). The connection closes after it, as gunicorn's does."""
    if status == 414:
        message = (f"The request line (method, path and query string) is too long: {detail}. The API takes its "
                   "parameters in the JSON body.")
    elif status == 431:
        message = f"The request headers are too large or too many: {detail}."
    else:
        message = f"{reason}: {detail}." if detail else f"{reason}."
    err = ApiError(message, status=status, type="invalid_request_error" if status < 500 else "server_error",
                   code=_GUNICORN_CODES.get(status))
    body = json.dumps(err.body(), ensure_ascii=False).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {uuid.uuid4().hex}\r\n\r\n")
    return head.encode("latin-1") + body
