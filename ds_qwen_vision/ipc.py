"""Local IPC between the HTTP front (gunicorn workers) and rank 0 (the engine).

Newline-delimited JSON over a Unix stream socket, one connection per call. Every line is one
UTF-8 JSON object ending in ``\\n`` (JSON escapes newlines inside strings, so a line is a message):

    front -> engine   {"op": "generate", "request": {...}} | {"op": "health"} | {"op": "metrics"}
    engine -> front   generate: event lines (below) up to and including a terminal one, then the
                      engine closes the connection;
                      health / metrics: one line, {"result": ...} or {"error": "message"}.

Events of a generate stream: one typed contract, built with the helpers below by the engine (and the
tests' fake engine) and checked by `EngineClient` (`check_event`) before the front reads them::

    {"event": "error", "status": 400|413|429|500|503, "type": str, "message": str,
     "param": str|None, "code": str|None}
    {"event": "start", "prompt_tokens": int}
    {"event": "delta", "index": int, "content": str, "reasoning_content": str,     # either text may be ""
     ["tool_calls": [OpenAI tool-call delta, ...]], ["logprobs": [OpenAI logprob entry, ...]],
     ["finish_reason": "stop"|"length"|"tool_calls"]}                           # choice `index` ended
    {"event": "done", "finish_reason": "stop"|"length"|"tool_calls",
     "usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int,
               ["prompt_tokens_details": {"cached_tokens": int}]}}

A stream is ``error`` alone, or ``start delta* done``; an ``error`` may also end a stream after
``start`` (the engine failed mid-generation, or this request's own host work raised: a 500
``internal_error`` whose message names the request id found in the engine's log).  ``done`` and
``error`` are terminal. A request with ``n`` choices streams the deltas of all of them (``index``), each
choice's last delta carrying its ``finish_reason``.

Cancellation: the front writes nothing after its request line, so the engine side reading EOF
means the front went away (its client disconnected).  `IpcServer` then calls ``.close()`` on the
handler's generator, which raises ``GeneratorExit`` at its ``yield`` so that the engine can drop
the request.  It checks before every write, on a failed write, and on *idle ticks*: a handler's
generator may ``yield None`` while it waits for the next event (every ~0.25 s), which lets the
server poll the socket and close the generator within ~0.5 s of a silent disconnect.  (A generator
blocked inside ``next()`` cannot be closed from another thread, hence ticks rather than a watcher.)

Stdlib only: this module is imported by the torch-free front and by rank 0.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------

EVENT_ERROR = "error"
EVENT_START = "start"
EVENT_DELTA = "delta"
EVENT_DONE = "done"
TERMINAL_EVENTS = frozenset({EVENT_ERROR, EVENT_DONE})
FINISH_REASONS = ("stop", "length", "tool_calls")

# OpenAI error ``type`` for each status an engine error may carry.
ERROR_TYPES = {
    400: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def error_event(status: int, message: str, *, type: str | None = None, param: str | None = None,
                code: str | None = None) -> dict[str, Any]:
    if status not in ERROR_TYPES:
        raise ValueError(f"error status must be one of {sorted(ERROR_TYPES)}, not {status}")
    return {"event": EVENT_ERROR, "status": status, "type": type or ERROR_TYPES[status],
            "message": message, "param": param, "code": code}


def start_event(prompt_tokens: int) -> dict[str, Any]:
    return {"event": EVENT_START, "prompt_tokens": prompt_tokens}


def delta_event(content: str = "", reasoning_content: str = "", *, index: int = 0,
                tool_calls: list[dict[str, Any]] | None = None, logprobs: list[dict[str, Any]] | None = None,
                finish_reason: str | None = None) -> dict[str, Any]:
    """Text of choice `index`; the optional fields only when present (`logprobs` also when empty: the request
    asked for them and these tokens' entries come later)."""
    event: dict[str, Any] = {"event": EVENT_DELTA, "index": index, "content": content,
                             "reasoning_content": reasoning_content}
    if tool_calls:
        event["tool_calls"] = tool_calls
    if logprobs is not None:
        event["logprobs"] = logprobs
    if finish_reason is not None:
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, not {finish_reason!r}")
        event["finish_reason"] = finish_reason
    return event


def done_event(finish_reason: str, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int | None = None) -> dict[str, Any]:
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, not {finish_reason!r}")
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return {"event": EVENT_DONE, "finish_reason": finish_reason, "usage": usage}


def is_terminal(event: dict[str, Any]) -> bool:
    return event.get("event") in TERMINAL_EVENTS


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_event(event: Any) -> dict[str, Any]:
    """`event` if it is one of the contract's events, else ValueError naming what is wrong (per token on the
    front: a few dictionary look-ups, no schema library)."""
    kind = event.get("event") if isinstance(event, dict) else None
    if kind == EVENT_DELTA:
        ok = _is_int(event.get("index")) and isinstance(event.get("content"), str) and \
            isinstance(event.get("reasoning_content"), str) and \
            isinstance(event.get("tool_calls", []), list) and isinstance(event.get("logprobs", []), list) and \
            event.get("finish_reason", "stop") in FINISH_REASONS
    elif kind == EVENT_START:
        ok = _is_int(event.get("prompt_tokens"))
    elif kind == EVENT_DONE:
        usage = event.get("usage")
        ok = event.get("finish_reason") in FINISH_REASONS and isinstance(usage, dict) and \
            all(_is_int(usage.get(k)) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    elif kind == EVENT_ERROR:
        ok = event.get("status") in ERROR_TYPES and isinstance(event.get("message"), str)
    else:
        raise ValueError(f"unknown event: {str(event)[:200]}")
    if not ok:
        raise ValueError(f"malformed {kind} event: {str(event)[:200]}")
    return event


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------

# A generate request carries its images base64-encoded; the front's body limit bounds it well
# below this.  The cap only stops a runaway peer from exhausting memory.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE as an exception, never a SIGPIPE


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class _LineReader:
    """Reads ``\\n``-terminated messages from a socket (socket.makefile would keep the fd open
    after ``close()`` and leaves its buffer undefined after a timeout)."""

    def __init__(self, sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES):
        self._sock = sock
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline (a request can be 20+ MB)
        self._max = max_bytes

    def read_message(self) -> dict[str, Any] | None:
        """The next message, or None on a clean EOF between messages."""
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("message is not a JSON object")
                return message
            self._scanned = len(self._buf)
            if len(self._buf) > self._max:
                raise ValueError(f"message larger than {self._max} bytes")
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                if self._buf:
                    raise ValueError("connection closed in the middle of a message")
                return None
            self._buf += chunk


# ---------------------------------------------------------------------------------------------
# Client (the HTTP front)
# ---------------------------------------------------------------------------------------------


POLL_S = 0.5  # how often a waiting generate checks whether its HTTP client is still there


class ClientGone(Exception):
    """The HTTP client left while its (non-streamed) generation was waiting for events."""


class EngineUnavailable(Exception):
    """The engine cannot be reached, hung up mid-call, or did not answer in time."""


class EngineClient:
    """Calls rank 0 over its Unix socket; one connection per call, so it is thread-safe.

    ``read_timeout`` bounds the wait for each message of a generate stream (None: forever; a
    queued request may legitimately wait long before its ``start``); ``unary_timeout`` bounds
    health and metrics calls, which the engine answers from a side thread.
    """

    def __init__(self, socket_path: str, connect_timeout: float = 2.0, read_timeout: float | None = None,
                 unary_timeout: float = 10.0):
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.unary_timeout = unary_timeout

    def generate(self, request: dict[str, Any],
                 client_gone: Callable[[], bool] | None = None) -> Generator[dict[str, Any], None, None]:
        """Events of one generation, up to and including the terminal one.

        Connects on the first ``next()``.  ``close()`` on the returned generator closes the
        socket, which the engine sees as a cancellation. ``client_gone``, checked every
        ``POLL_S`` while waiting for an event, ends the generation the same way (raising
        ClientGone) once it says the caller's own client has left.
        """
        sock = self._connect()
        try:
            self._send(sock, {"op": "generate", "request": request}, self.read_timeout)
            reader = _LineReader(sock)
            checked = time.monotonic()
            while True:
                event = self._read(sock, reader, self.read_timeout, client_gone)
                if client_gone is not None and time.monotonic() - checked >= POLL_S:  # events keep coming
                    checked = time.monotonic()
                    if client_gone():
                        raise ClientGone("the HTTP client closed its connection")
                try:
                    check_event(event)
                except ValueError as e:
                    raise EngineUnavailable(f"engine sent {e}") from None
                yield event
                if is_terminal(event):
                    return
        finally:
            _close(sock)

    def health(self) -> dict[str, Any]:
        result = self._call("health")
        if not isinstance(result, dict):
            raise EngineUnavailable("engine health is not a JSON object")
        return result

    def metrics(self) -> str:
        result = self._call("metrics")
        if not isinstance(result, str):
            raise EngineUnavailable("engine metrics are not text")
        return result

    def _call(self, op: str) -> Any:
        sock = self._connect()
        try:
            self._send(sock, {"op": op}, self.unary_timeout)
            reply = self._read(sock, _LineReader(sock), self.unary_timeout)
        finally:
            _close(sock)
        if "error" in reply:
            raise EngineUnavailable(f"engine {op} failed: {reply['error']}")
        return reply.get("result")

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:  # missing file, refused (no listener), permission, timeout
            sock.close()
            raise EngineUnavailable(f"engine is not reachable at {self.socket_path}: {e.strerror or e}") from None
        return sock

    def _send(self, sock: socket.socket, message: dict[str, Any], timeout: float | None) -> None:
        sock.settimeout(timeout)
        try:
            sock.sendall(_encode(message), _SEND_FLAGS)
        except OSError as e:
            raise EngineUnavailable(f"engine connection lost while sending: {e.strerror or e}") from None

    def _read(self, sock: socket.socket, reader: _LineReader, timeout: float | None,
              client_gone: Callable[[], bool] | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
                sock.settimeout(left if client_gone is None else min(POLL_S, left or POLL_S))
                try:
                    message = reader.read_message()  # its buffer survives a timeout mid-message
                    break
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    if client_gone is not None and client_gone():
                        raise ClientGone("the HTTP client closed its connection") from None
        except TimeoutError:
            raise EngineUnavailable(f"engine did not answer within {timeout:g} s") from None
        except OSError as e:
            raise EngineUnavailable(f"engine connection lost: {e.strerror or e}") from None
        except ValueError as e:  # bad JSON or framing
            raise EngineUnavailable(f"engine sent a malformed message: {e}") from None
        if message is None:
            raise EngineUnavailable("engine closed the connection before finishing")
        return message


def _close(sock: socket.socket) -> None:
    # shutdown first: the peer sees EOF at once even if another reference keeps the fd alive.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------------------------
# Server (rank 0)
# ---------------------------------------------------------------------------------------------


class EngineHandler(Protocol):
    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any] | None]: ...
    def health(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...


class IpcServer:
    """Serves ``handler`` on a Unix socket: a background accept thread, one thread per connection."""

    def __init__(self, socket_path: str, handler: EngineHandler, *, poll_interval: float = 0.25,
                 request_timeout: float = 30.0, send_timeout: float = 60.0):
        self.socket_path = socket_path
        self.handler = handler
        self.poll_interval = poll_interval      # accept loop wake-up (how fast close() returns)
        self.request_timeout = request_timeout  # for the front's request line to arrive
        self.send_timeout = send_timeout        # a front that reads nothing this long is gone
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> IpcServer:
        _remove_stale_socket(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            # Before listen(): until then a connect is refused, so no one gets in under the umask.
            os.chmod(self.socket_path, 0o600)
            self._inode = os.stat(self.socket_path).st_ino
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.settimeout(self.poll_interval)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="ipc-accept", daemon=True)
        self._thread.start()
        log.info("IPC server listening on %s", self.socket_path)
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:  # only our own socket file: a newer server may have replaced it
                if os.stat(self.socket_path).st_ino == self._inode:
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # their threads see a failed write / EOF and close the generators
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> IpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                log.exception("IPC accept failed")
                self._stopping.wait(self.poll_interval)
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="ipc-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.request_timeout)
            try:
                message = _LineReader(conn).read_message()
            except (OSError, ValueError) as e:
                log.warning("IPC: bad request line: %s", e)
                return
            if message is None:
                return
            conn.settimeout(self.send_timeout)
            op = message.get("op")
            if op == "generate":
                self._stream(conn, message.get("request"))
            elif op in ("health", "metrics"):
                self._unary(conn, op)
            else:
                _send_quietly(conn, {"error": f"unknown op {op!r}"})
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)

    def _unary(self, conn: socket.socket, op: str) -> None:
        try:
            reply = {"result": getattr(self.handler, op)()}
            data = _encode(reply)
        except Exception as e:  # the front turns this into 503; the engine keeps serving
            log.exception("IPC %s failed", op)
            data = _encode({"error": f"{type(e).__name__}: {e}"})
        _send_quietly(conn, data)

    def _stream(self, conn: socket.socket, request: Any) -> None:
        if not isinstance(request, dict):
            _send_quietly(conn, error_event(400, "generate needs a request object"))
            return
        peer = _PeerWatch(conn)
        events = None
        try:
            events = iter(self.handler.generate(request))
            for event in events:
                if peer.gone():
                    log.info("IPC: front disconnected; cancelling the request")
                    return
                if event is None:  # idle tick: only here to let us poll the peer
                    continue
                try:
                    conn.sendall(_encode(event), _SEND_FLAGS)
                except OSError:
                    log.info("IPC: write to the front failed; cancelling the request")
                    return
                if is_terminal(event):
                    return
            _send_quietly(conn, error_event(500, "the engine ended the stream without a result"))
        except Exception:
            log.exception("IPC: engine generate failed")
            _send_quietly(conn, error_event(500, "internal engine error"))
        finally:
            # After a terminal event this is a no-op for a well-behaved generator; after a
            # disconnect it raises GeneratorExit at the handler's yield.
            close = getattr(events, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("IPC: closing the engine generator failed")


class _PeerWatch:
    """Non-blocking EOF check: the front never writes after its request, so readable == gone."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self._poll = select.poll()  # not select(): fds above 1023 are fine
        self._poll.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0))

    def gone(self) -> bool:
        return bool(self._poll.poll(0))


def _send_quietly(conn: socket.socket, message: dict[str, Any] | bytes) -> None:
    try:
        conn.sendall(message if isinstance(message, bytes) else _encode(message), _SEND_FLAGS)
    except OSError:
        pass  # the front is gone; nothing to tell it


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse if a live one answers on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listening: stale
        return
    finally:
        probe.close()
    raise RuntimeError(f"another process is already serving on {path}")
