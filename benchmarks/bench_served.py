"""The served benchmark: launch.sh driven by streaming HTTP clients, beside the runner alone, in one call.

    # GPU (one card, tp=1): 27B widths (hidden 5120, vocab 248,320, 27B vision tower), 16 of the 64 layers;
    # three calls, each under ten minutes (--step all runs them in one):
    python benchmarks/bench_served.py --step build --out benchmarks/results      # the checkpoint, ~18 GB
    python benchmarks/bench_served.py --step prebuild --out benchmarks/results   # cold start: fills the caches
    python benchmarks/bench_served.py --step bench --out benchmarks/results      # runner alone + served
    # the whole 27B (`--layers 0`, ~54 GB on disk): its weights are made on the GPU, so the build fits a call
    # (2026-12-02: 8 layers built on the CPU took 158 s; 64 would not fit); start-up is issue 12's 90 s target
    # CPU check of the script itself (minutes): the loadtest preset
    python benchmarks/bench_served.py --preset loadtest --layers 8 --device cpu --dtype float32 --streams 4 \\
        --prompt-tokens 64 --new-tokens 16 --max-prompt 512 --chunk 256 --out /tmp/served

Steps, all on the same real-format checkpoint (built once, random weights, `checkpoint.build_checkpoint`):
- build: the checkpoint (cached: a second build returns at once);
- prebuild: `launch.sh --prebuild` on an empty compile cache ($DSQV_CACHE_DIR/bench-served/compile-cache,
  kept between calls like the checkpoint, default ~/.cache/ds-qwen-vision): a fresh machine's
  start-up, load + warm-up with every compilation and autotune, timed (`startup_cold_s`);
- bench: launch.sh on the filled cache: `startup_s` (start to /health 200, the phases seen on the way),
  the first request's time to first token, then the same request warm (new text); one stream's ms per
  token; three bursts of `--streams` concurrent streams (tokens/s, every stream's inter-token gaps as
  the clients see them and as the engine handed the tokens over (`dsqv_inter_token_seconds`), the
  first burst included; with --logprobs-burst a fourth burst whose clients also count each chunk's tokens,
  so that a gap between two single-token chunks is one gap between two tokens); what still compiled after
  ready (from /health); SIGTERM. Then the runner alone
  (a subprocess, the baseline): one stream's decode step with the host reading every token, and
  `--streams` prompts served by a tight loop scheduled like Scheduler.schedule with the prefill budget the
  server's warm-up chose (no HTTP, no IPC, no detokenization), and once more with whole `--chunk` chunks
  every step.
Writes OUT/DATE-CARD-tp1-served.json. Weights are random; the served streams ask for `ignore_eos`, so
every stream generates `--new-tokens` whatever it writes (before 2026-12-02's third session they stopped
at an end-of-sequence token: bursts with fewer tokens than streams x new tokens did less work than the
runner in about the same wall time).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the a of to and in is it that for on with as was at by this be from or have an they which one "
         "you were her all she there would their we him been has when who will more no if out so said what "
         "up its about into than them can only other new some could time these two may then do first any "
         "my now such like our over man me even most made after also did many before must through back "
         "years where much your way well down should because each just those people how too little state "
         "good very make world still own see men work long get here between both life being under never").split()


def checkpoint(args) -> Path:
    from ds_qwen_vision.checkpoint import PRESETS, build_checkpoint

    preset = args.preset
    if args.layers is not None:  # the preset's widths with fewer layers (a multiple of 4: 3 GDN + 1 attention)
        preset = f"{args.preset}-{args.layers}layers"
        spec = copy.deepcopy(PRESETS[args.preset])
        spec["text"]["num_hidden_layers"] = args.layers
        PRESETS[preset] = spec
    out = args.ckpt_dir or Path(os.environ.get("DSQV_CACHE_DIR", Path.home() / ".cache/ds-qwen-vision")) / \
        f"bench-{preset}-{args.dtype}"
    t = time.perf_counter()
    # on a GPU the weights are made there (seconds, not the CPU's ~60 MB/s): a 64-layer checkpoint fits a call
    path = build_checkpoint(out, preset=preset, seed=0, dtype=args.dtype,
                            device="cuda" if args.device == "cuda" else None)
    print(f"checkpoint {path} ready in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def prompts(model_dir: Path, n_tokens: int, count: int) -> list[str]:
    """`count` distinct user texts whose chat prompt is about n_tokens tokens (the checkpoint's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    for i in range(count):
        rng = random.Random(i)
        words = []
        while len(tok(" ".join(words))["input_ids"]) < n_tokens - 20:  # ~20 tokens of chat template
            words += rng.choices(WORDS, k=16)
        texts.append(" ".join(words))
    return texts


# ---- 1. the runner alone ------------------------------------------------------------------------------


def runner_main(args) -> None:
    import torch

    from ds_qwen_vision.model import DTYPES, chat_inputs, init_distributed, load_model, load_processor
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    init_distributed(args.device)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model = load_model(str(args.model), 1, args.device, DTYPES[args.dtype], show_progress=False)
    processor = load_processor(str(args.model))
    ids = [chat_inputs(processor, [{"role": "user", "content": t}], [])["input_ids"][0].tolist()
           for t in prompts(args.model, args.prompt_tokens, args.streams)]
    runner = ModelRunner(model, device, max_slots=args.streams, max_len=args.max_prompt + args.new_tokens,
                         mixed_prefill=args.mixed_prefill)
    out = {"card": torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu",
           "prompt_tokens": len(ids[0])}

    def one_stream(n):  # the host reads every token, as a serving loop must
        logits = runner.run(StepPlan(prefill=[Prefill(0, ids[0])]))
        token, steps = int(torch.argmax(logits[0])), []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            token = int(torch.argmax(runner.run(StepPlan(decode=[(0, token)]))[0]))
            steps.append(time.perf_counter() - t)
        return steps

    def streams(budget=None, overhead=0):
        """Scheduled like Scheduler.schedule (engine/scheduler.py): every generating slot decodes; prompts are prefilled within a token
        budget per step, `budget` while a stream decodes (whole `--chunk` chunks when none does) with each
        prompt charged `overhead` tokens; budget None: `--chunk` every step."""
        k = args.streams
        prefilled, generated, nxt = [0] * k, [0] * k, [None] * k
        while min(generated) < args.new_tokens:
            decoding = any(prefilled[i] >= len(ids[i]) and generated[i] < args.new_tokens for i in range(k))
            room = args.chunk if budget is None else (budget if decoding else max(budget, args.chunk)) + overhead
            plan = StepPlan()
            for i in range(k):
                if prefilled[i] < len(ids[i]) and room > overhead:
                    end = min(len(ids[i]), prefilled[i] + room - overhead)
                    plan.prefill.append(Prefill(i, ids[i], start=prefilled[i], end=end))
                    room -= end - prefilled[i] + overhead
                    prefilled[i] = end
                elif nxt[i] is not None and generated[i] < args.new_tokens:
                    plan.decode.append((i, nxt[i]))
            logits = runner.run(plan)
            picks = torch.stack(list(logits.values())).argmax(-1).tolist() if logits else []
            for slot, token in zip(logits, picks):
                nxt[slot] = token
                generated[slot] += 1

    one_stream(8)
    streams()  # warm-up: every shape these loops use
    steps = one_stream(args.new_tokens)
    out["runner_ms_per_token"] = 1e3 * statistics.median(steps)
    for key, schedule in (("runner_streams_whole_chunks_tokens_per_s", {}),
                          ("runner_streams_tokens_per_s", {"budget": args.served_budget[0],
                                                           "overhead": args.served_budget[1]})):
        if key == "runner_streams_tokens_per_s" and args.served_budget[0] is None:
            out[key] = out["runner_streams_whole_chunks_tokens_per_s"]
            continue
        sync()
        t = time.perf_counter()
        streams(**schedule)
        sync()
        out[key] = args.streams * args.new_tokens / (time.perf_counter() - t)
    out["runner_prefill_budget"] = list(args.served_budget)
    if args.device == "cuda":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_27b import copy_bandwidth

        weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters()) + \
            model.lm_head.weight.numel() * model.lm_head.weight.element_size()
        out["floor_ms"] = 1e3 * weights / copy_bandwidth(device)
    Path(args.runner_out).write_text(json.dumps(out))


# ---- 2. served --------------------------------------------------------------------------------------------


def served_budget(warmup_log: list[str]) -> tuple[int | str, int]:
    """(tokens, overhead) of the prefill budget the server's warm-up logged; ("none", 0) without one."""
    import re

    for line in reversed(warmup_log):
        m = re.search(r"prefill budget (\d+) tokens per step \(\+(\d+) per further prompt\)", line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return "none", 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(args, workdir: Path, tag: str, port: int) -> tuple[Path, dict]:
    """The deployment config (the same limits for prebuild and bench: the same shapes) and launch.sh's env."""
    cfg = {"model": str(args.model), "device": args.device, "dtype": args.dtype,
           "tensor_parallel": {"tp_size": 1},
           "server": {"port": port, "ipc_socket": str(workdir / f"{tag}.sock"),
                      "step_timeout_s": 600},
           "limits": {"max_concurrent": args.streams, "max_prompt_tokens": args.max_prompt,
                      "max_new_tokens": args.new_tokens, "prefill_chunk_tokens": args.chunk,
                      "max_gap_steps": args.max_gap_steps, "mixed_prefill": args.mixed_prefill,
                      "max_images_per_request": 1}}
    path = workdir / f"{tag}.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, DSQV_COMPILE_CACHE_DIR=str(args.keep / "compile-cache"))
    for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(k, None)
    return path, env


def prebuild_main(args) -> dict:
    """A fresh machine's start-up: launch.sh --prebuild on an empty compile cache."""
    work = Path(tempfile.mkdtemp(prefix="dsqv-bench-", dir="/tmp"))
    if not args.keep_cache:
        shutil.rmtree(args.keep / "compile-cache", ignore_errors=True)
    path, env = server_config(args, work, "prebuild", free_port())
    t = time.perf_counter()
    proc = subprocess.run([str(REPO / "launch.sh"), "--prebuild", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    out = {"startup_cold_s": time.perf_counter() - t, "returncode": proc.returncode,
           "cache_emptied_first": not args.keep_cache,
           "warmup_log": [line for line in proc.stderr.splitlines() if "warm-up" in line or "loaded" in line]}
    (args.keep / "prebuild.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"launch.sh --prebuild exited {proc.returncode}\n{proc.stderr[-6000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return out


class Served:
    def __init__(self, args, workdir: Path, tag: str):
        self.port = free_port()
        path, env = server_config(args, workdir, tag, self.port)
        self.log = workdir / f"{tag}.log"
        self.trace = workdir / f"{tag}-steps.jsonl"  # the engine loop's steps (engine/trace.py)
        env["DSQV_STEP_TRACE"] = str(self.trace)
        self.t0 = time.perf_counter()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([str(REPO / "launch.sh"), "--config", str(path)],
                                         cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.phases: dict[str, float] = {}

    def wait_ready(self, timeout: float) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launch.sh exited {self.proc.returncode}\n{self.log.read_text()[-6000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                r = c.getresponse()
                body = json.loads(r.read() or b"{}")
                self.phases.setdefault(body.get("status", "?"), round(time.perf_counter() - self.t0, 2))
                if r.status == 200:
                    return time.perf_counter() - self.t0
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not ready within {timeout} s\n{self.log.read_text()[-6000:]}")

    def stream(self, text: str, max_tokens: int, logprobs: bool = False) -> dict:
        """One streaming chat completion: arrival time of every content chunk, and the usage; with
        `logprobs`, also how many tokens each chunk carries (its logprob entries)."""
        # ignore_eos: every stream generates max_tokens, as the runner-alone baseline does (random weights
        # write an end-of-sequence token now and then; a burst's wall is its longest stream's either way)
        body = json.dumps({"model": Path(self.model_name).name, "stream": True, "max_tokens": max_tokens,
                           "temperature": 0, "stream_options": {"include_usage": True}, "ignore_eos": True,
                           "messages": [{"role": "user", "content": text}], "logprobs": logprobs,
                           "chat_template_kwargs": {"enable_thinking": False}})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]}")
        times, counts, usage = [], [], None
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    times.append(now)
                    counts.append(len((choice.get("logprobs") or {}).get("content") or []))
        return {"times": times, "counts": counts if logprobs else None, "usage": usage, "end": time.perf_counter() - t0}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def cached(result: dict) -> int:
    return ((result["usage"] or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def itl_buckets(server: Served) -> dict[float, float]:
    """The engine's dsqv_inter_token_seconds histogram (cumulative counts by upper bound), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return {float(s.labels["le"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "dsqv_inter_token_seconds_bucket"}


def step_summary(server: Served, t0: float, t1: float, longest: int = 8) -> dict:
    """The engine loop's steps between t0 and t1 (perf_counter: one clock for every process on the machine),
    from its trace: the time each part took in all, and the longest steps (start to the next start) with
    what they carried, where a long gap between two tokens comes from."""
    steps = [json.loads(line) for line in server.trace.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if t0 <= s["t"] <= t1]
    for a, b in zip(steps, steps[1:]):
        a["step_s"] = b["t"] - a["t"]
    timed = [s for s in steps if "step_s" in s]
    parts = {k: sum(s[k] for s in steps) for k in ("plan_s", "launch_s", "wait_s", "consume_s")}
    top = sorted(timed, key=lambda s: -s["step_s"])[:longest]
    return {"steps": len(steps), "total_s": parts, "median_step_ms": 1e3 * statistics.median(s["step_s"] for s in timed)
            if timed else None,
            "longest": [{**{(k[:-2] + "_ms" if k.endswith("_s") else k): (round(1e3 * v, 2) if k.endswith("_s") else v)
                            for k, v in s.items() if k != "t"},
                         "at_s": round(s["t"] - t0, 3)} for s in top]}


def burst(server: Served, texts: list[str], new_tokens: int, logprobs: bool = False) -> dict:
    results = [None] * len(texts)
    before = itl_buckets(server)

    def go(i):
        results[i] = server.stream(texts[i], new_tokens, logprobs)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(texts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    steps = step_summary(server, t, t + wall)
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    # The engine's own view of the same gaps (when it handed each token over, before detokenization
    # holds any text back and before HTTP): gaps per histogram bucket, and the bucket of the longest.
    after = itl_buckets(server)
    cumulative = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    per_bucket, below = {}, 0.0
    for le, n in cumulative.items():
        per_bucket[le], below = n - below, n
    longest = max((le for le, n in per_bucket.items() if n > 0), default=None)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "max_gap_ms": 1e3 * max(gaps), "median_gap_ms": 1e3 * statistics.median(gaps),
            "ttft_max_s": max(r["times"][0] for r in results),
            "content_chunks": sum(len(r["times"]) for r in results),
            "engine_gaps_per_bucket_s": {str(le): n for le, n in per_bucket.items() if n},
            "engine_max_gap_bucket_ms": None if longest is None else 1e3 * longest,
            "engine_steps": steps, **(chunk_tokens(results) if logprobs else {})}


def chunk_tokens(results: list[dict]) -> dict:
    """With logprobs, each content chunk says how many tokens it carries. A gap that ends in a chunk of one
    token is one gap between two tokens as the client saw them; a chunk of several tokens (text held back
    until a character is whole, or tokens with no text of their own) sums their gaps."""
    single = [b - a for r in results for a, b, k in zip(r["times"], r["times"][1:], r["counts"][1:]) if k == 1]
    per_chunk = {}
    for r in results:
        for k in r["counts"]:
            per_chunk[str(k)] = per_chunk.get(str(k), 0) + 1
    return {"max_gap_ms_one_token_chunks": 1e3 * max(single) if single else None,
            "median_gap_ms_one_token_chunks": 1e3 * statistics.median(single) if single else None,
            "chunks_by_tokens": dict(sorted(per_chunk.items(), key=lambda kv: int(kv[0])))}


def served_main(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="dsqv-bench-", dir="/tmp"))
    texts = prompts(args.model, args.prompt_tokens, args.streams * 4 + 5)
    out = {}
    server = Served(args, work, "served")
    server.model_name = str(args.model)
    try:
        out["startup_s"] = server.wait_ready(args.startup_timeout)
        out["startup_phases_s"] = server.phases
        first = server.stream(texts[0], 8)
        out["first_request_ttft_s"] = first["times"][0]
        # "the same request warm": the same shape with new text, so that the prefix cache cannot answer it
        # (the same text again is a prefix hit: 2026-12-02's run compared 157 ms against a 21 ms hit)
        warm = [server.stream(texts[2 + i], 8) for i in range(3)]
        out["warm_request_ttft_s"] = statistics.median(w["times"][0] for w in warm)
        out["first_request_cached_tokens"] = cached(first)
        out["warm_request_cached_tokens"] = max(cached(w) for w in warm)
        one = server.stream(texts[1], args.new_tokens)
        n = one["usage"]["completion_tokens"]
        out["served_ms_per_token"] = 1e3 * (one["times"][-1] - one["times"][0]) / max(1, n - 1)
        out["served_one_stream_tokens"] = n
        bursts = [burst(server, texts[5 + i * args.streams: 5 + (i + 1) * args.streams], args.new_tokens)
                  for i in range(3)]
        if args.logprobs_burst:  # a fourth burst whose clients count each chunk's tokens (not in the medians)
            out["logprobs_burst"] = burst(server, texts[5 + 3 * args.streams: 5 + 4 * args.streams],
                                          args.new_tokens, logprobs=True)
        out["bursts"] = bursts
        out["served_streams_tokens_per_s"] = statistics.median(b["tokens_per_s"] for b in bursts)
        out["max_inter_token_gap_ms"] = max(b["max_gap_ms"] for b in bursts)
        out["median_inter_token_gap_ms"] = statistics.median(b["median_gap_ms"] for b in bursts)
        out["engine_max_gap_bucket_ms"] = max((b["engine_max_gap_bucket_ms"] or 0) for b in bursts)
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("GET", "/health")
        ranks = json.loads(c.getresponse().read())["engine"]["ranks"]
        out["compiles_after_ready"] = [r.get("compiles_after_ready") for r in ranks]
        out["graphs_compiled_after_ready"] = [r.get("graphs_compiled_after_ready") for r in ranks]
        out["first_compiles_after_ready"] = [r.get("first_compiles_after_ready") for r in ranks]
        log = server.log.read_text()
        out["warmup_log"] = [line for line in log.splitlines() if "warm-up" in line][-3:]
    finally:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the results JSON")
    p.add_argument("--step", default="all", choices=["build", "prebuild", "bench", "all"])
    p.add_argument("--preset", default="27b", help="checkpoint.PRESETS widths")
    p.add_argument("--layers", type=int, default=16, help="text layers (a multiple of 4; 0: the preset's)")
    p.add_argument("--ckpt-dir", type=Path, default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-prompt", type=int, default=8192, help="limits.max_prompt_tokens of the server")
    p.add_argument("--chunk", type=int, default=2048, help="limits.prefill_chunk_tokens")
    p.add_argument("--max-gap-steps", type=float, default=3.0, help="limits.max_gap_steps")
    p.add_argument("--mixed-prefill", action="store_true", help="limits.mixed_prefill (server and runner alone)")
    p.add_argument("--logprobs-burst", action="store_true",
                   help="a fourth burst with logprobs: clients see how many tokens each chunk carries")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--keep-cache", action="store_true",
                   help="prebuild: keep what OUT/compile-cache holds (to finish a prebuild cut short)")
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--runner-out", help=argparse.SUPPRESS)
    p.add_argument("--served-budget", nargs=2, default=["none", "0"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.served_budget = (None if args.served_budget[0] == "none" else int(args.served_budget[0]),
                          int(args.served_budget[1]))
    if args.runner_out:
        return runner_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    # What later steps need (the compile cache, the cold start's figures) lives outside --out, which may be
    # a fresh folder per call (the device tool's $OUT); the checkpoint too.
    args.keep = Path(os.environ.get("DSQV_CACHE_DIR", Path.home() / ".cache/ds-qwen-vision")) / "bench-served"
    args.keep.mkdir(parents=True, exist_ok=True)
    args.layers = args.layers or None
    args.model = checkpoint(args)
    if args.step == "build":
        return
    if args.step in ("prebuild", "all"):
        prebuild_main(args)
        if args.step == "prebuild":
            return
    cold = json.loads((args.keep / "prebuild.json").read_text()) if (args.keep / "prebuild.json").exists() else {}
    # Served first: the runner alone then follows the prefill budget the server's warm-up chose
    # (limits.max_gap_steps), so that the two throughputs compare serving overhead, not two schedules
    # (2026-12-02: with max_gap_steps 3 the server prefilled 368 tokens a step against the runner's 2048).
    served = served_main(args)
    print(f"served: {json.dumps(served)}", flush=True)
    budget = served_budget(served["warmup_log"])
    runner_json = args.keep / "runner-alone.json"
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--model", str(args.model),
                    "--runner-out", str(runner_json), "--served-budget", *(str(x) for x in budget)], check=True,
                   env=dict(os.environ, PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port())))
    runner = json.loads(runner_json.read_text())
    print(f"runner alone: {json.dumps(runner)} ({time.perf_counter() - t:.0f} s)", flush=True)
    layers = args.layers or "all"
    s = args.streams
    rows = [
        {"run": f"ds-qwen-vision served (launch.sh + HTTP streaming clients), {args.preset} widths, {layers} layers",
         "decode_ms_per_token": served["served_ms_per_token"], "floor_ms": runner.get("floor_ms"),
         "startup_s": served["startup_s"], "startup_cold_s": cold.get("startup_cold_s"),
         "startup_cold_cache_emptied_first": cold.get("cache_emptied_first"),
         "startup_phases_s": served["startup_phases_s"],
         "first_request_ttft_s": served["first_request_ttft_s"], "warm_request_ttft_s": served["warm_request_ttft_s"],
         "first_request_cached_tokens": served["first_request_cached_tokens"],
         "warm_request_cached_tokens": served["warm_request_cached_tokens"],
         "served_ms_per_token": served["served_ms_per_token"], "runner_ms_per_token": runner["runner_ms_per_token"],
         f"served_streams{s}_tokens_per_s": served["served_streams_tokens_per_s"],
         f"runner_streams{s}_tokens_per_s": runner["runner_streams_tokens_per_s"],
         "max_inter_token_gap_ms": served["max_inter_token_gap_ms"],
         "median_inter_token_gap_ms": served["median_inter_token_gap_ms"],
         "engine_max_gap_bucket_ms": served["engine_max_gap_bucket_ms"],
         "compiles_after_ready": served["compiles_after_ready"],
         "graphs_compiled_after_ready": served["graphs_compiled_after_ready"],
         "first_compiles_after_ready": served["first_compiles_after_ready"],
         "bursts": served["bursts"], **({"logprobs_burst": served["logprobs_burst"]} if "logprobs_burst" in served else {}),
         "served_one_stream_tokens": served["served_one_stream_tokens"],
         "warmup_log": served["warmup_log"], "cold_warmup_log": cold.get("warmup_log", [])[-3:]},
        {"run": "runner alone (baseline: ModelRunner steps in a tight loop, the server's prefill budget, same "
                "checkpoint, same call)",
         "decode_ms_per_token": runner["runner_ms_per_token"], "floor_ms": runner.get("floor_ms"),
         "runner_ms_per_token": runner["runner_ms_per_token"],
         f"runner_streams{s}_tokens_per_s": runner["runner_streams_tokens_per_s"],
         f"runner_streams{s}_whole_chunks_tokens_per_s": runner["runner_streams_whole_chunks_tokens_per_s"],
         "runner_prefill_budget": runner["runner_prefill_budget"]},
    ]
    date = datetime.datetime.now(datetime.timezone.utc)
    card = runner["card"]
    result = {"date": date.isoformat(timespec="seconds"), "card": card,
              "command": " ".join(["python", "benchmarks/bench_served.py", *sys.argv[1:]]), "tp": 1,
              "checkpoint": {"preset": args.preset, "layers": layers, "dtype": args.dtype, "weights": "random"},
              "prompt_tokens": runner["prompt_tokens"], "new_tokens": args.new_tokens, "streams": s,
              "limits": {"prefill_chunk_tokens": args.chunk, "max_gap_steps": args.max_gap_steps,
                         "mixed_prefill": args.mixed_prefill}, "rows": rows}
    name = f"{date:%Y-%m-%d}-{card.replace('NVIDIA ', '').replace(' ', '-')}-tp1-served.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
