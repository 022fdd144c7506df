"""Paged KV against the static cache it replaced: the same step timings on two source trees, one GPU, one call.

    # a tree is a copy of the repository (git archive); this script is run from each, so that it imports that
    # tree's ds_qwen_vision (eca83e7, the parent of the paged KV, had one static KV region per slot)
    python3 TREE/benchmarks/bench_paged.py --label static --out OUT/static.json
    python3 TREE2/benchmarks/bench_paged.py --label paged --out OUT/paged.json
    python3 benchmarks/bench_paged.py --collect OUT/static.json OUT/paged.json --command "..."

The 27B's widths with `--layers` of its 64 layers (32: the memory twin of issue 24), random bf16 weights made on
the device, tp=1, timed through ModelRunner (what every rank runs): time to first token of an 8,192-token prompt
(one forward, and in 2,048-token chunks as the engine plans it), of a 1,024-token prompt (a prefill graph's
size), and the decode step at 1 and 16 rows with 512 and 8,192 tokens of context. The runner is built without an engine, so each slot reads its fixed share of the
block pool (SlotState.static_blocks): the tables are ordered, not shuffled as in serving. Medians over repeats.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # and its bench_27b


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 1200, (n,), generator=g).tolist()


def build(args):
    """The 27B's widths with --layers layers (--preset), random weights made on the device, tp=1: (model, device)."""
    from bench_27b import randomize
    from ds_qwen_vision.checkpoint import PRESETS, make_config
    from ds_qwen_vision.model import build_sharded, init_distributed

    init_distributed(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    spec = copy.deepcopy(PRESETS[args.preset])
    spec["text"]["num_hidden_layers"] = args.layers
    PRESETS["27b-bench-paged"] = spec
    model = build_sharded(make_config("27b-bench-paged", mtp=False), 1, dtype)
    randomize(model, seed=0)
    return model, device


@torch.no_grad()
def measure(model, device, args) -> dict:
    """TTFT of an --context prompt (one forward; --chunk chunks) and the decode step at 1 and 16 rows with 512 and
    --context tokens of context, through a ModelRunner of 16 slots (medians). With --profile on CUDA, also the
    chunked prefill's kernels and 8 one-row decode steps' at --context (profile_by_kind)."""
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    rows, long, short, chunk = 16, args.context, min(512, args.context // 2), args.chunk
    runner = ModelRunner(model, device, max_slots=rows, max_len=long + args.steps + 64)
    out = {"label": args.label, "layers": args.layers,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    def prefill(slot, prompt, chunked):
        if not chunked:
            return runner.run(StepPlan(prefill=[Prefill(slot, prompt)]))
        for start in range(0, len(prompt), chunk):
            logits = runner.run(StepPlan(prefill=[Prefill(slot, prompt, start=start,
                                                          end=min(len(prompt), start + chunk))]))
        return logits

    def decode(n_rows, steps):
        tokens = {s: 1000 + s for s in range(n_rows)}
        times = []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            logits = runner.run(StepPlan(decode=sorted(tokens.items())))
            picks = torch.stack([logits[s] for s in sorted(tokens)]).argmax(-1).tolist()  # the host reads them
            times.append(time.perf_counter() - t)
            tokens = dict(zip(sorted(tokens), picks))
        return 1e3 * statistics.median(times[4:])

    prompt = ids(long, 1)
    for chunked in (False, True):  # warm-up: kernels, autotuning
        prefill(0, prompt, chunked)
    short_prompt = ids(min(1024, long), 2)  # one chunk of a prefill graph's size (runner/prefill_graphs.py) where they are on
    prefill(0, short_prompt, False)
    out["ttft_1k_ms"] = 1e3 * statistics.median(timed(lambda: prefill(0, short_prompt, False), args.repeats))
    out["ttft_8k_one_forward_ms"] = 1e3 * statistics.median(timed(lambda: prefill(0, prompt, False), args.repeats))
    out["ttft_8k_chunked_ms"] = 1e3 * statistics.median(timed(lambda: prefill(0, prompt, True), args.repeats))
    if getattr(args, "profile", False) and hasattr(runner, "compiled_prefill_tokens"):
        # the same chunks with the norms eager (the runner's choice below COMPILED_PREFILL_TOKENS), same run
        runner.compiled_prefill_tokens, chosen = 1 << 30, runner.compiled_prefill_tokens
        out["ttft_8k_chunked_eager_norms_ms"] = 1e3 * statistics.median(
            timed(lambda: prefill(0, prompt, True), args.repeats))
        runner.compiled_prefill_tokens = chosen
    out["first_logits"] = prefill(0, prompt, True)[0].float().cpu()  # for a comparison across runs (not saved)
    if getattr(args, "profile", False) and device.type == "cuda":
        out["profile_prefill_chunked"] = profile_by_kind(lambda: prefill(0, prompt, True), out["ttft_8k_chunked_ms"])
    for ctx in (short, long):
        for s in range(rows):
            prefill(s, ids(ctx, 100 + s), chunked=True)
        decode(1, 8)
        out[f"decode_1row_{ctx}_ms"] = decode(1, args.steps)
        if getattr(args, "profile", False) and device.type == "cuda" and ctx == long:
            # one row's decode step (graph replays): where its time goes, by kind of kernel
            out["profile_decode_1row"] = profile_by_kind(lambda: decode(1, 8), 8 * out[f"decode_1row_{ctx}_ms"])
        decode(rows, 8)
        out[f"decode_16rows_{ctx}_ms"] = decode(rows, args.steps)
        print(json.dumps({k: v for k, v in out.items() if k != "first_logits"}), flush=True)
    runner = None  # its caches and graphs go now (hooks and graphs hold it in cycles), before the next runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# Kernel name -> what it does, first match wins (cuBLAS / cuBLASLt GEMMs are nvjet_* or *gemm* on Hopper; the
# Triton kernels are named by their function: chunk_attention._forward; fla's chunk_* / solve_tril / recompute_*).
KINDS = (("fp8", ("_w8a16", "_quantize", "_sum_splits")),  # kernels/fp8_linear.py
         ("gemm", ("nvjet", "gemm", "xmma", "cutlass::gemm", "splitk")),
         ("conv1d", ("conv",)),  # before attention: torch's conv_depthwise2d_forward_kernel ends in _forward
         ("attention", ("_forward", "fmha", "flash", "attention")),
         ("gdn", ("chunk_", "solve_tril", "recompute_w_u", "fused_recurrent", "l2norm", "cumsum", "gated_delta")),
         ("norm", ("norm", "reduce_kernel")),
         ("copy", ("copy", "cat", "index", "gather", "scatter")))


def profile_by_kind(fn, wall_ms: float) -> dict:
    """torch.profiler over fn (bench_27b.profile_kernels): GPU ms per call by kind of kernel, the top kernels,
    and the wall time not covered by any kernel (host gaps: launches, syncs, Python)."""
    from bench_27b import profile_kernels

    rows = profile_kernels(fn, rank=0, calls=2, top=400)
    total = rows.pop()
    kinds: dict[str, float] = {}
    for r in rows:
        name = r["kernel"].lower()
        kind = next((k for k, keys in KINDS if any(key in name for key in keys)), "elementwise/other")
        kinds[kind] = kinds.get(kind, 0.0) + r["ms_per_call"]
    out = {"wall_ms": wall_ms, "kernels_ms": total["ms_per_call"], "launches": total["launches_per_call"],
           "gap_ms": wall_ms - total["ms_per_call"], "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
           "top": rows[:30]}
    print(json.dumps({k: v for k, v in out.items() if k != "top"}), flush=True)
    return out


def run(args) -> dict:
    model, device = build(args)
    out = measure(model, device, args)
    out.pop("first_logits")
    return out


def collect(args) -> None:
    runs = [json.loads(p.read_text()) for p in args.collect]
    base = runs[0]
    table = {k: {r["label"]: r[k] for r in runs} | {"ratio": runs[-1][k] / base[k]}
             for k in base if k.endswith("_ms")}
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "card": base["gpu"], "command": args.command,
           "code": args.code, "label": f"random bf16 weights, 27B widths, {base['layers']} of 64 layers, tp=1",
           "runs": runs, "ratio_last_to_first": table}
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="paged")
    p.add_argument("--out", type=Path)
    p.add_argument("--layers", type=int, default=32, help="text layers (a multiple of 4)")
    p.add_argument("--preset", default="27b", help="widths (tiny: a CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=2048, help="limits.prefill_chunk_tokens")
    p.add_argument("--steps", type=int, default=48, help="decode steps timed per case (the first 4 dropped)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also the chunked prefill's kernels by kind (CUDA)")
    p.add_argument("--collect", nargs="+", type=Path, help="this script's JSONs, the baseline first")
    p.add_argument("--command", default="")
    p.add_argument("--code", default="")
    args = p.parse_args()
    if args.collect:
        return collect(args)
    out = run(args)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
