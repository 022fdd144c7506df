"""Multi-turn chat with images: time to first token with prefix reuse + the image embedding cache, against
a cold prefill of the same prompt, measured in the same run, through the server's own Engine and ModelRunner.

    # the GPU figure (one card, tp=1, Qwen3.6-27B shapes, random bf16 weights; run_prefix.sh wraps it):
    python benchmarks/bench_prefix.py --preset 27b --device cuda --dtype bfloat16 --out benchmarks/results
    bash benchmarks/run_prefix.sh OUT
    # the same code on CPU with the tiny preset (a check, not a figure):
    python benchmarks/bench_prefix.py --preset tiny --device cpu --dtype float32 --turns 2 --text-tokens 32 \
        --image-side 64 --repeats 1 --out /tmp/bench-prefix

The conversation: turn 1 is a user message with two images (--image-side, default 1024x1024) and
--text-tokens of text; every later turn adds an assistant reply (--reply-tokens) and a user message of
--text-tokens. For turn t (--turns, default 1, 2 and 5; turn 1 shows what the caches cost a prompt they
cannot help: its prefill is split where its snapshot is taken):
- ours: the engine with both caches on (config `cache` section, budgets --prefix-gib / --image-gib), after
  turns 1 .. t-1 of the same conversation ran through it (each generating one token); then turn t.
- cold: the same prompt on an engine with both caches off (the server before this change).
Time to first token = from handing the request to the engine (chat template, image decoding + processor,
hashing, queueing) to the first sampled token on the host; snapshot_job_ms = the engine's work after the
answer until the engine idles (freeing the slot; the snapshot a continued prompt leaves for the next
turn, prefix_cache.py), off that path; scheduled exactly as Engine.run does (default
limits: prefill_chunk_tokens 2048). Medians over --repeats, after a warm-up of each. Weights are random:
no figure here depends on what the model says (every turn's reply text is fixed).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.checkpoint import build_checkpoint, make_config  # noqa: E402
from ds_qwen_vision.config import CacheConfig, LimitsConfig  # noqa: E402
from ds_qwen_vision.model import build_sharded, init_distributed, load_processor  # noqa: E402

GiB = 2**30
WORDS = ("the quick brown fox jumps over a lazy dog while seven purple clouds drift past an old lighthouse "
         "near quiet harbour towns where fishermen mend their nets and children count the passing ships").split()


class LocalChannel:
    """tp=1: nothing to broadcast to."""
    world = 1

    def broadcast(self, plan=None):
        return plan

    def gather(self, obj):
        return [obj]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_png(side: int, seed: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def text_of(tokenizer, n: int, seed: int) -> str:
    """Plain words, about n tokens of this tokenizer."""
    g = torch.Generator().manual_seed(seed)
    words = []
    while len(tokenizer.encode(" ".join(words))) < n:
        words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=g))])
    return " ".join(words)


def conversation(tokenizer, turns: int, images: list[bytes], text_tokens: int, reply_tokens: int) -> list[dict]:
    """The engine's request messages of turn `turns`."""
    parts = [{"type": "image", "data_b64": base64.b64encode(b).decode()} for b in images]
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": text_of(tokenizer, text_tokens, 0)}]}]
    for t in range(1, turns):
        messages.append({"role": "assistant", "content": text_of(tokenizer, reply_tokens, 1000 + t)})
        messages.append({"role": "user", "content": text_of(tokenizer, text_tokens, t)})
    return messages


def drive(engine) -> None:
    """Engine.run's own steps (tp=1: nothing to broadcast to) until one finds nothing to do: the request's
    steps, then whatever the engine does after it (freeing the slot, a snapshot job)."""
    pending, worked = engine.step(None)
    while worked:
        pending, worked = engine.step(pending)


def ask(engine, runner, messages, max_tokens: int = 1) -> dict:
    """One request through the engine, stepped as Engine.run steps it. Returns time to first token (on the
    host), time per later token, the work after the answer, prompt and cached tokens."""
    device = runner.device
    finished = {}
    finish = engine.output.finish
    engine.output.finish = lambda seq, reason: (finished.setdefault(seq.id, time.perf_counter()), finish(seq, reason))
    sync(device)
    t0 = time.perf_counter()
    events = engine.generate({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                              "chat_template_kwargs": {"enable_thinking": False}})
    start = next(events)  # prepare() ran: template, images, processor, hashes; the sequence is queued
    assert start["event"] == "start", start
    prepared = time.perf_counter()
    seq = engine.scheduler.waiting.items[0]
    drive(engine)
    sync(device)
    idle = time.perf_counter()
    engine.output.finish = finish
    usage = None
    while not seq.events.empty():
        event = seq.events.get_nowait()
        assert event["event"] != "error", event
        usage = event["usage"] if event["event"] == "done" else usage
    events.close()
    first, done = seq.first_token_at, finished[seq.id]
    return {"ttft_ms": 1e3 * (first - t0), "prepare_ms": 1e3 * (prepared - t0), "after_ms": 1e3 * (idle - done),
            "decode_ms_per_token": 1e3 * (done - first) / (seq.generated - 1) if seq.generated > 1 else None,
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="27b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--turns", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--reply-tokens", type=int, default=64)
    p.add_argument("--image-side", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens generated by the last timed turn")
    p.add_argument("--prefix-gib", type=float, default=4.0)
    p.add_argument("--image-gib", type=float, default=1.0)
    p.add_argument("--out", type=Path, required=True, help="directory for DATE-CARD-tp1-prefix.json")
    p.add_argument("--cache", type=Path, default=Path("/tmp/dsqv-bench"), help="where the tiny tokenizer is built")
    args = p.parse_args()

    from benchmarks.bench_27b import copy_bandwidth, randomize
    from ds_qwen_vision.engine import Engine
    from ds_qwen_vision.runner import ModelRunner

    init_distributed(args.device)  # a group of one (tp=1), as the server's single rank
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    processor = load_processor(build_checkpoint(args.cache / "tiny", preset="tiny"))  # its tokenizer + processor
    model = build_sharded(make_config(args.preset), 1, dtype)
    randomize(model, seed=0)
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    floor_ms = 1e3 * weights / copy_bandwidth(device) if device.type == "cuda" else None
    limits = LimitsConfig(max_prompt_tokens=8192, max_new_tokens=256, max_concurrent=1)
    runner = ModelRunner(model, device, max_slots=1, max_len=limits.max_prompt_tokens + limits.max_new_tokens)
    on = CacheConfig(prefix_bytes=int(args.prefix_gib * GiB), image_bytes=int(args.image_gib * GiB))

    def fresh(cache: CacheConfig) -> Engine:
        runner.snapshots.snapshots.clear()  # what an engine of its own would find: nothing held
        runner.images.entries.clear()
        return Engine(runner, LocalChannel(), processor, limits, cache=cache)

    images = [image_png(args.image_side, seed=i) for i in range(2)]
    rows, last = [], max(args.turns)
    for turn in args.turns:
        messages = conversation(processor.tokenizer, turn, images, args.text_tokens, args.reply_tokens)
        history = [conversation(processor.tokenizer, t, images, args.text_tokens, args.reply_tokens)
                   for t in range(1, turn)]
        cold, warm = [], []
        for r in range(args.repeats + 1):  # the first of each: warm-up (kernels, autotuning), not counted
            engine = fresh(CacheConfig(prefix_bytes=0, image_bytes=0))
            cold.append(ask(engine, runner, messages))
            engine = fresh(on)
            for earlier in history:
                ask(engine, runner, earlier)
            n = args.decode_tokens + 1 if turn == last and r == args.repeats else 1
            warm.append(ask(engine, runner, messages, max_tokens=n))
        cold, warm = cold[1:], warm[1:]
        cold_ms = statistics.median(x["ttft_ms"] for x in cold)
        for name, runs in (("ds-qwen-vision, prefix + image cache", warm), ("cold prefill (caches off)", cold)):
            ttft = statistics.median(x["ttft_ms"] for x in runs)
            decode = [x["decode_ms_per_token"] for x in runs if x["decode_ms_per_token"] is not None]
            rows.append({"run": name, "turn": turn, "ttft_ms": ttft, "ttft_vs_cold": ttft / cold_ms,
                         "prepare_ms": statistics.median(x["prepare_ms"] for x in runs),
                         "snapshot_job_ms": statistics.median(x["after_ms"] for x in runs),
                         "prompt_tokens": runs[0]["prompt_tokens"], "cached_tokens": runs[0]["cached_tokens"],
                         "decode_ms_per_token": decode[0] if decode else None, "floor_ms": floor_ms,
                         "ttft_ms_all": [x["ttft_ms"] for x in runs]})
            print(json.dumps(rows[-1]), flush=True)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc)
    result = {"date": date.isoformat(timespec="seconds"), "card": card, "tp": 1,
              "command": "python " + " ".join(sys.argv), "preset": args.preset, "dtype": args.dtype,
              "weights": "random", "images": f"2 x {args.image_side}x{args.image_side}",
              "text_tokens_per_turn": args.text_tokens, "reply_tokens": args.reply_tokens,
              "prefill_chunk_tokens": limits.prefill_chunk_tokens, "cuda_graphs": runner.cuda_graphs,
              "image_processor": type(processor.image_processor).__name__,
              "torch": torch.__version__, "rows": rows,
              "note": "ttft_vs_cold: ours / cold of the same turn (target <= 0.25). decode_ms_per_token: "
                      "measured after the last turn's reused prefill only; floor_ms: weight bytes / copy bandwidth."}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = card.removeprefix("NVIDIA ").replace(" ", "-")  # H200, as the other benchmarks name their files
    path = args.out / f"{date:%Y-%m-%d}-{slug}-tp1-prefix.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
