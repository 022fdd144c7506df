"""Two replicas behind HAProxy (deploy/haproxy.cfg, as shipped), under load, while one is killed and the
other drained: nothing is lost.

Two demo deployments (launch.sh, 2 CPU ranks each) on one host, the proxy in front, CLIENTS clients sending
short greedy completions (a quarter streamed) through the proxy, each with its own X-Request-Id. Mid-load:

1. ``kill -9`` of replica A's follower rank. A fails what it holds and exits non-zero; the proxy takes it
   out of the pool and sends everything to B. Then A is restarted on its port (what its supervisor does)
   and rejoins once its /health says ready.
2. SIGTERM to replica B: it drains and exits 0, the proxy takes it out, everything goes to A.

Every request is answered exactly once, with its own id: the right answer (the same greedy completion each
replica gives the prompt alone), or a documented refusal (429 queue_full / 503 with Retry-After). Streams
that were running or queued on A when its rank died are the only requests allowed to fail (their 200 was
already sent: they end with a rank_lost / engine_down error event); every non-streamed request is answered
200 or 429, because the proxy retries a replica's 503s and refused connections on the other replica.  The
proxy's log (one line per request: id, replica, status, retries) shows where each request went: nothing to
A between its death and its return, nothing to B once it is drained.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from chat_http import answer, chat, post, sse_events
from server_fixture import REPO, free_port, start_server

from ds_qwen_vision.config import DEMO_SERVED_NAME

pytestmark = pytest.mark.slow  # multi-process (pyproject.toml: the fast tier runs -m "not slow")

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
if HAPROXY is None:
    if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure, not a skip
        raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)

CLIENTS = 6
MAX_TOKENS = 6
PROMPTS = ["hi", "What is the capital of France?", "The quick brown fox", "Count to ten"]
CONFIG = {
    "server": {"threads": 16, "step_timeout_s": 3, "shutdown_grace_s": 5},
    "limits": {"max_queue": 4, "max_concurrent": 2, "max_prompt_tokens": 128, "max_new_tokens": 16},
}
HELD = CONFIG["limits"]["max_queue"] + CONFIG["limits"]["max_concurrent"]  # requests one replica can hold
# What a replica or the proxy may refuse with (README "Operating it", deploy/haproxy.cfg).
DOCUMENTED = {429: {"queue_full"}, 503: {"shutting_down", "engine_down", "rank_lost", "engine_unavailable",
                                         "no_replica_ready"}}


class Proxy:
    def __init__(self, workdir: Path, replicas: list[int]):
        self.port, self.admin = free_port(), str(workdir / "haproxy.sock")
        env = dict(os.environ, DSQV_PROXY_BIND=f"127.0.0.1:{self.port}", DSQV_HAPROXY_ADMIN=self.admin,
                   DSQV_DEPLOY_DIR=str(REPO / "deploy"),
                   **{f"DSQV_REPLICA_{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(replicas)})
        self.log_path = workdir / "haproxy.log"
        with open(self.log_path, "wb") as log:
            # -db: in the foreground, logging to stdout (the shipped config's `log stdout`).
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(REPO / "deploy" / "haproxy.cfg")], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """{server: status} of the replicas' backend, from the admin socket ("UP", "DOWN", "UP 1/2", ...)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.admin)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"] != "BACKEND"}

    def wait_state(self, server: str, state: str, timeout: float) -> float:
        t0 = time.monotonic()
        while self.states().get(server) != state:
            assert time.monotonic() - t0 < timeout, f"{server} not {state} within {timeout} s: {self.states()}"
            time.sleep(0.1)
        return time.monotonic() - t0

    def requests(self) -> list[dict[str, str]]:
        """The proxy's log lines for requests, as dicts (rid, status, server, retries, time_ms)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("rid="):
                fields = dict(kv.split("=", 1) for kv in line.split(" ")[:5])
                out.append(fields)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def body(prompt: str, stream: bool) -> dict:
    fields = {"max_tokens": MAX_TOKENS, "temperature": 0}
    if stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    return chat(DEMO_SERVED_NAME, prompt, **fields)


def follower(server) -> psutil.Process:
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    (rank1,) = [p for p in tree if "--local_rank=1" in p.cmdline()]
    return rank1


def test_replicas_behind_the_proxy_lose_nothing_when_one_is_killed_and_one_drained(tmp_path):
    dirs = {name: tmp_path / name for name in ("a", "b", "a2")}
    for d in dirs.values():
        d.mkdir()
    with ThreadPoolExecutor(2) as pool:  # both load at once
        a, b = pool.map(lambda d: start_server(d, CONFIG, timeout=300), [dirs["a"], dirs["b"]])
    servers = [a, b]
    proxy = Proxy(tmp_path, [a.port, b.port])
    try:
        proxy.wait_state("r1", "UP", 20)
        proxy.wait_state("r2", "UP", 20)
        # Both replicas give each prompt the same answer: any of them may serve any request.
        reference = {p: answer(post(a.base_url, body(p, False))) for p in PROMPTS}
        assert {p: answer(post(b.base_url, body(p, False))) for p in PROMPTS} == reference

        records: list[dict] = []
        lock, done = threading.Lock(), threading.Event()

        def client(c: int) -> None:
            n = 0
            while not done.is_set():
                rid, prompt, stream = f"c{c}-r{n}", PROMPTS[(c + n) % len(PROMPTS)], (c + n) % 4 == 0
                record = {"id": rid, "prompt": prompt, "stream": stream, "t0": time.monotonic()}
                try:
                    record["reply"] = post(proxy.base_url, body(prompt, stream), request_id=rid, timeout=60)
                except Exception as e:  # a hang or a dropped connection: both are failures
                    record["exception"] = repr(e)
                record["t1"] = time.monotonic()
                with lock:
                    records.append(record)
                n += 1
                if record.get("reply") is not None and record["reply"].status in (429, 503):
                    time.sleep(0.2)  # a client honours Retry-After (shortened: the test is bounded)

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        # Load on both replicas before anything goes wrong.
        deadline = time.monotonic() + 60
        while min(Counter(line["server"] for line in proxy.requests() if line["status"] == "200")[s]
                  for s in ("r1", "r2")) < 2:
            assert time.monotonic() < deadline, f"the proxy did not spread the load: {proxy.requests()}"
            time.sleep(0.2)

        # 1. kill -9 of a rank of A.
        t_kill = time.monotonic()
        follower(a).kill()
        code = a.proc.wait(timeout=45)
        assert code not in (0, 2), f"launch.sh exited {code}: a supervisor must see a crash\n{a.log()}"
        proxy.wait_state("r1", "DOWN", 10)
        t_a_out = time.monotonic()
        time.sleep(2)
        a2 = start_server(dirs["a2"], CONFIG, timeout=300, port=a.port)  # its supervisor restarts it on its port
        servers.append(a2)
        proxy.wait_state("r1", "UP", 20)
        t_a_back = time.monotonic()
        time.sleep(3)

        # 2. SIGTERM to B: it drains and exits 0.
        t_drain = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        proxy.wait_state("r2", "DOWN", 10)
        t_b_out = time.monotonic()
        assert b.proc.wait(timeout=30) == 0, b.log()
        time.sleep(3)
        done.set()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        t_end = time.monotonic()
        a2.stop()
    finally:
        proxy.stop()
        for s in servers:
            if s.proc.poll() is None:
                s.kill()

    t00 = records[0]["t0"] if records else 0
    print(f"\ntimeline (s from the first request): kill {t_kill - t00:.1f}, A out {t_a_out - t00:.1f}, "
          f"A back {t_a_back - t00:.1f}, drain {t_drain - t00:.1f}, B out {t_b_out - t00:.1f}, end {t_end - t00:.1f}")
    # Every request answered, once, with its own id.
    assert not [r for r in records if "exception" in r], [r for r in records if "exception" in r][:3]
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["reply"].headers.get("x-request-id") == r["id"] for r in records)
    logged = proxy.requests()
    by_id = {line["rid"]: line for line in logged}
    assert Counter(line["rid"] for line in logged if line["rid"].startswith("c")) == Counter(r["id"] for r in records)

    status = Counter()
    cut_streams = []
    for r in records:
        reply = r["reply"]
        status[reply.status] += 1
        if reply.status == 200:
            if r["stream"] and any("error" in e for e in sse_events(reply.body.decode()) if e != "[DONE]"):
                error = [e for e in reply.sse() if e != "[DONE]" and "error" in e][-1]["error"]
                cut_streams.append((r, error))
                continue
            got = answer(reply)
            want = reference[r["prompt"]]
            assert (got["content"], got["finish_reason"]) == (want["content"], want["finish_reason"]), r["id"]
        else:
            assert reply.status in DOCUMENTED and reply.error["code"] in DOCUMENTED[reply.status], (r["id"], reply.body)
            assert reply.headers.get("retry-after"), (r["id"], reply.headers)
            assert r["stream"] or reply.status == 429, f"a non-streamed request was refused: {r['id']} {reply.body}"

    # The only requests that fail: streams A held when its rank died (running or queued: at most HELD).
    assert len(cut_streams) <= HELD, cut_streams
    for r, error in cut_streams:
        assert error["code"] in ("rank_lost", "engine_down"), error
        assert r["t0"] < t_a_out and r["t1"] > t_kill and by_id[r["id"]]["server"] == "r1", r

    # Where the requests went: both replicas before; only B while A was out; only A once B was out.
    def servers_of(t_from: float, t_to: float) -> Counter:
        return Counter(by_id[r["id"]]["server"] for r in records if t_from <= r["t0"] and r["t1"] <= t_to)

    before, a_out, b_out = servers_of(0, t_kill), servers_of(t_a_out, t_a_back - 0.5), servers_of(t_b_out, t_end)
    assert before["r1"] > 0 and before["r2"] > 0, before
    assert set(a_out) == {"r2"} and set(b_out) == {"r1"}, (a_out, b_out)
    retried = sum(int(line["retries"].lstrip("+")) > 0 for line in logged if line["rid"].startswith("c"))
    print(f"\n{len(records)} requests: {dict(status)}; {len(cut_streams)} streams cut by the kill; "
          f"{retried} retried by the proxy on the other replica; A out {t_a_back - t_a_out:.1f} s; "
          f"B drained in {t_b_out - t_drain:.1f} s; routed before {dict(before)}, A out {dict(a_out)}, "
          f"B out {dict(b_out)}")
    assert status[200] > 0.8 * len(records), status
