"""Load: 64 concurrent clients against the real server (launch.sh, CPU ranks) for a bounded time,
on loopback, with a small engine queue so that some requests are turned away.

Every request must get either the right answer -- the same greedy completion as the same prompt
sent alone -- or a documented refusal (429 queue full / 503) with Retry-After; never a 500, never
nothing.  Each request carries its own X-Request-Id and is answered exactly once: the replies match
the requests one to one, and the server's own counters agree with the clients'.  The latency
percentiles are printed (run with -s to see them).
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import Counter

import pytest
from chat_http import answer, chat, get, health, metric, post
from server_fixture import start_server

from ds_qwen_vision.config import DEMO_SERVED_NAME

pytestmark = pytest.mark.slow  # multi-process (pyproject.toml: the fast tier runs -m "not slow")

CLIENTS = 64
LOAD_S = 60.0          # the whole module stays under ~2 minutes on a 2-core machine
MAX_TOKENS = 8
CONFIG = {
    "server": {"threads": 32, "step_timeout_s": 60},
    "limits": {"max_queue": 4, "max_concurrent": 4, "max_prompt_tokens": 512, "max_new_tokens": 64},
}
PROMPTS = ["hi", "Count to ten", "What is the capital of France?", "Write a poem", "zzz", "Describe the sea",
           "The quick brown fox", "one two three"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("load"), CONFIG)
    yield server
    server.stop()


def body(prompt: str, stream: bool) -> dict:
    fields = {"max_tokens": MAX_TOKENS, "temperature": 0}
    if stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    return chat(DEMO_SERVED_NAME, prompt, **fields)


def chat_counts(base: str) -> tuple[dict[str, float], dict[str, float]]:
    """The front's chat-completion replies by status, and the engine's requests by outcome."""
    text = get(base, "/metrics").body.decode()
    front = {s: metric(text, "dsqv_front_requests_total", route="/v1/chat/completions", status=s)
             for s in ("200", "400", "429", "500", "503")}
    engine = {o: metric(text, "dsqv_engine_requests_total", outcome=o) for o in ("completed", "queue_full", "failed")}
    return front, engine


def percentiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"p50 {q[49]:.2f} s, p90 {q[89]:.2f} s, p99 {q[98]:.2f} s, max {max(values):.2f} s (n={len(values)})"


def test_64_clients_get_the_right_answer_or_a_documented_refusal(server):
    base = server.base_url
    # The answer of each prompt sent alone (nothing else in flight).
    reference = {p: answer(post(base, body(p, stream=False))) for p in PROMPTS}
    front_before, engine_before = chat_counts(base)

    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_S

    def client(c: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            rid, prompt, stream = f"c{c}-r{n}", PROMPTS[(c + n) % len(PROMPTS)], (c + n) % 4 == 0
            record = {"id": rid, "prompt": prompt, "stream": stream}
            try:
                record["reply"] = post(base, body(prompt, stream), request_id=rid, timeout=90)
            except Exception as e:  # a hang (timeout) or a dropped connection: both are failures
                record["exception"] = repr(e)
            with lock:
                records.append(record)
            n += 1
            reply = record.get("reply")
            if reply is not None and reply.status in (429, 503):
                time.sleep(float(reply.headers.get("retry-after", "1")))  # as a polite client does

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 120)
    wall = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client is still waiting for its reply"

    problems = [f"{r['id']}: {r['exception']}" for r in records if "exception" in r]
    statuses = Counter(r["reply"].status for r in records if "reply" in r)
    ok, refused = [], []
    for r in records:
        reply = r.get("reply")
        if reply is None:
            continue
        if reply.headers.get("x-request-id") != r["id"]:
            problems.append(f"{r['id']}: answered as {reply.headers.get('x-request-id')!r}")
        if reply.status == 200:
            got, want = answer(reply), reference[r["prompt"]]  # streams carry their usage too (include_usage)
            for u in (got.get("usage"), want.get("usage")):  # a repeated prompt continues a held prefix
                (u or {}).pop("prompt_tokens_details", None)
            if got != want:
                problems.append(f"{r['id']} ({r['prompt']!r}, stream={r['stream']}): {got} != alone {want}")
            ok.append(r)
        elif reply.status in (429, 503):
            retry_after = reply.headers.get("retry-after", "")
            err = reply.error
            if not retry_after.isdigit() or int(retry_after) < 1 or len(err["message"]) < 20 or not err["code"]:
                problems.append(f"{r['id']}: {reply.status} without Retry-After or a clear error: "
                                f"{reply.headers} {reply.body[:200]!r}")
            refused.append(r)
        else:
            problems.append(f"{r['id']}: status {reply.status}: {reply.body[:300]!r}")

    ids = [r["id"] for r in records]
    completion_ids = [r["reply"].json()["id"] if not r["stream"] else r["reply"].sse()[0]["id"] for r in ok]
    print(f"\n{len(records)} requests from {CLIENTS} clients in {wall:.0f} s: {dict(statuses)}; "
          f"{len(ok) / wall:.1f} answers/s")
    print(f"latency, answered (200): {percentiles([r['reply'].seconds for r in ok])}")
    if refused:
        print(f"latency, refused (429/503): {percentiles([r['reply'].seconds for r in refused])}")
    assert not problems, f"{len(problems)} bad outcomes:\n" + "\n".join(problems[:40])
    assert len(ids) == len(set(ids)) and len(completion_ids) == len(set(completion_ids))
    assert statuses[429] > 0, "the queue never filled up: the test did not load the server"
    assert len(ok) >= CLIENTS, f"only {len(ok)} answers"

    # The server answered each request exactly once: its counters match what the clients saw.
    front_after, engine_after = chat_counts(base)
    for status in ("200", "429", "503", "500", "400"):
        assert front_after[status] - front_before[status] == statuses[int(status)], (status, front_after)
    assert engine_after["completed"] - engine_before["completed"] == len(ok)
    assert engine_after["queue_full"] - engine_before["queue_full"] == statuses[429]
    status, h = health(base)
    assert status == 200 and h["engine"]["in_flight"] == 0 and h["engine"]["queue_depth"] == 0, h
