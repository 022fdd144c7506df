import io

import pytest
from PIL import Image

from ds_qwen_vision.checkpoint import build_checkpoint


class OneRank:
    """The control channel of a single rank (tp=1): the plan goes nowhere, the health report is rank 0's own."""
    world = 1

    def broadcast(self, plan=None):
        return plan

    def gather(self, obj):
        return [obj]


def generate_text(engine, request: dict) -> tuple[str, dict]:
    """One engine request (Engine.generate's events), no error allowed: its content text and `done` event."""
    text, done = "", None
    for event in engine.generate(request):
        if event is None:
            continue
        assert event["event"] != "error", event
        if event["event"] == "delta":
            text += event["content"]
        elif event["event"] == "done":
            done = event
    return text, done


def answers_together(engine, requests: list[dict]) -> list[str]:
    """The engine's loop on a thread of its own and every request asked at once (a thread each): their texts,
    in order; the engine stopped after."""
    import threading

    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    out: list[str | None] = [None] * len(requests)

    def ask(i):
        out[i] = generate_text(engine, requests[i])[0]

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        engine.stop()
        loop.join(30)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The project's tiny real-format checkpoint (fp32), built once per test session."""
    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0))


def make_image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A deterministic, non-constant test image (random data, never a flat colour)."""
    import random

    rng = random.Random(seed)
    img = Image.new("RGB", (width, height))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(width * height)])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Two test images of different sizes and aspect ratios, on disk."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(64, 48), (40, 96)]):
        p = d / f"img{i}.png"
        p.write_bytes(make_image(w, h, seed=i))
        paths.append(str(p))
    return paths


# The server of test_bad_input_corpus.py and of test_faults.py's client-disconnect test, started once:
# an API key, small limits, one sequence at a time (so that a slot left busy would hold up the next
# request). It is served as "fake-qwen" with test_server_api's limits, so that the hand-written corpus
# of malformed requests there applies to it unchanged.
HARDENED_KEY_ENV = "DSQV_TEST_HARDENED_KEY"
HARDENED_CONFIG = {
    "served_model_name": "fake-qwen",
    "server": {"max_body_bytes": 300_000, "shutdown_grace_s": 2},
    "limits": {"max_images_per_request": 2, "max_image_pixels": 1_000_000, "max_prompt_tokens": 512,
               "max_new_tokens": 1024, "max_queue": 8, "max_concurrent": 1},
    "security": {"api_key_env": HARDENED_KEY_ENV, "allowed_image_url_prefixes": ["https://images.example/"]},
    # OpenAI's sampling defaults instead of the checkpoint's (test_bad_input_corpus checks the switch).
    "sampling": {"generation_config_defaults": False},
}


@pytest.fixture(scope="session")
def hardened_server(tmp_path_factory):
    """launch.sh with HARDENED_CONFIG; ``server.api_key`` is its key. Stopped (and must exit 0) at the end."""
    import os
    import secrets

    from server_fixture import start_server

    key = f"sk-{secrets.token_hex(16)}"
    os.environ[HARDENED_KEY_ENV] = key  # read at start only: by launch.sh, the ranks and the front
    try:
        server = start_server(tmp_path_factory.mktemp("hardened"), HARDENED_CONFIG)
    finally:
        del os.environ[HARDENED_KEY_ENV]
    server.api_key = key
    yield server
    server.stop()
