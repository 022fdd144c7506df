"""The 32 GB memory twin (issue 24): the shipped 2-GPU config served on one card made to look like one tp=2 rank.

    # GPU (one H100/H200). The twin: the 27B's widths with 32 of its 64 layers at tp=1 holds one tp=2 rank's KV
    # per token and GDN state per sequence; ballast.py holds all but --leave-gib of the card in another process,
    # so the free memory reads like one rank of a 2 x 32 GB box. Where ../shared does not travel, copy
    # ../shared/device/ballast.py into an ignored folder of the checkout (.dev/) and carry it. One call per
    # config, each under ten minutes; each builds the checkpoint first where it is missing (~30 GB, made on
    # the GPU; at once where the machine still holds it):
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_memory.py --step all --configs mtp --ballast .dev/ballast.py \\
        --deadline-s 420 --out $OUT
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_memory.py --step all --configs none --ballast .dev/ballast.py \\
        --deadline-s 420 --out $OUT
    # the FP8 config (issue 26): its copy of the weights is quantized on the GPU in the build (~17 GB more disk)
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_memory.py --step all --configs fp8 --ballast .dev/ballast.py \\
        --deadline-s 420 --out $OUT
    # (--step build: the checkpoint alone; --step all --configs mtp,none: both in one call where time allows;
    # --loop-configs mtp,none: W3 on the shipped config too)
    # CPU check of the script itself (a minute or two):
    python benchmarks/bench_memory.py --step all --preset tiny --device cpu --dtype float32 --layers 4 --no-ballast \\
        --long-tokens 300 --chats 3 --chat-tokens 64 --chat-new 8 --turns 3 --loop-tokens 300 --loop-new 16 \\
        --loop-configs mtp,none --set limits.max_prompt_tokens=1024 --out /tmp/twin
    # (off CUDA the attention reads every row's whole block table, slots x max_len positions: with the shipped
    # null limits the planner's 64 x 262,144 makes ~16 GiB of the tiny model's K and V at the warm-up's decode
    # batch, so the check caps the prompt)

Each config is ds_config/qwen3.6-27b-2gpu.json as shipped, changed only where one GPU must (model, tp_size 1,
server.port, security.api_key_env null, a generous server.step_timeout_s; on CPU device cpu and dtype float32):
(a) `mtp` as shipped, (b) `none`: the same with speculative.method "none", (c) `options`: `none` with both
inexact cache options (memory.kv_cache_dtype "fp8_e4m3", memory.gdn_state_dtype "bfloat16"), whose W1 and W2
take --options-long-tokens and --options-chats (issue 24: 128k and 24), (d) `fp8`: ds_config/qwen3.6-27b-fp8-2gpu.json
as shipped (MTP on) over the twin's weights quantized in Qwen's block-wise FP8 format (issue 26; the copy is made
on the GPU beside the bf16 one: ~30 + ~17 GB), with the `options` sizes for W1 and W2. For each: launch.sh, start-up to
/health 200, the memory planner's plan (/health's engine.memory and its log line), then
- W1: one prompt of --long-tokens, --long-new tokens (`ignore_eos`), streamed: time to first token, decode ms/token;
- W2: --chats concurrent chats of --chat-tokens prompt + --chat-new tokens: per-request TTFT and TPOT
  ((end - first token) / (tokens - 1)), output tokens/s, how many ran at once (/health's in_flight and
  queue_depth polled, and the clients' own overlap between first token and end);
- W3 (--loop-configs): an agent loop of --turns turns growing to --loop-tokens (each turn: the last turn's messages,
  the reply, a new user message of random text): prompt tokens, cached tokens, TTFT per turn; then, per turn, a cold
  prompt of the same length (a fresh first message: nothing to reuse) and TTFT(turn) / TTFT(cold) (target <= 0.25
  for the turns after the first).
Every response's status and error body is counted, never raised. Writes OUT/DATE-CARD-twin-memory.json
(-twin-memory-<configs>.json when not all configs ran), rewritten after each config, and each config's
server log (its last 2 MB) beside it.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_served import WORDS, Served, checkpoint, free_port  # noqa: E402

SHIPPED = REPO / "ds_config/qwen3.6-27b-2gpu.json"
SHIPPED_FP8 = REPO / "ds_config/qwen3.6-27b-fp8-2gpu.json"
CONFIGS = ("mtp", "none", "options", "fp8")
OPTIONS = {"speculative.method": "none", "memory.kv_cache_dtype": "fp8_e4m3", "memory.gdn_state_dtype": "bfloat16"}


def label(args) -> str:
    layers = args.layers or "all"
    return (f"random {args.dtype} weights; {layers} of 64 layers at tp=1 as one tp=2 rank's memory twin "
            f"({args.preset} widths); figures that depend on content (acceptance) are not meaningful")


# ---- prompts ------------------------------------------------------------------------------------------


class Texts:
    """User texts of a given token count: random words and numbers from a seed of their own, so that no two
    share a prefix. bench_served.prompts re-tokenizes every 16 words, too slow at 96k tokens."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        empty = [{"role": "user", "content": ""}]
        # the chat template's tokens around one user message (with the generation prompt)
        self.overhead = len(self.tok.apply_chat_template(empty, add_generation_prompt=True, tokenize=True,
                                                         enable_thinking=False)["input_ids"])

    def user(self, n_tokens: int, seed: str) -> str:
        rng = random.Random(seed)
        words, ids = [f"{seed}:"], []
        while len(ids) < n_tokens:
            words += [rng.choice(WORDS) if rng.random() < 0.75 else str(rng.randrange(100_000))
                      for _ in range(max(16, n_tokens))]
            ids = self.tok(" ".join(words), add_special_tokens=False)["input_ids"]
        return self.tok.decode(ids[:max(1, n_tokens)])

    def chat(self, n_tokens: int, seed: str) -> str:
        """A first user message whose chat prompt is about n_tokens tokens."""
        return self.user(n_tokens - self.overhead, seed)


def results_header(args, script: str, label: str) -> tuple[str, dict]:
    """A results file's name prefix (DATE-CARD) and its first keys: what ran, where, on which commit and checkpoint."""
    date = datetime.datetime.now(datetime.timezone.utc)
    card = gpu_query("name") if args.device == "cuda" else "cpu"
    short = (card or "unknown").replace("NVIDIA ", "").split(" ")[0]
    status = git("status", "--porcelain", "--untracked-files=no")
    return f"{date:%Y-%m-%d}-{short}", {
        "label": label, "date": date.isoformat(timespec="seconds"), "card": card,
        "command": " ".join(["python", script, *sys.argv[1:]]),
        # DSQV_CODE: the commit as the caller knows it (a device copy's .git can be older than its tree)
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
                "code": os.environ.get("DSQV_CODE")},
        "checkpoint": {"preset": args.preset, "layers": args.layers or "all", "dtype": args.dtype,
                       "weights": "random", "path": str(args.model)}}


# ---- the HTTP client ------------------------------------------------------------------------------------


def chat(port: int, model: str, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    """One streamed chat completion (`ignore_eos`, greedy): status, times since the request was sent (every
    content chunk's in `times`, first and last, end of stream: `t0` is taken before the connection, as
    SGLang's bench_serving does), the reply's text, usage and any error body. Never raises."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                       "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True},
                       "chat_template_kwargs": {"enable_thinking": False}})
    out = {"status": None, "t0": time.perf_counter(), "first_s": None, "last_s": None, "end_s": None,
           "chunks": 0, "times": [], "text": "", "usage": None, "error": None}
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        out["status"] = r.status
        if r.status != 200:
            out["error"] = r.read()[:2000].decode(errors="replace")
        else:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # after the 200: the error travels in the stream
                    out["error"] = json.dumps(chunk["error"])[:2000]
                    continue
                out["usage"] = chunk.get("usage") or out["usage"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        now = time.perf_counter() - out["t0"]
                        out["first_s"] = out["first_s"] if out["first_s"] is not None else now
                        out["last_s"] = now
                        out["times"].append(now)
                        out["chunks"] += 1
                        out["text"] += delta.get("content") or ""
        c.close()
    except (OSError, ValueError, http.client.HTTPException) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["end_s"] = time.perf_counter() - out["t0"]
    return out


def tokens(r: dict) -> int:
    return (r["usage"] or {}).get("completion_tokens") or 0


def prompt_tokens(r: dict) -> int | None:
    return (r["usage"] or {}).get("prompt_tokens")


def cached_tokens(r: dict) -> int | None:
    if r["usage"] is None:
        return None
    return (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def tpot_ms(r: dict) -> float | None:
    n = tokens(r)
    return 1e3 * (r["end_s"] - r["first_s"]) / (n - 1) if r["first_s"] is not None and n > 1 else None


def brief(r: dict) -> dict:
    """What a results file keeps of one response."""
    return {"status": r["status"], "ttft_s": r["first_s"], "tpot_ms": tpot_ms(r), "end_s": r["end_s"],
            "prompt_tokens": prompt_tokens(r), "cached_tokens": cached_tokens(r), "completion_tokens": tokens(r),
            "content_chunks": r["chunks"], "error": r["error"]}


def tally(responses: list[dict]) -> dict:
    """Statuses, 4xx / 5xx, errors carried in a 200's stream, client-side failures, and the distinct bodies."""
    statuses, bodies = {}, []
    for r in responses:
        key = str(r["status"]) if r["status"] is not None else "no_response"
        statuses[key] = statuses.get(key, 0) + 1
        if r["error"] and r["error"] not in bodies:
            bodies.append(r["error"])
    return {"statuses": statuses, "4xx": sum(1 for r in responses if r["status"] and 400 <= r["status"] < 500),
            "5xx": sum(1 for r in responses if r["status"] and r["status"] >= 500),
            "stream_errors": sum(1 for r in responses if r["status"] == 200 and r["error"]),
            "no_response": statuses.get("no_response", 0),
            "without_usage": sum(1 for r in responses if r["status"] == 200 and r["usage"] is None),
            "error_bodies": bodies[:5]}


def health(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


class HealthPoll(threading.Thread):
    """/health's in_flight and queue_depth every `every` s while a workload runs."""

    def __init__(self, port: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.port, self.every, self.done = port, every, threading.Event()
        self.samples: list[tuple[float, int, int]] = []

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.done.is_set():
            try:
                e = health(self.port).get("engine") or {}
                self.samples.append((round(time.perf_counter() - t0, 2), e.get("in_flight"), e.get("queue_depth")))
            except (OSError, ValueError, http.client.HTTPException):
                pass
            self.done.wait(self.every)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        flight = [s[1] for s in self.samples if s[1] is not None]
        queue = [s[2] for s in self.samples if s[2] is not None]
        return {"health_samples": len(self.samples), "max_in_flight": max(flight, default=None),
                "max_queue_depth": max(queue, default=None)}


# ---- the workloads ------------------------------------------------------------------------------------


def w1_long(server: TwinServer, texts: Texts, args) -> dict:
    """One long prompt, streamed."""
    r = chat(server.port, server.name, [{"role": "user", "content": texts.chat(args.long_tokens, f"w1-{server.tag}")}],
             args.long_new, args.request_timeout)
    return {**brief(r), "decode_ms_per_token": tpot_ms(r), "errors": tally([r])}


def w2_chats(server: TwinServer, texts: Texts, args) -> dict:
    """--chats chats at once; how many the engine ran together."""
    msgs = [[{"role": "user", "content": texts.chat(args.chat_tokens, f"w2-{server.tag}-{i}")}]
            for i in range(args.chats)]
    results: list[dict | None] = [None] * args.chats

    def go(i):
        results[i] = chat(server.port, server.name, msgs[i], args.chat_new, args.request_timeout)

    poll = HealthPoll(server.port)
    poll.start()
    threads = [threading.Thread(target=go, args=(i,)) for i in range(args.chats)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    seen = poll.stop()
    # the clients' view: streams between their first token and their end at the same time
    edges = sorted([(r["t0"] + r["first_s"], 1) for r in results if r["first_s"] is not None]
                   + [(r["t0"] + r["end_s"], -1) for r in results if r["first_s"] is not None])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    ttfts = [r["first_s"] for r in results if r["first_s"] is not None]
    tpots = [x for x in map(tpot_ms, results) if x is not None]
    out_tokens = sum(map(tokens, results))
    return {"wall_s": wall, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall,
            "ttft_s_median": statistics.median(ttfts) if ttfts else None, "ttft_s_max": max(ttfts, default=None),
            "tpot_ms_median": statistics.median(tpots) if tpots else None, "tpot_ms_max": max(tpots, default=None),
            "clients_generating_at_once_max": most, **seen, "errors": tally(results),
            "requests": [brief(r) for r in results]}


def w3_loop(server: TwinServer, texts: Texts, args) -> dict:
    """An agent loop growing to --loop-tokens, then a cold prompt of each turn's length."""
    step = args.loop_tokens // args.turns
    messages = [{"role": "user", "content": texts.chat(step, f"w3-{server.tag}-turn0")}]
    turns = []
    for i in range(args.turns):
        if i and args.think_s:  # the agent's own time between turns (the engine saves the last turn's prefix then)
            time.sleep(args.think_s)
        r = chat(server.port, server.name, messages, args.loop_new, args.request_timeout)
        turns.append(r)
        # the next turn: this one's messages, the reply, a new user message (its template's ~5 tokens and the
        # reply's inside the step)
        messages = messages + [{"role": "assistant", "content": r["text"]},
                               {"role": "user", "content": texts.user(step - args.loop_new - 8,
                                                                      f"w3-{server.tag}-turn{i + 1}")}]
    colds = []
    for i, r in enumerate(turns):  # after the loop: the cold prompts' snapshots must not evict the loop's
        n = prompt_tokens(r) or step * (i + 1)
        fresh = [{"role": "user", "content": texts.chat(n, f"w3-{server.tag}-cold{i}")}]
        colds.append(chat(server.port, server.name, fresh, 8, args.request_timeout))
    rows = []
    for i, (r, c) in enumerate(zip(turns, colds)):
        ratio = r["first_s"] / c["first_s"] if r["first_s"] is not None and c["first_s"] else None
        rows.append({"turn": i, **{k: v for k, v in brief(r).items() if k != "tpot_ms"},
                     "cold": {k: v for k, v in brief(c).items() if k not in ("tpot_ms", "end_s")},
                     "ttft_over_cold": ratio,
                     "target_met": None if i == 0 or ratio is None else ratio <= args.target_ratio})
    later = [row["ttft_over_cold"] for row in rows[1:] if row["ttft_over_cold"] is not None]
    return {"turns": rows, "ttft_over_cold_max_after_first": max(later, default=None),
            "target": f"TTFT(turn) / TTFT(cold) <= {args.target_ratio} for every turn after the first",
            "errors": tally(turns + colds)}


WORKLOADS = {"w1": w1_long, "w2": w2_chats, "w3": w3_loop}


# ---- one config ---------------------------------------------------------------------------------------


class TwinServer(Served):
    """launch.sh on the shipped config, changed only where one card must (and, for `none`, no speculation)."""

    def __init__(self, args, workdir: Path, tag: str):
        self.tag, self.port = tag, free_port()
        cfg = json.loads((SHIPPED_FP8 if tag == "fp8" else SHIPPED).read_text())
        changes = {"model": str(args.fp8_model if tag == "fp8" else args.model), "tensor_parallel.tp_size": 1, "server.port": self.port,
                   "security.api_key_env": None, "server.step_timeout_s": args.step_timeout}
        if tag == "none":
            changes["speculative.method"] = "none"
        if tag == "options":
            changes.update(OPTIONS)
        if args.device != cfg["device"]:
            changes["device"] = args.device
        if args.dtype != cfg["dtype"]:
            changes["dtype"] = args.dtype
        changes.update(args.set)
        for key, value in changes.items():
            *path, last = key.split(".")
            node = cfg
            for k in path:
                node = node.setdefault(k, {})
            node[last] = value
        self.changes, self.config = changes, cfg
        self.name = cfg.get("served_model_name") or Path(changes["model"]).name
        path = workdir / f"{tag}.json"
        path.write_text(json.dumps(cfg, indent=1))
        env = dict(os.environ, DSQV_COMPILE_CACHE_DIR=str(args.keep / "compile-cache"))
        for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env.pop(k, None)
        self.log = workdir / f"{tag}.log"
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        # a session of its own: a launch.sh that will not stop can be killed with its children
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([str(REPO / "launch.sh"), "--config", str(path)], cwd=REPO, env=env,
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> dict:
        t = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return {"stop_s": time.perf_counter() - t, "exit_code": self.proc.returncode, "killed": True}
        return {"stop_s": time.perf_counter() - t, "exit_code": self.proc.returncode, "killed": False}

    def compiles_after_ready(self) -> dict:
        """What each rank compiled after ready (/health), kernels named: nothing should have."""
        try:
            ranks = health(self.port)["engine"]["ranks"]
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as e:
            return {"health_after_error": f"{type(e).__name__}: {e}"}
        return {k: [r.get(k) for r in ranks]
                for k in ("compiles_after_ready", "first_compiles_after_ready", "graphs_compiled_after_ready")}

    def finish(self, out_dir: Path, log_name: str) -> dict:
        """Stop the server; how it stopped, what its log says went wrong (the ranks and the front), and its
        log's last 2 MB kept as out_dir/log_name."""
        out = {"stop": self.stop(),
               "log_problems": self.log_lines("Traceback", "Error:", "[ERROR]", "out of memory", "config error",
                                              "exits with return code", "launch.sh:", "memory planner")[:40],
               "log_file": log_name}
        (out_dir / log_name).write_bytes(self.log.read_bytes()[-(2 << 20):])
        return out

    def log_lines(self, *needles: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if any(n in line for n in needles)]


def run_config(args, texts: Texts, workdir: Path, tag: str, t_all: float) -> dict:
    if tag in ("options", "fp8"):  # the sizes the options (and FP8's smaller weights) are to reach
        args = argparse.Namespace(**{**vars(args), "long_tokens": args.options_long_tokens,
                                     "chats": args.options_chats})
    server = TwinServer(args, workdir, tag)
    out: dict = {"changes_from_shipped": server.changes, "limits": server.config.get("limits"),
                 "speculative": server.config.get("speculative")}
    try:
        try:
            out["startup_s"] = server.wait_ready(args.startup_timeout)
        except (RuntimeError, TimeoutError) as e:
            out["startup_error"] = str(e)[-4000:]
            print(f"[{time.perf_counter() - t_all:6.0f} s] {tag}: did not start: {str(e)[:300]}", flush=True)
            return out
        out["startup_phases_s"] = server.phases
        try:
            out["memory_plan"] = (health(server.port).get("engine") or {}).get("memory")
        except (OSError, ValueError, http.client.HTTPException) as e:
            out["memory_plan"] = None
            out["health_error"] = f"{type(e).__name__}: {e}"
        out["memory_plan_log"] = server.log_lines("memory plan:")
        out["warmup_log"] = server.log_lines("warm-up")[-3:]
        print(f"[{time.perf_counter() - t_all:6.0f} s] {tag}: ready in {out['startup_s']:.1f} s; "
              f"{(out['memory_plan_log'] or ['no memory plan line'])[-1]}", flush=True)
        for name in ("w1", "w2", "w3"):
            if name not in args.workloads or (name == "w3" and tag not in args.loop_configs):
                continue
            if args.deadline_s and time.perf_counter() - t_all > args.deadline_s:
                out[name] = {"skipped": f"past --deadline-s {args.deadline_s:g}"}
                print(f"[{time.perf_counter() - t_all:6.0f} s] {tag}: {name} skipped (--deadline-s)", flush=True)
                continue
            t = time.perf_counter()
            try:
                out[name] = WORKLOADS[name](server, texts, args)
            except Exception as e:  # noqa: BLE001 -- a workload's bug must not lose the other figures
                out[name] = {"bench_error": f"{type(e).__name__}: {e}"}
            out[name]["workload_s"] = time.perf_counter() - t
            print(f"[{time.perf_counter() - t_all:6.0f} s] {tag}: {name} done in {out[name]['workload_s']:.1f} s; "
                  f"errors {json.dumps(out[name].get('errors', out[name].get('bench_error')))[:300]}", flush=True)
        out.update(server.compiles_after_ready())
    finally:
        out.update(server.finish(args.out, f"{args.stem}-{tag}.log"))
    return out


# ---- the ballast ----------------------------------------------------------------------------------------


def gpu_query(field: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class Ballast:
    """ballast.py in a process of its own: started before the servers, stopped after (also on an error)."""

    def __init__(self, args):
        self.args, self.proc = args, None
        self.info = {"script": None if args.no_ballast else str(args.ballast),
                     "leave_gib": None if args.no_ballast else args.leave_gib}

    def start(self) -> None:
        args = self.args
        self.info["free_mib_before"] = gpu_query("memory.free")
        if args.no_ballast:
            return
        self.proc = subprocess.Popen([sys.executable, str(args.ballast), "--leave-gib", str(args.leave_gib)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in self.proc.stdout:  # until it says what it holds (or dies)
            lines.append(line.rstrip())
            if line.startswith("ballast:"):
                break
        self.info["line"] = lines[-1] if lines else None
        self.info["holding"] = bool(lines) and lines[-1].startswith("ballast: holding")
        if not self.info["holding"]:
            self.info["output"] = lines[-20:]
        self.info["free_mib_after"] = gpu_query("memory.free")
        print(f"{self.info.get('line')} (nvidia-smi free MiB {self.info['free_mib_before']} -> "
              f"{self.info['free_mib_after']})", flush=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- main ---------------------------------------------------------------------------------------------


def git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def summary(result: dict) -> str:
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    rows = [("config", "start s", "KV tokens", "slots", "max prompt", "W1 TTFT s", "W1 ms/tok", "W2 tok/s",
             "W2 at once", "W2 TTFT p50", "W2 TPOT p50", "W3 max ratio", "4xx/5xx/stream")]
    for tag, c in result["configs"].items():
        plan = c.get("memory_plan") or {}
        w1, w2, w3 = c.get("w1") or {}, c.get("w2") or {}, c.get("w3") or {}
        errs = [c.get(w, {}).get("errors") or {} for w in ("w1", "w2", "w3")]
        at_once = f"{w2.get('max_in_flight', '-')}/{w2.get('clients_generating_at_once_max', '-')}" if w2 else "-"
        rows.append((tag, f(c.get("startup_s")), f(plan.get("kv_tokens"), "{:,}"), f(plan.get("max_slots"), "{}"),
                     f(plan.get("max_prompt_tokens"), "{:,}"), f(w1.get("ttft_s"), "{:.2f}"),
                     f(w1.get("decode_ms_per_token"), "{:.2f}"), f(w2.get("output_tokens_per_s")), at_once,
                     f(w2.get("ttft_s_median"), "{:.2f}"), f(w2.get("tpot_ms_median"), "{:.2f}"),
                     f(w3.get("ttft_over_cold_max_after_first"), "{:.3f}"),
                     "/".join(str(sum(e.get(k, 0) for e in errs)) for k in ("4xx", "5xx", "stream_errors"))
                     if "startup_error" not in c and "skipped" not in c else c.get("skipped", "did not start")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    for tag, c in result["configs"].items():
        for row in (c.get("w3") or {}).get("turns", []):
            lines.append(f"{tag} W3 turn {row['turn']}: prompt {row['prompt_tokens']} cached {row['cached_tokens']} "
                         f"TTFT {f(row['ttft_s'], '{:.3f}')} s, cold {f(row['cold']['ttft_s'], '{:.3f}')} s "
                         f"(cached {row['cold']['cached_tokens']}): ratio {f(row['ttft_over_cold'], '{:.3f}')}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--step", default="all", choices=["build", "twin", "all"])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results", help="folder for the results JSON")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the checkpoint (default $DSQV_CACHE_DIR: bench_served.py --layers N's own)")
    p.add_argument("--preset", default="27b", help="checkpoint.PRESETS widths")
    p.add_argument("--layers", type=int, default=32, help="text layers (a multiple of 4; 0: the preset's)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--ballast", type=Path, default=REPO.parent / "shared/device/ballast.py")
    p.add_argument("--leave-gib", type=float, default=34.0, help="free GPU memory the ballast leaves")
    p.add_argument("--no-ballast", action="store_true")
    p.add_argument("--configs", default="mtp,none",
                   help="which configs run: mtp (as shipped), none (no speculation), options (none + FP8 KV + bf16 "
                        "state), fp8 (the shipped FP8 config over the twin's weights quantized)")
    p.add_argument("--options-long-tokens", type=int, default=128_000, help="W1's prompt tokens with `options`")
    p.add_argument("--options-chats", type=int, default=24, help="W2's concurrent chats with `options`")
    p.add_argument("--loop-configs", default="none", help="the configs that also run W3 (the agent loop)")
    p.add_argument("--workloads", default="w1,w2,w3")
    p.add_argument("--long-tokens", type=int, default=96_000, help="W1's prompt tokens")
    p.add_argument("--long-new", type=int, default=64, help="W1's output tokens")
    p.add_argument("--chats", type=int, default=16, help="W2's concurrent chats")
    p.add_argument("--chat-tokens", type=int, default=4096, help="W2's prompt tokens per chat")
    p.add_argument("--chat-new", type=int, default=512, help="W2's output tokens per chat")
    p.add_argument("--turns", type=int, default=8, help="W3's turns")
    p.add_argument("--loop-tokens", type=int, default=64_000, help="W3's prompt at the last turn")
    p.add_argument("--loop-new", type=int, default=64, help="W3's reply tokens per turn")
    p.add_argument("--think-s", type=float, default=0.0, help="W3's pause between a reply and the next turn")
    p.add_argument("--target-ratio", type=float, default=0.25, help="W3's TTFT(turn) / TTFT(cold) target")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=300, help="HTTP read timeout per request")
    p.add_argument("--step-timeout", type=float, default=600, help="server.step_timeout_s (generous)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no config or workload past this many seconds since the start (a device call's limit)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a further config change (dotted key, JSON value), recorded: for CPU runs of the script "
                        "only (the twin changes nothing more)")
    args = p.parse_args()
    t_all = time.perf_counter()  # the call's clock: --deadline-s counts the build in
    args.configs = [c for c in args.configs.split(",") if c]
    args.loop_configs = [c for c in args.loop_configs.split(",") if c]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.set = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    if not set(args.configs + args.loop_configs) <= set(CONFIGS) or not set(args.workloads) <= set(WORKLOADS):
        p.error(f"configs are {CONFIGS}, workloads {tuple(WORKLOADS)}")
    if not args.no_ballast and args.step != "build" and not args.ballast.exists():
        p.error(f"no ballast script at {args.ballast} (--ballast PATH, or --no-ballast)")
    args.layers = args.layers or None
    cache = Path(os.environ.get("DSQV_CACHE_DIR", Path.home() / ".cache/ds-qwen-vision"))
    name = f"{args.preset}-{args.layers}layers" if args.layers else args.preset
    args.ckpt_dir = (args.workdir or cache) / f"bench-{name}-{args.dtype}"  # bench_served.checkpoint's name
    args.fp8_model = args.ckpt_dir.with_name(args.ckpt_dir.name + "-fp8")
    if args.step == "build":
        checkpoint(args)
        if "fp8" in args.configs:
            from ds_qwen_vision.checkpoint import quantize_fp8_checkpoint

            quantize_fp8_checkpoint(args.ckpt_dir, args.fp8_model, device="cuda" if args.device == "cuda" else None)
        return
    # The build makes the weights on the GPU: in a process of its own, so that this one holds no device memory
    # (a second build returns at once)
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--step", "build"], check=True)
    args.model = args.ckpt_dir
    args.keep = cache / "bench-memory"  # the compile cache, kept between calls like the checkpoint
    args.keep.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    prefix, result = results_header(args, "benchmarks/bench_memory.py", label(args))
    args.stem = f"{prefix}-twin-memory" + ("" if sorted(args.configs) == sorted(CONFIGS)
                                           else "-" + "-".join(args.configs))
    t_twin = time.perf_counter()
    texts = Texts(args.model)
    result |= {"shipped_config": {"path": str(SHIPPED.relative_to(REPO)), "as_read": json.loads(SHIPPED.read_text())},
               "shipped_fp8_config": {"path": str(SHIPPED_FP8.relative_to(REPO)),
                                      "as_read": json.loads(SHIPPED_FP8.read_text())},
              "sizes": {k: getattr(args, k) for k in ("long_tokens", "long_new", "chats", "chat_tokens", "chat_new",
                                                      "turns", "loop_tokens", "loop_new", "think_s", "options_long_tokens",
                                                      "options_chats")},
              "configs": {}}
    path = args.out / f"{args.stem}.json"
    ballast = Ballast(args)
    result["ballast"] = ballast.info
    try:
        ballast.start()
        with tempfile.TemporaryDirectory(prefix="dsqv-twin-", dir="/tmp") as work:
            for tag in args.configs:
                if args.deadline_s and time.perf_counter() - t_all > args.deadline_s:
                    result["configs"][tag] = {"skipped": f"past --deadline-s {args.deadline_s:g}"}
                    continue
                result["configs"][tag] = run_config(args, texts, Path(work), tag, t_all)
                path.write_text(json.dumps(result, indent=1) + "\n")  # what is done survives a cut-off call
    finally:
        ballast.info["alive_at_end"] = None if ballast.proc is None else ballast.proc.poll() is None
        ballast.stop()
    result["twin_s"] = time.perf_counter() - t_twin
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    print(f"wrote {path} (the twin step {result['twin_s']:.0f} s, the call {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
