"""Nothing hangs, nothing is lost: a rank that dies, an engine step that raises or hangs, a client
that leaves mid-stream, a requested shutdown.

In process, with a fake runner (no model, no ranks): the engine's failure and drain paths, the step
watchdog, a follower's exit code.  End to end, against launch.sh (server_fixture): ``kill -9`` (dead)
or SIGSTOP (hung) of a follower rank mid-generation, SIGTERM with a stream in flight and one queued,
and a client that disconnects (on the session's hardened server, see conftest).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from chat_http import chat, get, health, metric, open_stream, post, read_chunks, sse_events
from server_fixture import start_server

from ds_qwen_vision.config import DEMO_SERVED_NAME, LimitsConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.model import load_processor
from ds_qwen_vision.plan import StepPlan
from ds_qwen_vision.serve import EXIT_CRASH, StepWatchdog, follow

# Greedy prompts on which the demo checkpoint generates 1024 tokens without an end-of-sequence token.
LONG_PROMPTS = ["What is the capital of France?", "The quick brown fox"]
# Every server here has the hardened server's cache length (prompt + new tokens), so that each one
# computes the same greedy tokens for LONG_PROMPTS.
LIMITS = {"max_prompt_tokens": 512, "max_new_tokens": 1024, "max_concurrent": 1}


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05) -> float:
    """Seconds until ``predicate()`` was true; fails the test after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(poll)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# In process: the engine with a fake runner
# ---------------------------------------------------------------------------------------------


class FakeRunner:
    """The runner's interface without a model: every stepped slot's logits pick token ``token``.
    ``delay_s`` per step; ``raise_at`` / ``hang_at``: that step raises / blocks until ``unblock``."""

    def __init__(self, token: int, eos: int, slots: int = 1, delay_s: float = 0.0,
                 raise_at: int | None = None, hang_at: int | None = None):
        text = SimpleNamespace(max_position_embeddings=4096)
        self.model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eos]),
                                     config=SimpleNamespace(text_config=text))
        self.max_slots, self.max_len = slots, 4096
        self.token, self.delay_s, self.raise_at, self.hang_at = token, delay_s, raise_at, hang_at
        self.steps = 0
        self.unblock = threading.Event()

    def run(self, plan: StepPlan, pixels=None) -> dict[int, torch.Tensor]:
        self.steps += 1
        if self.steps == self.raise_at:
            raise RuntimeError(f"boom in step {self.steps}")
        if self.steps == self.hang_at:
            self.unblock.wait()  # what a dead peer in the all-reduce looks like from here
        time.sleep(self.delay_s)
        row = torch.zeros(self.token + 1)
        row[self.token] = 1.0
        return {slot: row for slot in [p.slot for p in plan.prefill] + [s for s, _ in plan.decode]}

    def feed(self, slots, picks) -> None:  # the tokens stay on the "device": nothing to hand on
        pass

    def status(self) -> dict:
        return {"rank": 0, "ready": True}


class FakeChannel:
    world = 2

    def __init__(self):
        self.plans: list[StepPlan] = []

    def broadcast(self, plan=None):
        self.plans.append(plan)
        return plan

    def gather(self, obj):
        return [obj] * self.world


class Client(threading.Thread):
    """Drains one request's events from Engine.generate, as the IPC server does, with arrival times.
    Returns once the engine has answered the request (accepted into its queue, or refused)."""

    def __init__(self, engine: Engine, max_tokens: int):
        super().__init__(daemon=True)
        self.request = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                        "max_tokens": max_tokens, "temperature": 0.0, "chat_template_kwargs": {}}
        self.engine, self.events, self.ended_at = engine, [], None
        self.start()
        wait_until(lambda: self.events, 10, "the engine takes the request")  # so that clients queue in order

    def run(self) -> None:
        for event in self.engine.generate(self.request):
            if event is not None:
                self.events.append(event)
        self.ended_at = time.monotonic()

    def result(self, timeout: float = 10) -> dict:
        self.join(timeout)
        assert not self.is_alive(), f"no terminal event within {timeout} s: {self.events}"
        return self.events[-1]


class Loop(threading.Thread):
    """Engine.run on a thread, keeping what it raised."""

    def __init__(self, engine: Engine):
        super().__init__(daemon=True)
        self.engine, self.error = engine, None
        self.start()

    def run(self) -> None:
        try:
            self.engine.run()
        except BaseException as e:
            self.error = e


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return load_processor(tiny_ckpt)


@pytest.fixture
def make_engine(processor):
    token = processor.tokenizer.encode("a")[0]
    engines = []

    def make(**runner_kw) -> Engine:
        runner = FakeRunner(token, eos=token + 1, **runner_kw)
        engine = Engine(runner, FakeChannel(), processor, LimitsConfig(max_queue=4, max_new_tokens=4000))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:  # leave no loop behind
        engine.stop()
        engine.runner.unblock.set()


def assert_503(event: dict, code: str, fragment: str) -> None:
    assert event["event"] == "error" and event["status"] == 503, event
    assert event["code"] == code and fragment in event["message"], event


def test_an_exception_in_a_step_fails_every_request_and_the_loop(make_engine):
    engine = make_engine(raise_at=3)
    running, queued = Client(engine, 50), Client(engine, 50)  # one slot: the second one waits
    loop = Loop(engine)
    for client in (running, queued):
        assert_503(client.result(), "engine_down", "RuntimeError: boom in step 3")
    loop.join(5)
    assert isinstance(loop.error, RuntimeError)  # serve.py turns it into EXIT_CRASH
    assert [e["event"] for e in running.events[:2]] == ["start", "delta"]
    assert engine.health()["ready"] is False and engine.health()["alive"] is False
    assert_503(Client(engine, 5).result(), "engine_down", "the engine is down")


def test_the_watchdog_fails_requests_and_ends_the_process_on_a_hung_step(make_engine):
    engine = make_engine(hang_at=3)
    exits = []
    StepWatchdog(engine, timeout_s=0.5, on_hang=lambda: exits.append(time.monotonic())).start()
    running, queued = Client(engine, 50), Client(engine, 50)
    Loop(engine)
    for client in (running, queued):
        assert_503(client.result(), "rank_lost", "longer than server.step_timeout_s = 0.5 s")
    wait_until(lambda: exits, 2, "the watchdog calls on_hang")
    # The step began at most a few ms before the failure: well within the timeout plus one poll.
    assert exits[0] - running.ended_at < 0.5
    assert len(exits) == 1 and engine.health()["ready"] is False


def test_a_fast_step_never_trips_the_watchdog(make_engine):
    engine = make_engine(delay_s=0.01)
    exits = []
    StepWatchdog(engine, timeout_s=0.5, on_hang=lambda: exits.append(1)).start()
    Loop(engine)
    assert Client(engine, 100).result()["finish_reason"] == "length"  # 100 steps: over 1 s in all
    assert not exits


def test_stop_drains_what_fits_in_the_grace_period_and_fails_the_rest(make_engine):
    engine = make_engine(delay_s=0.01)
    loop = Loop(engine)
    short, long = Client(engine, 30), Client(engine, 4000)  # ~0.3 s; ~40 s, queued behind the first
    wait_until(lambda: len(short.events) >= 2, 5, "the first request generates")
    t0 = time.monotonic()
    engine.stop(grace_s=1.5)
    health = engine.health()
    assert health["ready"] is False and health["stopping"] is True
    refused = Client(engine, 5)
    assert_503(refused.result(), "shutting_down", "shutting down")  # new work is refused, at once
    assert refused.ended_at - t0 < 0.2
    assert short.result()["event"] == "done" and short.events[-1]["finish_reason"] == "length"
    assert_503(long.result(), "shutting_down", "shutdown_grace_s")
    assert 1.3 < long.ended_at - t0 < 3.0
    loop.join(5)
    assert not loop.is_alive() and loop.error is None
    assert engine.channel.plans[-1].stop  # the followers are told to leave


def test_stop_with_nothing_in_flight_returns_at_once(make_engine):
    engine = make_engine()
    loop = Loop(engine)
    assert Client(engine, 3).result()["event"] == "done"
    t0 = time.monotonic()
    engine.stop(grace_s=30)
    loop.join(5)
    assert time.monotonic() - t0 < 1.0 and loop.error is None


class ScriptedChannel:
    """A follower's view: the given plans, then ``then`` (a plan, or an exception to raise)."""

    def __init__(self, plans, then):
        self.plans, self.then = list(plans), then

    def broadcast(self, plan=None):
        if self.plans:
            return self.plans.pop(0)
        if isinstance(self.then, BaseException):
            raise self.then
        return self.then

    def gather(self, obj):
        return None


@pytest.mark.parametrize("then, runner_raises, code", [
    (StepPlan(stop=True), False, 0),
    (RuntimeError("[gloo] Connection closed by peer"), False, EXIT_CRASH),  # rank 0 is gone
    (StepPlan(stop=True), True, EXIT_CRASH),                                # a plan fails here
])
def test_a_follower_exits_nonzero_on_any_error(then, runner_raises, code):
    ran = []

    class Runner:
        def run(self, plan):
            ran.append(plan)
            if runner_raises:
                raise ValueError("prompt of 9000 tokens does not fit a slot of 4096")

        def status(self):
            return {"ready": True}

    assert follow(Runner(), ScriptedChannel([StepPlan(heartbeat=True), StepPlan(decode=[(0, 1)])], then), rank=1) == code
    assert len(ran) == 1  # the heartbeat is answered, not run


# ---------------------------------------------------------------------------------------------
# End to end: launch.sh
# ---------------------------------------------------------------------------------------------


def process_tree(server) -> list[psutil.Process]:
    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


def assert_nothing_left(tree: list[psutil.Process], workdir, timeout: float = 10) -> None:
    """No process of that server survives: not one of the tree seen while it ran, nor any process
    whose command line names its workdir (its config file)."""
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    strays = [p for p in psutil.process_iter(["cmdline"]) if str(workdir) in " ".join(p.info["cmdline"] or [])]
    assert not strays, [(p.pid, p.info["cmdline"]) for p in strays]


def follower_of(tree: list[psutil.Process]) -> psutil.Process:
    followers = [p for p in tree if "--local_rank=1" in p.cmdline()]
    assert len(followers) == 1, [p.cmdline() for p in tree]
    return followers[0]


def error_of(sse: bytes) -> dict:
    events = sse_events(sse.decode())
    assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
    return events[-2]["error"]


class Background(threading.Thread):
    """A non-streaming request on a thread: ``.reply`` once answered."""

    def __init__(self, base_url: str, body: dict):
        super().__init__(daemon=True)
        self.base_url, self.body, self.reply = base_url, body, None
        self.start()

    def run(self) -> None:
        self.reply = post(self.base_url, self.body, timeout=120)


STEP_TIMEOUT_S = 3.0


# kill -9: rank 0 then either spins in the all-reduce (the watchdog ends it) or its next plan broadcast
# raises. SIGSTOP, a hung rank: nothing raises anywhere, only the watchdog can notice.
FAULTS = {"kill": ("rank_lost", "engine_down"), "stop": ("rank_lost",)}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_dead_or_hung_follower_fails_requests_within_step_timeout_and_the_server_exits_nonzero(tmp_path, fault):
    server = start_server(tmp_path, {"server": {"step_timeout_s": STEP_TIMEOUT_S}, "limits": LIMITS})
    base = server.base_url
    follower = None
    try:
        tree = process_tree(server)
        follower = follower_of(tree)
        _, stream = open_stream(base, chat(DEMO_SERVED_NAME, LONG_PROMPTS[0], max_tokens=1024, temperature=0))
        got = read_chunks(stream, 4)  # tokens are flowing
        queued = Background(base, chat(DEMO_SERVED_NAME, LONG_PROMPTS[1], max_tokens=1024, temperature=0))
        wait_until(lambda: (health(base)[1] or {}).get("engine", {}).get("queue_depth") == 1, 10,
                   "the second request waits in the engine's queue")
        t0 = time.monotonic()
        follower.kill() if fault == "kill" else follower.suspend()

        got += stream.read()  # the server ends the stream
        error = error_of(got)
        in_flight_s = time.monotonic() - t0
        queued.join(30)
        queued_s = time.monotonic() - t0
        assert error["code"] in FAULTS[fault], error
        assert error["message"].startswith("the engine stopped: "), error
        assert queued.reply is not None and queued.reply.status == 503, queued.reply
        assert queued.reply.error["code"] == error["code"] and queued.reply.headers["retry-after"] == "5"
        # Within the step timeout, plus the watchdog's poll and the hand-over to the front.
        assert in_flight_s < STEP_TIMEOUT_S + 2 and queued_s < STEP_TIMEOUT_S + 2, (in_flight_s, queued_s)
        assert health(base)[0] != 200

        if fault == "stop":
            follower.resume()  # it dies of the SIGTERM the launcher sent it meanwhile (or is killed in 30 s)
        code = server.proc.wait(timeout=45)
        assert code not in (0, 2), f"launch.sh exited {code}: a supervisor must see a crash\n{server.log()}"
        assert_nothing_left(tree, tmp_path)
    finally:
        if follower is not None and fault == "stop" and follower.is_running():
            follower.resume()
        if server.proc.poll() is None:
            server.kill()


GRACE_S = 6.0


def test_sigterm_refuses_new_work_finishes_what_fits_and_exits_0(tmp_path):
    # the queued request asks for more tokens than the grace period can hold, whatever the machine's speed
    server = start_server(tmp_path, {"server": {"shutdown_grace_s": GRACE_S},
                                     "limits": {**LIMITS, "max_new_tokens": 8000}})
    base = server.base_url
    try:
        tree = process_tree(server)
        _, short = open_stream(base, chat(DEMO_SERVED_NAME, LONG_PROMPTS[0], max_tokens=30, temperature=0))
        short_got = read_chunks(short, 3)
        _, long = open_stream(base, {**chat(DEMO_SERVED_NAME, LONG_PROMPTS[1], max_tokens=8000, temperature=0),
                                     "ignore_eos": True})
        status, body = health(base)
        assert status == 200 and body["engine"]["in_flight"] == 1 and body["engine"]["queue_depth"] == 1, body
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        # Draining: not ready, new requests refused with a 503 that says why, the front still answering.
        wait_until(lambda: (health(base)[1] or {}).get("engine", {}).get("stopping") is True, 5,
                   "/health reports the drain")
        assert health(base)[0] == 503
        refused = post(base, chat(DEMO_SERVED_NAME, "hi", max_tokens=1))
        assert refused.status == 503 and refused.error["code"] == "shutting_down", refused.body
        assert refused.seconds < 1.0  # at once, not queued until the drain ends
        assert refused.headers["retry-after"] == "5"

        # The request in flight finishes; the queued one cannot in the time left and gets a 503 event.
        short_events = sse_events((short_got + short.read()).decode())
        assert short_events[-2]["choices"][0]["finish_reason"] == "length", short_events[-3:]
        assert time.monotonic() - t0 < GRACE_S
        error = error_of(long.read())
        cut_at = time.monotonic() - t0
        assert error["code"] == "shutting_down" and "shutdown_grace_s" in error["message"], error
        assert GRACE_S - 1 < cut_at < GRACE_S + 3, cut_at

        assert server.proc.wait(timeout=30) == 0, server.log()
        assert_nothing_left(tree, tmp_path)
    finally:
        if server.proc.poll() is None:
            server.kill()


def test_a_client_leaving_mid_stream_cancels_its_generation_and_frees_the_slot(hardened_server):
    base, key, model = hardened_server.base_url, hardened_server.api_key, hardened_server.config["served_model_name"]
    assert hardened_server.config["limits"]["max_concurrent"] == 1  # a slot left busy would hold up the next one
    cancelled_before = metric(get(base, "/metrics").body.decode(), "dsqv_engine_requests_total", outcome="cancelled")
    conn, stream = open_stream(base, chat(model, LONG_PROMPTS[0], max_tokens=1024, temperature=0), key=key)
    read_chunks(stream, 4)
    assert health(base)[1]["engine"]["in_flight"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client vanishes
    conn.close()

    freed_s = wait_until(lambda: health(base)[1]["engine"]["in_flight"] == 0, 5, "the slot is freed")
    assert freed_s < 2.0
    nxt = post(base, chat(model, "hi", max_tokens=4, temperature=0), key=key)
    assert nxt.status == 200 and nxt.seconds < 5, (nxt.status, nxt.seconds)  # not behind ~1000 tokens
    cancelled = metric(get(base, "/metrics").body.decode(), "dsqv_engine_requests_total", outcome="cancelled")
    assert cancelled == cancelled_before + 1


def test_a_client_leaving_a_non_streamed_request_cancels_it_too(hardened_server):
    """Nothing is written to a non-streamed client until the end: the front watches its socket instead."""
    base, key, model = hardened_server.base_url, hardened_server.api_key, hardened_server.config["served_model_name"]
    cancelled_before = metric(get(base, "/metrics").body.decode(), "dsqv_engine_requests_total", outcome="cancelled")
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat(model, LONG_PROMPTS[0], max_tokens=1024,
                                                                 temperature=0)),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    wait_until(lambda: health(base)[1]["engine"]["in_flight"] == 1, 10, "the request is generating")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client vanishes without reading a byte
    conn.close()

    freed_s = wait_until(lambda: health(base)[1]["engine"]["in_flight"] == 0, 5, "the slot is freed")
    assert freed_s < 2.5  # the front polls every 0.5 s, the engine drops it at its next step
    cancelled = metric(get(base, "/metrics").body.decode(), "dsqv_engine_requests_total", outcome="cancelled")
    assert cancelled == cancelled_before + 1


def test_a_second_launch_on_a_running_deployments_socket_refuses_and_leaves_it_running(hardened_server, tmp_path):
    """Starting again with the same server.ipc_socket (the same port, by default) must not cut the running
    deployment's front off its engine: launch.sh exits 2 (a config problem) before starting anything."""
    config = tmp_path / "same.json"
    config.write_text(json.dumps(hardened_server.config))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, **{hardened_server.config["security"]["api_key_env"]: hardened_server.api_key})
    proc = subprocess.run([str(repo / "launch.sh"), "--config", str(config)], cwd=repo, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "belongs to a running deployment" in proc.stderr
    assert health(hardened_server.base_url)[0] == 200
