"""The peers' serving benchmark (issue 25): launch.sh on one card, streamed by SGLang's workloads and metrics.

Our own client, following the definitions of SGLang's `python -m sglang.bench_serving` (random dataset with
--random-range-ratio 1, --max-concurrency, --warmup-requests; its calculate_metrics): aiperf and guidellm need
`datasets` + pyarrow, too large to carry to the GPU machine, and sglang itself is not installed there.

    # GPU (one H100/H200, tp=1): random weights with the whole 27B's shapes (64 layers; `--layers 16` for a
    # quarter). Each line is one call under ten minutes; the first makes the checkpoint (~54 GB, on the GPU,
    # ~2 minutes), the others need it (--step bench never builds) and start the server anew (~2-3 minutes):
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_serving.py --step build
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_serving.py --step bench --speculative none \\
        --cells 8192/1024@1,8192/1024@16 --deadline-s 480 --out $OUT
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_serving.py --step bench --speculative mtp \\
        --cells 8192/1024@1,8192/1024@16 --deadline-s 480 --out $OUT
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_serving.py --step bench --speculative none \\
        --cells 1024/1024@1,1024/1024@16,image@1,image@8 --deadline-s 480 --out $OUT
    # (--cells 8192/1024@64 and 1024/1024@64 where time allows: 128 requests)
    # the FP8 checkpoint (issue 26): --fp8 on every line; its build quantizes the bf16 one on the GPU, replacing
    # its shards one by one (both do not fit the 64 GB disk), so a bf16 run after it builds again
    DSQV_CACHE_DIR=/tmp/dsqv python3 benchmarks/bench_serving.py --step all --fp8 --speculative none \
        --cells 8192/1024@1,8192/1024@16 --deadline-s 420 --out $OUT
    # CPU check of the script itself (~20 s on two cores; tests/test_bench_serving.py runs it, marked slow):
    python benchmarks/bench_serving.py --step all --preset tiny --layers 4 --device cpu --dtype float32 \\
        --cells 64/8@1,64/8@2,image@1 --image-side 64 --image-text 16 --image-out 8 \\
        --set limits.max_prompt_tokens=1024 --out /tmp/serving
    # (off CUDA the shipped null limits.max_prompt_tokens makes the warm-up's decode batch huge: bench_memory.py)

The server: ds_config/qwen3.6-27b-2gpu.json as shipped, changed only where one GPU must (bench_memory's
TwinServer: model, tp_size 1, port, no API key, a generous step timeout; on CPU device and dtype), with
speculative.method from --speculative (mtp as shipped, or none) and --set KEY=JSON for anything further (recorded).
limits.max_prompt_tokens stays null (what one sequence's KV holds: on one card with the 27B, far more than the
8,192 tokens the cells need; the memory planner's plan from /health is recorded).

A cell is ISL/OSL@C (prompts of exactly ISL tokens, chat template included, by the checkpoint's tokenizer, the
server's own: the built checkpoints' demo tokenizer, not Qwen's; OSL tokens out with `ignore_eos`) or image@C
(one --image-side square PNG of random pixels as a data URL, then --image-text tokens of text; --image-out
tokens out: SGLang's image dataset with --random-input-len 64 --random-output-len 128). Every prompt and image
is distinct (the prefix and image caches cannot help).
Per cell: --warmup-requests requests of the cell's shape with min(OSL, 32) tokens out, sent together and not
counted (SGLang's warm-up); then max(2, ceil(--requests-factor x C)) requests, at most C in flight (a cap, as
SGLang's semaphore: all are issued at once), every response streamed (`stream_options.include_usage`, so
token counts come from `usage`). Metrics (SGLang's, all in ms but throughputs):
- TTFT: request sent -> first content chunk; E2E: request sent -> end of stream;
- TPOT per request: (E2E - TTFT) / (output tokens - 1);
- ITL: every gap between two consecutive content chunks of one request, all requests pooled (with speculative
  decoding one chunk can carry several tokens: tokens per chunk is recorded, output tokens / content chunks;
  a client cannot count each chunk's own tokens without `logprobs`, which turns speculation off);
- mean, median, p99 of each (ITL also p95 and max); output and input tokens/s and requests/s over the cell's
  wall time (first request sent to last response done); concurrency = sum of E2E / wall time;
- errors by status (4xx, 5xx, errors inside a 200's stream, no response), never raised; /health's in_flight
  and queue_depth while the cell runs (the engine's own concurrency); the speculative drafts verified and
  accepted (/metrics) during the cell.
Beside each cell, SGLang's published rows for the same cell (SGLANG below). Writes
OUT/DATE-CARD-serving-<speculative>-<cells>.json, rewritten after each cell (a call cut short keeps what ran),
and the server log's last 2 MB beside it; prints a table per cell and a summary.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_memory import SHIPPED, HealthPoll, Texts, TwinServer, chat, health, results_header, tally  # noqa: E402
from bench_served import checkpoint  # noqa: E402

# SGLang's published figures (source: the SGLang cookbook's Qwen3.5 / Qwen3.6 27B pages; one H200, bf16
# activations, TP1, `sglang.bench_serving` random dataset, ISL 8192 / OSL 1024), beside the same cell.
SGLANG_SOURCE = "SGLang cookbook, Qwen3.5-27B / Qwen3.6-27B, one H200, TP1, random ISL 8192 / OSL 1024"
SGLANG = [
    {"cell": "8192/1024@1", "speculative": "none", "weights": "bf16", "model": "Qwen3.5-27B", "sglang": "0.5.15",
     "ttft_ms": 458, "tpot_ms": 14.87},
    {"cell": "8192/1024@1", "speculative": "mtp", "weights": "bf16", "model": "Qwen3.6-27B", "sglang": "0.5.16",
     "ttft_ms": 734, "tpot_ms": 5.61},
    {"cell": "8192/1024@16", "speculative": "mtp", "weights": "bf16", "model": "Qwen3.6-27B", "sglang": "0.5.16",
     "ttft_ms": 1198, "tpot_ms": 17.28},
    {"cell": "8192/1024@1", "speculative": "none", "weights": "fp8", "model": "27B FP8 checkpoint", "sglang": None,
     "ttft_ms": 326, "tpot_ms": 10.25},
    {"cell": "8192/1024@1", "speculative": "mtp", "weights": "fp8", "model": "27B FP8 checkpoint", "sglang": None,
     "ttft_ms": 487, "tpot_ms": 4.30},
]
DEFAULT_CELLS = "8192/1024@1,8192/1024@16,1024/1024@1,1024/1024@16,image@1,image@8"
WARMUP_TOKENS = 32  # SGLang's warm-up output length: min(OSL, 32)


def label(args) -> str:
    fmt = "; FP8: those weights quantized in 128 x 128 blocks (Qwen's format)" if args.fp8 else ""
    return (f"random {args.dtype} weights{fmt}, the {args.preset} preset's widths with {args.layers or 'all its'} text "
            f"layers (the 27B: 64) at tp=1, speculative {args.speculative}; with MTP, TPOT, ITL and throughput depend "
            "on how many drafts are accepted, which random weights make meaningless (a random draft head is almost "
            "never right): compare TTFT, and TPOT without speculation")


# ---- cells --------------------------------------------------------------------------------------------


def parse_cells(spec: str, image_text: int = 64, image_out: int = 128) -> list[dict]:
    """'8192/1024@16,image@8' -> the cells: name, kind (text or image), isl (text tokens), osl, concurrency."""
    cells = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        shape, at, conc = name.partition("@")
        try:
            concurrency = int(conc)
            if shape == "image":
                cell = {"kind": "image", "isl": image_text, "osl": image_out}
            else:
                isl, slash, osl = shape.partition("/")
                cell = {"kind": "text", "isl": int(isl), "osl": int(osl)}
        except ValueError:
            raise ValueError(f"cell {name!r}: expected ISL/OSL@CONCURRENCY or image@CONCURRENCY") from None
        if not at or concurrency < 1 or cell["isl"] < 1 or cell["osl"] < 1:
            raise ValueError(f"cell {name!r}: expected ISL/OSL@CONCURRENCY or image@CONCURRENCY, all >= 1")
        cells.append({"name": name, **cell, "concurrency": concurrency})
    return cells


def slug(name: str) -> str:
    """A cell's name in a file name (letters, digits, '-' only: the device tool drops odd names)."""
    return name.replace("/", "x").replace("@", "c")


def requests_for(concurrency: int, factor: float) -> int:
    """Requests in a cell: about `factor` x the concurrency (steady state at the cap), at least 2."""
    return max(2, math.ceil(factor * concurrency))


# ---- prompts --------------------------------------------------------------------------------------------


def chat_tokens(texts: Texts, text: str) -> int:
    return len(texts.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, enable_thinking=False)["input_ids"])


def exact_chat(texts: Texts, n_tokens: int, seed: str) -> str:
    """A user text whose chat prompt (template included) is exactly n_tokens tokens (SGLang's
    --random-range-ratio 1). Texts.chat is close, not always exact: decoding a cut token list and encoding it
    again can merge tokens at the cut, and the template trims a text that ends in a space (1 prompt in 20 of
    the tiny tokenizer's was one short). So the length is checked, and cuts near the first tried until one is
    exact (the same seed gives the same words, cut one token later or earlier); where no cut is (a cut after a
    space token is trimmed to the one before it), the words of a seed of its own."""
    want = n_tokens - texts.overhead
    for attempt in range(8):
        s = seed if attempt == 0 else f"{seed}.{attempt}"
        for k in (want + d for d in (0, 1, -1, 2, -2)):
            if k >= 1 and chat_tokens(texts, text := texts.user(k, s)) == n_tokens:
                return text
    raise ValueError(f"no user text makes a chat prompt of exactly {n_tokens} tokens (seed {seed!r}; the "
                     f"template alone is {texts.overhead})")


def random_png(side: int, seed: str) -> str:
    """A side x side PNG of random pixels (SGLang's --image-content random) as a data URL."""
    from PIL import Image

    img = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # random pixels do not compress: spend no time trying
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(texts: Texts, cell: dict, seed: str, image_side: int) -> list[dict]:
    """One request's messages: a distinct prompt, or for an image cell a distinct image then the text, in
    SGLang's order. The seed's digest opens the text (Texts.user): prompts differ from their first tokens on
    (the seed itself, "8192x1024c16-3", would give a cell's prompts a common opening)."""
    seed = hashlib.sha256(seed.encode()).hexdigest()[:16]
    if cell["kind"] == "text":
        return [{"role": "user", "content": exact_chat(texts, cell["isl"], seed)}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": random_png(image_side, seed)}},
                                         {"type": "text", "text": texts.user(cell["isl"], seed)}]}]


# ---- the client ---------------------------------------------------------------------------------------


def ok(r: dict) -> bool:
    """Completed, as SGLang counts success (a 200 streamed to its end), with a first token and usage."""
    return r["status"] == 200 and r["error"] is None and r["first_s"] is not None and r["usage"] is not None


def out_tokens(r: dict) -> int:
    return (r["usage"] or {}).get("completion_tokens") or 0


def in_tokens(r: dict) -> int:
    return (r["usage"] or {}).get("prompt_tokens") or 0


def tpot_s(r: dict) -> float | None:
    n = out_tokens(r)
    return (r["end_s"] - r["first_s"]) / (n - 1) if ok(r) and n > 1 else None


def itls_s(r: dict) -> list[float]:
    return [b - a for a, b in zip(r["times"], r["times"][1:])]


def stats(seconds: list[float], pcts=(99,), top: bool = False) -> dict | None:
    """mean, median and percentiles in ms (numpy's linear percentile, as SGLang's np.percentile)."""
    if not seconds:
        return None
    a = 1e3 * np.asarray(seconds, dtype=float)
    out = {"n": len(a), "mean": float(a.mean()), "median": float(np.median(a)),
           **{f"p{p}": float(np.percentile(a, p)) for p in pcts}}
    if top:
        out["max"] = float(a.max())
    return out


def cell_metrics(responses: list[dict], wall_s: float) -> dict:
    """SGLang's calculate_metrics over one cell's responses (failed ones count only in `errors`)."""
    done = [r for r in responses if ok(r)]
    tokens_out, tokens_in = sum(map(out_tokens, done)), sum(map(in_tokens, done))
    e2e = [r["end_s"] for r in done]
    chunks = sum(len(r["times"]) for r in done)
    prompt_lens = [in_tokens(r) for r in done]
    return {"requests": len(responses), "completed": len(done), "failed": len(responses) - len(done),
            "wall_s": wall_s, "output_tokens": tokens_out, "input_tokens": tokens_in,
            "output_tokens_per_s": tokens_out / wall_s, "input_tokens_per_s": tokens_in / wall_s,
            "requests_per_s": len(done) / wall_s, "concurrency": sum(e2e) / wall_s,
            "prompt_tokens_min_max": [min(prompt_lens), max(prompt_lens)] if done else None,
            "ttft_ms": stats([r["first_s"] for r in done]),
            "tpot_ms": stats([x for x in map(tpot_s, done) if x is not None]),
            "itl_ms": stats([g for r in done for g in itls_s(r)], pcts=(95, 99), top=True),
            "e2e_ms": stats(e2e),
            "content_chunks": chunks, "tokens_per_chunk": tokens_out / chunks if chunks else None,
            "errors": tally(responses)}


def brief(r: dict) -> dict:
    """What the results file keeps of one response (not its every chunk)."""
    t = tpot_s(r)
    return {"status": r["status"], "ttft_ms": None if r["first_s"] is None else 1e3 * r["first_s"],
            "tpot_ms": None if t is None else 1e3 * t, "e2e_ms": 1e3 * r["end_s"], "prompt_tokens": in_tokens(r),
            "completion_tokens": out_tokens(r), "content_chunks": len(r["times"]), "error": r["error"]}


def spec_counters(port: int) -> dict[str, float]:
    """The speculative drafts verified and accepted so far (/metrics); empty where the server has none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    names = {"dsqv_spec_draft_tokens_total": "drafts", "dsqv_spec_accepted_tokens_total": "accepted"}
    return {names[s.name]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in names}


# ---- one cell -----------------------------------------------------------------------------------------


def run_cell(server: TwinServer, cell: dict, warm: list[list[dict]], prompts: list[list[dict]], args) -> dict:
    def send(msgs, max_tokens):
        return chat(server.port, server.name, msgs, max_tokens, args.request_timeout)

    if warm:  # SGLang's warm-up: the cell's shape, a short output, all at once; not counted
        with ThreadPoolExecutor(len(warm)) as ex:
            warmed = list(ex.map(lambda m: send(m, min(cell["osl"], WARMUP_TOKENS)), warm))
    before = spec_counters(server.port)
    poll = HealthPoll(server.port)
    poll.start()
    t = time.perf_counter()
    # at most `concurrency` in flight: each worker sends its next request when its last one ends (SGLang's
    # semaphore with --request-rate inf)
    with ThreadPoolExecutor(cell["concurrency"]) as ex:
        responses = list(ex.map(lambda m: send(m, cell["osl"]), prompts))
    wall = time.perf_counter() - t
    seen = poll.stop()
    after = spec_counters(server.port)
    out = cell_metrics(responses, wall)
    spec = {k: after[k] - before.get(k, 0.0) for k in after}
    if spec.get("drafts"):
        spec["acceptance"] = spec["accepted"] / spec["drafts"]
    out.update({"cell": cell, "server": seen, "speculative_drafts": spec,
                "warmup": {"requests": len(warm), "errors": tally(warmed) if warm else None},
                "responses": [brief(r) for r in responses]})
    out.update(server.compiles_after_ready())
    return out


# ---- tables -------------------------------------------------------------------------------------------


def f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def cell_table(name: str, c: dict, speculative: str) -> str:
    if "completed" not in c:
        return f"== {name}: {c.get('skipped') or c.get('bench_error')}"
    e = c["errors"]
    lines = [f"== {name} (speculative {speculative}): {c['requests']} requests, at most "
             f"{c['cell']['concurrency']} in flight; {c['completed']} completed, {c['failed']} failed "
             f"(4xx {e['4xx']}, 5xx {e['5xx']}, in stream {e['stream_errors']}, no response {e['no_response']}); "
             f"wall {c['wall_s']:.1f} s",
             f"{'':10}{'mean':>10}{'median':>10}{'p99':>10}"]
    for key, title in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms"), ("e2e_ms", "E2E ms")):
        s = c[key] or {}
        extra = f"   (p95 {f(s.get('p95'))}, max {f(s.get('max'))})" if key == "itl_ms" and s else ""
        lines.append(f"{title:10}{f(s.get('mean')):>10}{f(s.get('median')):>10}{f(s.get('p99')):>10}{extra}")
    spec = c.get("speculative_drafts") or {}
    lines.append(f"output {c['output_tokens_per_s']:.1f} tok/s, input {c['input_tokens_per_s']:.1f} tok/s, "
                 f"{c['requests_per_s']:.3f} req/s; concurrency {c['concurrency']:.2f}; "
                 f"{f(c['tokens_per_chunk'], '{:.2f}')} tokens/chunk; prompt tokens {c['prompt_tokens_min_max']}; "
                 f"engine in flight max {c['server'].get('max_in_flight')}, queue max "
                 f"{c['server'].get('max_queue_depth')}"
                 + (f"; drafts accepted {spec['accepted']:.0f} of {spec['drafts']:.0f}" if spec.get("drafts") else ""))
    for row in c.get("sglang", []):
        lines.append(f"SGLang {row['sglang'] or '(version not given)'} ({row['model']}, {row['weights']}, speculative "
                     f"{row['speculative']}, H200): TTFT {row['ttft_ms']:,} ms, TPOT {row['tpot_ms']} ms")
    return "\n".join(lines)


def summary(result: dict) -> str:
    rows = [("cell", "done/reqs", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50",
             "out tok/s", "req/s", "tok/chunk", f"SGLang TTFT/TPOT (same spec, {result.get('weights', 'bf16')})")]
    for name, c in result["cells"].items():
        if "completed" not in c:
            rows.append((name, c.get("skipped") or c.get("bench_error", "?")[:60], *[""] * 11))
            continue
        ref = [r for r in c.get("sglang", []) if r["speculative"] == result["speculative"]
               and r["weights"] == result.get("weights", "bf16")]
        rows.append((name, f"{c['completed']}/{c['requests']}",
                     *(f((c[k] or {}).get(p)) for k in ("ttft_ms", "tpot_ms", "itl_ms") for p in ("median", "p99")),
                     f((c["e2e_ms"] or {}).get("median")), f(c["output_tokens_per_s"]),
                     f(c["requests_per_s"], "{:.3f}"), f(c["tokens_per_chunk"], "{:.2f}"),
                     f"{ref[0]['ttft_ms']} / {ref[0]['tpot_ms']}" if ref else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


# ---- main ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--step", default="all", choices=["build", "bench", "all"],
                   help="build: the checkpoint only; bench: the cells (the checkpoint must exist); all: both")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results", help="folder for the results JSON")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the checkpoint (default $DSQV_CACHE_DIR, as bench_served/bench_memory)")
    p.add_argument("--preset", default="27b", help="checkpoint.PRESETS widths")
    p.add_argument("--layers", type=int, default=0, help="text layers (a multiple of 4; 0: the preset's, 64)")
    p.add_argument("--fp8", action="store_true",
                   help="serve the checkpoint in Qwen's block-wise FP8 format: --step build quantizes the random "
                        "bf16 one on the device, its shards replaced one by one (the two do not fit one disk)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--speculative", default="mtp", choices=["mtp", "none"],
                   help="speculative.method (mtp: as shipped)")
    p.add_argument("--cells", default=DEFAULT_CELLS, help="ISL/OSL@CONCURRENCY or image@CONCURRENCY, comma-separated")
    p.add_argument("--requests-factor", type=float, default=2.0,
                   help="requests per cell: max(2, ceil(factor x concurrency))")
    p.add_argument("--warmup-requests", type=int, default=2, help="per cell, not counted (SGLang's: 1)")
    p.add_argument("--image-side", type=int, default=1024, help="image cells: the PNG's width and height")
    p.add_argument("--image-text", type=int, default=64, help="image cells: text tokens beside the image")
    p.add_argument("--image-out", type=int, default=128, help="image cells: output tokens")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a further config change (dotted key, JSON value), recorded")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--request-timeout", type=float, default=600, help="HTTP read timeout per request")
    p.add_argument("--step-timeout", type=float, default=600, help="server.step_timeout_s (generous)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no cell past this many seconds since the start (a device call's limit)")
    args = p.parse_args()
    t_all = time.perf_counter()
    try:
        cells = parse_cells(args.cells, args.image_text, args.image_out)
    except ValueError as e:
        p.error(str(e))
    args.set = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    args.layers = args.layers or None
    cache = Path(os.environ.get("DSQV_CACHE_DIR", Path.home() / ".cache/ds-qwen-vision"))
    name = f"{args.preset}-{args.layers}layers" if args.layers else args.preset
    args.ckpt_dir = (args.workdir or cache) / f"bench-{name}-{args.dtype}"  # bench_served.checkpoint's name
    from ds_qwen_vision.checkpoint import MARKER_FILE

    fp8_dir = args.ckpt_dir.with_name(args.ckpt_dir.name + "-fp8")
    if args.step == "build":
        if args.fp8 and (fp8_dir / MARKER_FILE).exists():
            print(f"checkpoint {fp8_dir} ready", flush=True)
        elif args.fp8:
            from ds_qwen_vision.checkpoint import quantize_fp8_checkpoint

            t = time.perf_counter()
            quantize_fp8_checkpoint(checkpoint(args), fp8_dir, device="cuda" if args.device == "cuda" else None,
                                    consume=True)
            print(f"checkpoint {fp8_dir} (FP8, 128 x 128 blocks) ready in {time.perf_counter() - t:.0f} s", flush=True)
        else:
            checkpoint(args)
        return
    if args.step == "all":  # in a process of its own: the weights are made on the GPU, this one holds none
        import subprocess

        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--step", "build"], check=True)

    if args.fp8:
        args.ckpt_dir = fp8_dir
    if not (args.ckpt_dir / MARKER_FILE).exists():
        p.error(f"no checkpoint at {args.ckpt_dir}: run --step build first (same --preset/--layers/--dtype/--fp8)")
    args.model = args.ckpt_dir
    args.keep = cache / "bench-serving"  # the compile cache, kept between calls like the checkpoint
    args.keep.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    prefix, result = results_header(args, "benchmarks/bench_serving.py", label(args))
    stem = f"{prefix}-serving-{'fp8-' if args.fp8 else ''}{args.speculative}-" + "-".join(slug(c["name"]) for c in cells)
    result |= {"speculative": args.speculative, "weights": "fp8" if args.fp8 else "bf16",
              "method": {"client": "ours, SGLang bench_serving's definitions", "requests_factor": args.requests_factor,
                         "warmup_requests": args.warmup_requests, "warmup_output_tokens": f"min(OSL, {WARMUP_TOKENS})",
                         "image": {"side": args.image_side, "format": "png", "content": "random",
                                   "text_tokens": args.image_text, "output_tokens": args.image_out},
                         "prompts": "distinct random words and numbers, exactly ISL tokens with the chat template "
                                    "(enable_thinking false), ignore_eos, temperature 0"},
              "sglang_source": SGLANG_SOURCE, "cells": {}}
    path = args.out / f"{stem}.json"
    with tempfile.TemporaryDirectory(prefix="dsqv-serving-", dir="/tmp") as work:
        server = TwinServer(args, Path(work), args.speculative)
        result.update({"changes_from_shipped": server.changes, "shipped_config": str(SHIPPED.relative_to(REPO)),
                       "limits": server.config.get("limits"), "speculative_config": server.config.get("speculative")})
        try:
            # the prompts while the server starts (its own processes): tokenizing 8k-token prompts takes seconds
            t = time.perf_counter()
            texts = Texts(args.model)
            work_items = {}
            for cell in cells:
                n, tag = requests_for(cell["concurrency"], args.requests_factor), slug(cell["name"])
                work_items[cell["name"]] = (
                    [messages(texts, cell, f"{tag}-warm{i}", args.image_side) for i in range(args.warmup_requests)],
                    [messages(texts, cell, f"{tag}-{i}", args.image_side) for i in range(n)])
            result["prompts_s"] = time.perf_counter() - t
            try:
                result["startup_s"] = server.wait_ready(args.startup_timeout)
            except (RuntimeError, TimeoutError) as e:
                result["startup_error"] = str(e)[-4000:]
                print(f"server did not start: {str(e)[-2000:]}", flush=True)
                return
            result["startup_phases_s"] = server.phases
            try:
                result["memory_plan"] = (health(server.port).get("engine") or {}).get("memory")
            except (OSError, ValueError, http.client.HTTPException) as e:
                result["memory_plan"] = None
                result["health_error"] = f"{type(e).__name__}: {e}"
            result["memory_plan_log"] = server.log_lines("memory plan:")
            print(f"[{time.perf_counter() - t_all:6.0f} s] ready in {result['startup_s']:.1f} s; "
                  f"{(result['memory_plan_log'] or ['no memory plan line'])[-1]}", flush=True)
            for cell in cells:
                name = cell["name"]
                if args.deadline_s and time.perf_counter() - t_all > args.deadline_s:
                    result["cells"][name] = {"skipped": f"past --deadline-s {args.deadline_s:g}"}
                else:
                    try:
                        result["cells"][name] = run_cell(server, cell, *work_items[name], args)
                    except Exception as e:  # noqa: BLE001 -- a cell's bug must not lose the other cells' figures
                        result["cells"][name] = {"bench_error": f"{type(e).__name__}: {e}"}
                result["cells"][name]["sglang"] = [r for r in SGLANG if r["cell"] == name]
                path.write_text(json.dumps(result, indent=1) + "\n")  # what is done survives a cut-off call
                print(f"[{time.perf_counter() - t_all:6.0f} s]\n"
                      + cell_table(name, result["cells"][name], args.speculative), flush=True)
        finally:
            result.update(server.finish(args.out, f"{stem}.log"))
            result["call_s"] = time.perf_counter() - t_all
            path.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    print(f"wrote {path} (the call {result['call_s']:.0f} s)")


if __name__ == "__main__":
    main()
