"""Start and stop a real server from a test: ``launch.sh`` exactly as an operator runs it (the model
ranks under the deepspeed launcher, the gunicorn front), on a free loopback port.

    server = start_server(workdir, config={"limits": {"max_prompt_tokens": 512}})
    ...  # talk to server.base_url
    server.stop()  # SIGTERM to launch.sh: it drains and must exit 0

The deployment config is written to ``workdir/config.json`` (``--config``); the IPC socket lives in
``workdir`` too, so that a server another test or engineer runs on the machine can never be
mistaken for ours.  The demo checkpoint comes from the shared demo cache (``DSQV_CACHE_DIR`` or
~/.cache/ds-qwen-vision), which launch.sh builds once and is safe to share.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Another process may take the port between our probe and gunicorn's bind; then we try another.
_PORT_TAKEN = ("Address already in use", "Connection in use")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@dataclass
class Server:
    proc: subprocess.Popen      # launch.sh
    port: int
    config: dict                # the config file it was started with
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, tail: int | None = 12000) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def health(self, timeout: float = 5) -> tuple[int, dict | None]:
        """(status, body) of GET /health; (0, None) while nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=timeout) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, None
        except OSError:
            return 0, None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to launch.sh (what a supervisor sends); it drains and must exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launch.sh did not exit within {timeout:g} s of SIGTERM\n{self.log()}") from None
        assert code == 0, f"launch.sh exited {code} after SIGTERM\n{self.log()}"
        return code

    def kill(self) -> None:
        """Last resort: launch.sh and every process under it (the ranks and the front run in their own
        sessions, so a process group would miss them), by their ids."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)


def start_server(workdir: Path, config: dict | None = None, timeout: float = 180, attempts: int = 3,
                 port: int | None = None) -> Server:
    """launch.sh with the demo model (CPU ranks, tp=2) and `config` merged over the defaults, on a
    free port (or on ``port``: a replica restarted where its proxy expects it); returns once /health is
    200 with every rank ready."""
    workdir = Path(workdir)
    fixed_port, attempts = port, (1 if port else attempts)
    # A Unix socket path must fit in 107 bytes.
    sock = workdir / "engine.sock"
    assert len(os.fsencode(str(sock))) <= 107, f"{sock} is too long for a Unix socket; use a short workdir"
    for attempt in range(attempts):
        port = fixed_port or free_port()
        cfg = _merge({"model": "demo", "device": "cpu", "dtype": "float32", "tensor_parallel": {"tp_size": 2},
                      "server": {"host": "127.0.0.1", "port": port, "ipc_socket": str(sock)}}, config or {})
        cfg["server"]["port"] = port
        (workdir / "config.json").write_text(json.dumps(cfg, indent=2))
        log_path = workdir / f"launch-{attempt}.log"
        with open(log_path, "wb") as log:  # a file, not a pipe: nobody drains a pipe while tests run
            proc = subprocess.Popen([str(REPO / "launch.sh"), "--config", str(workdir / "config.json")],
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = Server(proc, port, cfg, log_path)
        try:
            _wait_ready(server, timeout)
            return server
        except _PortTaken:
            if proc.poll() is None:
                server.kill()
            continue
        except BaseException:
            if proc.poll() is None:
                server.kill()
            raise
    raise RuntimeError(f"no free port after {attempts} attempts")


class _PortTaken(Exception):
    pass


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = server.log()
            if any(s in log for s in _PORT_TAKEN):
                raise _PortTaken()
            raise RuntimeError(f"launch.sh exited {server.proc.returncode} before the server was ready\n{log}")
        # Only once our own gunicorn has bound the port: until then another process may answer there.
        if "Listening at: " not in server.log(tail=None):
            time.sleep(0.2)
            continue
        status, body = server.health(timeout=2)
        if status == 200 and body and all(r.get("ready") for r in body["engine"]["ranks"]):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready within {timeout:g} s\n{server.log()}")
