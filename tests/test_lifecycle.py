"""A deployment's start and end, against launch.sh (server_fixture): a start-up stuck past
server.startup_timeout_s ends it (non-zero, rank 0 says why), and nothing outlives launch.sh, however it
ends (kill -9 mid-request): no process of it, its port free, its socket, pid file and /dev/shm buffers gone."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import time

import psutil
import pytest
from chat_http import chat, open_stream, read_chunks
from server_fixture import start_server

from ds_qwen_vision import lifeline
from ds_qwen_vision.config import DEMO_SERVED_NAME
from ds_qwen_vision.serve import STALL_ENV, StartupWatchdog

pytestmark = pytest.mark.slow  # multi-process (pyproject.toml: the fast tier runs -m "not slow")

LIMITS = {"max_prompt_tokens": 512, "max_new_tokens": 1024, "max_concurrent": 1}


def leftovers(workdir, port: int, master_port: int | None, procs=(), timeout: float = 10) -> dict:
    """What of a deployment is still there after `timeout` s: processes (of `procs`, or naming `workdir` on
    their command line), its socket and pid file, DeepSpeed's shared-memory buffers, a port nobody can bind."""
    deadline = time.monotonic() + timeout

    def running() -> list[str]:
        out = []
        for p in {*procs, *(p for p in psutil.process_iter() if str(workdir) in " ".join(_cmdline(p)))}:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:  # a zombie holds nothing; its parent reaps it
                    out.append(f"{p.pid} {' '.join(_cmdline(p))}")
            except psutil.NoSuchProcess:
                pass
        return out

    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {"processes": running(), "files": [str(f) for f in (workdir / "engine.sock", workdir / "engine.sock.pid")
                                              if os.path.lexists(f)]}
    if master_port is not None:
        left["files"] += glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_port}_*")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT connections stay
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            left["port"] = str(e)
    return {k: v for k, v in left.items() if v}


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def test_launch_sh_killed_mid_request_leaves_nothing_behind(tmp_path):
    server = start_server(tmp_path, {"limits": LIMITS})
    root = psutil.Process(server.proc.pid)
    tree = root.children(recursive=True)
    master_port = next(int(m.group(1)) for p in tree if (m := re.search(r"--master_port[= ](\d+)", " ".join(_cmdline(p)))))
    try:
        assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_port}_*") == []  # unlinked once joined
        conn, stream = open_stream(server.base_url, chat(DEMO_SERVED_NAME, "What is the capital of France?",
                                                      max_tokens=1024, temperature=0))
        read_chunks(stream, 4)  # generating
        server.proc.send_signal(signal.SIGKILL)  # not reaped until the end: a zombie, as under a slow supervisor
        t0 = time.monotonic()
        conn.close()
        left = leftovers(tmp_path, server.port, master_port, tree, timeout=10)
        assert not left, left
        assert time.monotonic() - t0 < 10
        assert "launch.sh is gone" in server.log(tail=None)
    finally:
        server.proc.kill()
        for p in tree:  # whatever survived a failure of the test
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        server.proc.wait(timeout=30)


def test_a_start_up_stuck_past_its_deadline_exits_nonzero_and_says_why(tmp_path, monkeypatch):
    """A follower stuck after loading (the test's hook: it sleeps): rank 0 waits in the memory planner's
    all-reduce until server.startup_timeout_s, counted from the process's start, then exits 1; the launcher
    stops the follower, launch.sh exits non-zero and nothing is left."""
    timeout_s = 25
    monkeypatch.setenv(STALL_ENV, "600")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="launch.sh exited 1 before the server was ready") as failed:
        start_server(tmp_path, {"server": {"startup_timeout_s": timeout_s}, "limits": LIMITS}, timeout=timeout_s + 60,
                     attempts=1)
    assert timeout_s < time.monotonic() - t0 < timeout_s + 30
    log = (tmp_path / "launch-0.log").read_text()
    # where rank 0 waits for the follower depends on the collectives of the start-up
    assert re.search(rf"\[rank 0\] start-up took longer than server.startup_timeout_s = {timeout_s} s, still "
                     r"(loading the checkpoint|planning memory|building the runner \(capturing its graphs\)) "
                     r"\(a rank is stuck or slow\); exiting", log), str(failed.value)[-3000:]
    port = json.loads((tmp_path / "config.json").read_text())["server"]["port"]
    assert not leftovers(tmp_path, port, None, timeout=10)


def test_the_startup_watchdog_counts_from_the_process_start_and_stands_down_when_done():
    fired = []
    age = lifeline.age_s()
    assert 0 < age < 3600
    late = StartupWatchdog(age + 0.3, fired.append)  # 0.3 s from now
    late.phase = "warming up"
    late.start()
    done = StartupWatchdog(age + 0.3, fired.append)
    done.start()
    done.done.set()
    late.join(5)
    done.join(5)
    assert fired == [f"start-up took longer than server.startup_timeout_s = {age + 0.3:g} s, still warming up "
                     "(a rank is stuck or slow)"]


def test_a_rank_leaves_when_its_launcher_dies_even_unreaped(monkeypatch):
    """A killed launch.sh stays a zombie until its parent waits for it: gone all the same."""
    import subprocess
    import sys

    launcher = subprocess.Popen(["sleep", "60"])
    rank = subprocess.Popen([sys.executable, "-c", "import os, time; from ds_qwen_vision import lifeline; "
                             "lifeline.watch_launcher(lambda: os._exit(3), poll_s=0.05); time.sleep(60)"],
                            env=dict(os.environ, **{lifeline.LAUNCHER_ENV: str(launcher.pid)}))
    try:
        time.sleep(1)
        assert rank.poll() is None  # watching a live launcher
        launcher.kill()
        assert rank.wait(timeout=5) == 3
        assert psutil.Process(launcher.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        rank.kill()
        launcher.kill()
        launcher.wait()
    assert not lifeline.alive(os.getppid() + 10**7)  # no such process
    monkeypatch.delenv(lifeline.LAUNCHER_ENV, raising=False)
    assert lifeline.watch_launcher(lambda: None) is None  # a test's or the generate command's ranks
