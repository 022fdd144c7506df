"""The decode step's all-reduces at tp=N: the peer-memory path (kernels/allreduce.py) against NCCL, same run.

    deepspeed --num_gpus 2 benchmarks/allreduce_bench.py --out OUT/allreduce.json [--profile]
    # a smoke test of this script on CPU ranks (gloo; the peer path refuses CPU tensors; no CUDA graphs):
    deepspeed --num_gpus 2 benchmarks/allreduce_bench.py --device cpu --preset tiny --prompt-len 32 \
        --max-len 128 --decode-steps 4 --out /tmp/allreduce.json

1. messages -- the decode step's sizes: hidden states of 1..16 rows (5,120 bf16 each: the row-parallel
   layers' and the embedding's outputs) and the lm_head's logits of 1, 4 and 16 rows (248,320 bf16 each at
   any tp: the lm_head all-reduces whole logits). Each method is called exactly as the TP layers call it,
   `deepspeed.comm.inference_all_reduce(x, group=tp_group)`: `nccl` with nothing installed, `one_shot` and
   `two_shot` with the hook installed (a buffer large enough for every size here, to find the crossover;
   the served default, 1 MiB, is marked per size). Figures: us per all-reduce eager (back-to-back calls),
   and inside a CUDA graph (32 calls captured in one graph, replayed: what the decode graph sees); the max
   abs difference from NCCL's result on the same input, eager and replayed, and from the exact sum (float64
   of every rank's input, each rank regenerates the others' from their seeds).
2. step -- the 27B decode step with random bf16 weights (built as bench_27b.py builds it), one ModelRunner
   per setting of `allreduce.peer_memory` (off = NCCL, one_shot, two_shot; default max_bytes): ms per token
   at batch 1 after a 512-token prompt, the host reading every token (as the engine does), ms per step at
   batch 16, and the greedy tokens and first decode logits compared with the NCCL runner's (random
   weights: token equality checks correctness, it is no content figure).

Results: one JSON (`--out`), written after part 1 and again after part 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.config import AllReduceConfig
from ds_qwen_vision.kernels import allreduce

HIDDEN_ROWS = (1, 2, 4, 8, 16)
LOGIT_ROWS = (1, 4, 16)
METHODS = ("nccl", "one_shot", "two_shot")
GRAPH_CALLS = 32
DEFAULT_MAX_BYTES = AllReduceConfig().max_bytes


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def messages(config) -> list[tuple[str, int, int]]:
    """(what, rows, elements per row) of the decode step's all-reduces."""
    t = config.text_config
    return [("hidden", r, t.hidden_size) for r in HIDDEN_ROWS] + [("logits", r, t.vocab_size) for r in LOGIT_ROWS]


def rank_input(i: int, rank: int, numel: int, dtype, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1000 * i + rank)
    return torch.randn(numel, generator=g, device=device).to(dtype)


def eager_us(call, x, device, reps: int) -> float:
    for _ in range(5):
        call(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        call(x)
    sync(device)
    return 1e6 * (time.perf_counter() - t) / reps


def capture(call, x, n: int) -> torch.cuda.CUDAGraph:
    """n calls on x captured in one graph, warmed up on the capture stream first (as ModelRunner.capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            call(x)
    return graph


def graph_us(call, x, device) -> float:
    graph = capture(call, x, GRAPH_CALLS)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(20):
        sync(device)
        t = time.perf_counter()
        graph.replay()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times) / GRAPH_CALLS


def messages_part(args, device, group, rank, world, config) -> list[dict]:
    from deepspeed import comm as dist

    def call(x):
        dist.inference_all_reduce(x, group=group)

    sizes = messages(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = [rank_input(i, rank, rows * width, dtype, device) for i, (_, rows, width) in enumerate(sizes)]
    exact = [sum(rank_input(i, r, x.numel(), dtype, device).double() for r in range(world))
             for i, x in enumerate(inputs)]
    element = torch.tensor([], dtype=dtype).element_size()
    buffer_bytes = -(-max(x.numel() for x in inputs) * element // 16) * 16
    reference, out = [], []
    for method in METHODS:
        hook = None
        if method == "nccl":
            allreduce.uninstall()
        else:
            hook = allreduce.install(AllReduceConfig(peer_memory=method, max_bytes=buffer_bytes), device, group, world)
            if hook is None:
                out.append({"method": method, "unavailable": "install refused (see the log)"})
                continue
        for i, ((what, rows, width), x0) in enumerate(zip(sizes, inputs)):
            before = dict(hook.counts) if hook else {}
            x = x0.clone()
            call(x)
            sync(device)
            if method == "nccl":
                reference.append(x)
            row = {"method": method, "what": what, "rows": rows, "numel": x.numel(), "bytes": x.numel() * element,
                   "dtype": str(dtype).removeprefix("torch."),
                   "served_default_takes_it": method != "nccl" and x.numel() * element <= DEFAULT_MAX_BYTES,
                   "max_abs_vs_nccl_eager": float((x - reference[i]).abs().max()),
                   "max_abs_vs_exact_eager": float((x.double() - exact[i]).abs().max())}
            if hook:
                row["paths"] = {k: v - before.get(k, 0) for k, v in hook.counts.items() if v != before.get(k, 0)}
            zeros = torch.zeros_like(x0)  # timing on zeros: repeated in-place sums would overflow
            row["eager_us"] = eager_us(call, zeros, device, args.eager_reps)
            if device.type == "cuda":
                row["graph_us"] = graph_us(call, zeros, device)
                xg = torch.empty_like(x0)
                graph = capture(call, xg, 1)
                xg.copy_(x0)
                graph.replay()
                sync(device)
                row["max_abs_vs_nccl_graph"] = float((xg - reference[i]).abs().max())
            out.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    allreduce.uninstall()
    return out


def step_part(args, device, rank, world, config) -> list[dict]:
    """The decode step of the whole model per all-reduce setting, each runner over the same weights."""
    from bench_27b import copy_bandwidth, profile_decode, prompt_ids, randomize

    from ds_qwen_vision.model import build_sharded
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_sharded(config, world, dtype)
    randomize(model, seed=rank)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = 1e3 * weights / copy_bandwidth(device) if device.type == "cuda" else None
    prompt = prompt_ids(config, args.prompt_len, seed=1)
    short = [prompt_ids(config, min(64, args.prompt_len), seed=100 + i) for i in range(16)]
    rows, base = [], None
    for mode in METHODS:
        setting = "off" if mode == "nccl" else mode
        runner = ModelRunner(model, device, max_slots=16, max_len=args.max_len,
                             allreduce=AllReduceConfig(peer_memory=setting))
        hook = allreduce.installed()
        row = {"run": f"ds-qwen-vision tp={world}, all-reduce " + ("NCCL" if mode == "nccl" else f"peer {mode}"),
               "allreduce.peer_memory": setting, "floor_ms": floor_ms, "weights_gib": weights / 2**30,
               "cuda_graphs": runner.cuda_graphs}
        if setting != "off" and hook is None:
            rows.append({**row, "unavailable": "install refused (see the log)"})
            continue
        counts = dict(hook.counts) if hook else {}
        row["paths_at_capture"] = counts  # every all-reduce Python saw while the graphs were captured
        # batch 1: one stream after the prompt; the host reads every token
        logits = runner.run(StepPlan(prefill=[Prefill(0, prompt)]))[0]
        tokens, times, first = [int(logits.argmax())], [], None
        for step in range(args.decode_steps + 8):
            sync(device)
            t = time.perf_counter()
            logits = runner.run(StepPlan(decode=[(0, tokens[-1])]))[0]
            tokens.append(int(logits.argmax()))
            times.append(time.perf_counter() - t)
            first = logits.clone() if first is None else first
        steps = times[8:]
        row.update(decode_ms_per_token=1e3 * statistics.median(steps),
                   decode_ms_p90=1e3 * sorted(steps)[int(0.9 * len(steps))], tokens=tokens)
        if base is None:
            base = row, first
        else:
            row["tokens_equal_nccl"] = tokens == base[0]["tokens"]
            row["first_decode_logits_max_abs_vs_nccl"] = float((first - base[1]).abs().max())
        if args.profile and device.type == "cuda":
            if rank == 0:
                print(f"--- decode profile, {row['run']}", flush=True)
            profile_decode(runner, rank, StepPlan)
        # batch 16: the other 15 slots join with short prompts, then every slot decodes each step
        nxt = {0: tokens[-1]}
        for slot in range(1, 16):
            nxt[slot] = int(runner.run(StepPlan(prefill=[Prefill(slot, short[slot])]))[slot].argmax())
        times = []
        for _ in range(max(4, args.decode_steps // 2) + 4):
            sync(device)
            t = time.perf_counter()
            out = runner.run(StepPlan(decode=sorted(nxt.items())))
            nxt = {slot: int(v.argmax()) for slot, v in out.items()}
            times.append(time.perf_counter() - t)
        row["streams16_step_ms"] = 1e3 * statistics.median(times[4:])
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    allreduce.uninstall()
    return rows


def tables(result: dict) -> str:
    """The two markdown tables for docs/benchmarks.md."""
    lines = ["| message | bytes | " + " | ".join(f"{m} eager / graph us" for m in METHODS) +
             " | max abs vs NCCL (eager / graph) |", "|---|---|" + "---|" * (len(METHODS) + 1)]
    by = {(r["method"], r["what"], r["rows"]): r for r in result["messages"] if "what" in r}
    for what, rows in sorted({(r["what"], r["rows"]) for r in by.values()}, key=lambda k: (k[0] != "hidden", k[1])):
        cells, diffs = [], []
        for m in METHODS:
            r = by.get((m, what, rows))
            cells.append("—" if r is None else f"{r['eager_us']:.1f} / {r.get('graph_us', float('nan')):.1f}")
            if r is not None and m != "nccl":
                diffs.append(f"{m} {r['max_abs_vs_nccl_eager']:g} / {r.get('max_abs_vs_nccl_graph', float('nan')):g}")
        size = by.get(("nccl", what, rows), {}).get("bytes", "")
        lines.append(f"| {what} × {rows} | {size} | " + " | ".join(cells) + f" | {'; '.join(diffs)} |")
    lines += ["", "| run | decode ms/token (p90) | floor ms | 16-stream step ms | tokens = NCCL's | logits max abs vs NCCL |",
              "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "decode_ms_per_token" not in r:
            lines.append(f"| {r['run']} | {r.get('unavailable', '')} | | | | |")
            continue
        floor = f"{r['floor_ms']:.1f}" if r.get("floor_ms") else "—"
        lines.append(f"| {r['run']} | {r['decode_ms_per_token']:.2f} ({r['decode_ms_p90']:.2f}) | {floor} | "
                     f"{r['streams16_step_ms']:.2f} | {r.get('tokens_equal_nccl', '(baseline)')} | "
                     f"{r.get('first_decode_logits_max_abs_vs_nccl', '—')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="27b", help="checkpoint.make_config preset (shapes of the model)")
    p.add_argument("--parts", default="messages,step", help="comma-separated: messages, step")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=48)
    p.add_argument("--eager-reps", type=int, default=200)
    p.add_argument("--profile", action="store_true", help="torch.profiler table of 5 decode replays per setting")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    from ds_qwen_vision.checkpoint import make_config
    from ds_qwen_vision.model import init_distributed
    from ds_qwen_vision.tp_policy import tp_group

    rank, world = init_distributed(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    group = tp_group(world)
    config = make_config(args.preset)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": f"deepspeed --num_gpus {world} benchmarks/allreduce_bench.py {' '.join(argv)}",
              "tp": world, "torch": torch.__version__, "preset": args.preset,
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                     "TORCH_SYMMMEM", "NVSHMEM_DISABLE_NVLS")},
              "served_default_max_bytes": DEFAULT_MAX_BYTES, "messages": [], "rows": []}

    def write():
        if rank == 0:
            args.out.write_text(json.dumps(result, indent=1))

    parts = args.parts.split(",")
    if "messages" in parts:
        result["messages"] = messages_part(args, device, group, rank, world, config)
        result["env_after"] = {k: os.environ.get(k) for k in ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "TORCH_SYMMMEM")}
        write()
    if "step" in parts:
        result["rows"] = step_part(args, device, rank, world, config)
        write()
    if rank == 0:
        print(tables(result), flush=True)


if __name__ == "__main__":
    main()
