"""Full-size benchmark: Qwen3.6-27B shapes, random bf16 weights, through the server's own model code.

    # ds-qwen-vision at tp=N (one process per GPU; tp=1: plain python3), then the single-GPU baselines:
    deepspeed --num_gpus 2 benchmarks/bench_27b.py --out OUT/engine.json
    python benchmarks/bench_27b.py --baseline eager --out OUT/eager.json
    python benchmarks/bench_27b.py --baseline static --out OUT/static.json
    python benchmarks/report.py OUT/*.json          # the table for docs/benchmarks.md
    python benchmarks/bench_27b.py --collect OUT/engine.json OUT/static.json --results-dir benchmarks/results \
        --what decode --command "..."                # benchmarks/results/DATE-CARD-tpN-decode.json

The engine mode builds this rank's shard exactly as the server does (meta → tp_policy → device) and
fills it with random data (never zeros) instead of reading files, then times ModelRunner, the code
the server's ranks run. Figures are medians over repeats, after a warm-up.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.checkpoint import build_checkpoint, make_config  # noqa: E402
from ds_qwen_vision.config import AllReduceConfig  # noqa: E402
from ds_qwen_vision.model import load_processor  # noqa: E402

GiB = 2**30


def copy_bandwidth(device, nbytes: int = GiB) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Random weights on the device: matrices ~N(0, 1/fan_in), norms and GDN vectors non-trivial."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.uniform_(1.0, 16.0, generator=gen).log_()
        elif p.dim() == 1:
            p.normal_(1.0 if ".linear_attn.norm." in name else 0.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, (p[0].numel()) ** -0.5, generator=gen)


def image_bytes(side: int = 1024) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def prompt_ids(config, n_text: int, n_image_tokens: int = 0, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 1200, (n_text,), generator=g).tolist()  # ordinary token ids of the tokenizer
    if not n_image_tokens:
        return text
    return [config.vision_start_token_id] + [config.image_token_id] * n_image_tokens + \
        [config.vision_end_token_id] + text


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def engine_main(args) -> None:
    from deepspeed import comm as dist

    from ds_qwen_vision.model import build_sharded, init_distributed, open_image
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    rank, world = init_distributed("cuda")
    device = torch.device("cuda", torch.cuda.current_device())
    config = make_config("27b")
    processor = load_processor(build_checkpoint(args.cache / "tiny", preset="tiny"))
    t0 = time.perf_counter()
    model = build_sharded(config, world, torch.bfloat16)
    randomize(model, seed=rank)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    bw = copy_bandwidth(device)  # before the cap: its buffers are not part of serving
    if args.budget_gib is None:  # the 28 GiB per rank of a 32 GB card at tp >= 2; one card holds it all
        args.budget_gib = 28.0 if world > 1 else torch.cuda.get_device_properties(device).total_memory / GiB - 2
    if args.streams_budget_gib is None:
        args.streams_budget_gib = 29.5 if world > 1 else args.budget_gib
    results = {"rank": rank, "tp": world, "weights_gib": weights / GiB, "build_s": build_s,
               "copy_bandwidth_tbs": bw / 1e12, "floor_ms": 1e3 * weights / bw,
               "budget_gib": args.budget_gib, "gpu": torch.cuda.get_device_name(device)}
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(args.budget_gib * GiB / total, device)

    # The image path as the server runs it: rank 0's engine decodes the bytes and runs the checkpoint's
    # image processor (timed here); the runner broadcasts the pixels and runs the vision tower + prefill.
    from transformers.image_processing_backends import TorchvisionBackend

    img = image_bytes()
    results["image_processor"] = type(processor.image_processor).__name__
    on_gpu = isinstance(processor.image_processor, TorchvisionBackend)  # as engine.Engine chooses
    results["image_processor_on_gpu"] = on_gpu

    def save():  # after each phase: a run cut short by the device call's limit still leaves its figures
        if rank == 0:
            args.out.write_text(json.dumps({"mode": f"ds-qwen-vision tp={world}", "ranks": [results],
                                            "partial": True}, indent=1))

    def preprocess(gpu=on_gpu):  # what Intake.prepare runs: bytes -> pixels held on the host
        out = processor.image_processor(images=[open_image(img)], return_tensors="pt",
                                        **({"device": device} if gpu else {}))
        return {k: v.cpu() for k, v in out.items()}

    pre = preprocess()
    pixels, grid = pre["pixel_values"], pre["image_grid_thw"].tolist()
    n_img = grid[0][0] * grid[0][1] * grid[0][2] // 4  # 2x2 merge: 1,024 tokens for 1024x1024

    def prefill(ids, with_image=False, slot=0):
        if with_image:
            item = Prefill(slot, ids, grid, tuple(pixels.shape))
            return runner.run(StepPlan(prefill=[item]), {slot: pixels if rank == 0 else None})
        return runner.run(StepPlan(prefill=[Prefill(slot, ids)]))

    text256, text512 = prompt_ids(config, 256), prompt_ids(config, 512, seed=1)
    image256 = prompt_ids(config, 256, n_img)

    # Decode after a 512-token prompt: one stream, greedy, the host reads each token (as the engine does).
    def decode_steps(n):
        prefill(text512)
        token, steps = 1000, []
        for _ in range(n + 8):
            torch.cuda.synchronize()
            t = time.perf_counter()
            token = int(torch.argmax(runner.run(StepPlan(decode=[(0, token)]))[0]))
            steps.append(time.perf_counter() - t)
        return steps[8:]

    # The same decode graphs without the fused kernels (and prefill eager: no prefill graphs), then the
    # runner as served.
    peer = AllReduceConfig(peer_memory=args.allreduce)  # the decode all-reduces: NCCL (off) or kernels/allreduce.py
    runner = ModelRunner(model, device, max_slots=1, max_len=9472, fuse=False, allreduce=peer, prefill_graph_tokens=0)
    results["decode_unfused_ms_per_token"] = 1e3 * statistics.median(decode_steps(args.decode_tokens))
    results["ttft_text512_unfused_ms"] = 1e3 * statistics.median(timed(lambda: prefill(text512), args.repeats))
    save()
    del runner
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    runner = ModelRunner(model, device, max_slots=1, max_len=9472, allreduce=peer)  # 8k text + image + decode
    results["runner_init_s"] = time.perf_counter() - t0  # state, norm compilation, CUDA graph capture
    prefill(text256)  # warm-up (kernels, autotuning)
    prefill(text512)
    prefill(image256, True)
    results["ttft_text256_ms"] = 1e3 * statistics.median(timed(lambda: prefill(text256), args.repeats))
    results["ttft_text512_ms"] = 1e3 * statistics.median(timed(lambda: prefill(text512), args.repeats))
    results["prefill_image1024_text256_ms"] = 1e3 * statistics.median(
        timed(lambda: prefill(image256, True), args.repeats))
    results["image_preprocess_ms"] = 1e3 * statistics.median(timed(preprocess, args.repeats))
    results["ttft_image1024_text256_ms"] = results["prefill_image1024_text256_ms"] + results["image_preprocess_ms"]
    results["image_preprocess_host_ms"] = 1e3 * statistics.median(timed(lambda: preprocess(False), args.repeats))
    results["prefill_graphs"] = runner.prefill_graphs is not None and bool(runner.prefill_graphs.graphs)
    # The baseline in the same run: the same runner with the eager prefill (runner/prefill_graphs.py off)
    graphs, runner.prefill_graphs = runner.prefill_graphs, None
    prefill(text512)
    prefill(image256, True)
    results["ttft_text512_eager_prefill_ms"] = 1e3 * statistics.median(timed(lambda: prefill(text512), args.repeats))
    results["prefill_image1024_text256_eager_prefill_ms"] = 1e3 * statistics.median(
        timed(lambda: prefill(image256, True), args.repeats))
    runner.prefill_graphs = graphs
    results["pixels_max_abs_diff_host_vs_gpu"] = float((preprocess(False)["pixel_values"] - pixels).abs().max())
    save()

    steps = decode_steps(args.decode_tokens)
    results["decode_ms_per_token"] = 1e3 * statistics.median(steps)
    results["decode_ms_p90"] = 1e3 * sorted(steps)[int(0.9 * len(steps))]
    results["cuda_graphs"] = runner.cuda_graphs
    graphs, runner.graphs = runner.graphs, {}  # the same step without the graph
    results["decode_eager_ms_per_token"] = 1e3 * statistics.median(decode_steps(16))
    runner.graphs = graphs
    save()
    if args.profile:
        profile_decode(runner, rank, StepPlan)
        # a prefill chunk's kernels, replayed as a graph: 64 tokens (a chunk's fixed cost) and 512
        for n in (64, 512):
            results[f"profile_prefill{n}_graph"] = profile_kernels(lambda: prefill(prompt_ids(config, n, seed=7)), rank)
        save()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill(text512)
            torch.cuda.synchronize()
        if rank == 0:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70),
                  flush=True)

    # Peak memory: an 8k-token text prompt plus one 1024x1024 image, then a few decode steps.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    long_ids = prompt_ids(config, 8192, n_img, seed=2)
    t = time.perf_counter()
    logits = prefill(long_ids, True)[0]
    torch.cuda.synchronize()
    results["ttft_8k_image_ms"] = 1e3 * (time.perf_counter() - t)
    token = int(torch.argmax(logits))
    steps = []
    for _ in range(4 + args.decode_tokens // 2):  # one stream's decode step with ~9k tokens of context
        torch.cuda.synchronize()
        t = time.perf_counter()
        token = int(torch.argmax(runner.run(StepPlan(decode=[(0, token)]))[0]))
        steps.append(time.perf_counter() - t)
    results["decode_8k_ms_per_token"] = 1e3 * statistics.median(steps[4:])
    results["peak_allocated_gib_8k_image"] = torch.cuda.max_memory_allocated(device) / GiB
    results["peak_reserved_gib_8k_image"] = torch.cuda.max_memory_reserved(device) / GiB
    results["prompt_tokens_8k_image"] = len(long_ids)
    save()

    # Concurrency: `streams` requests of 512 prompt tokens arrive together, each generates 256 tokens.
    # Scheduled as the engine does (engine/scheduler.py): prompts prefilled within a token budget per step
    # (limits.prefill_chunk_tokens) into the lowest free slots, every generating slot decodes each step,
    # greedy picks of all rows in one device op and one host copy.
    del runner
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    budget = args.streams_budget_gib * GiB
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    runner = ModelRunner(model, device, max_slots=args.streams, max_len=512 + 256, allreduce=peer)
    prompts = [prompt_ids(config, 512, seed=100 + i) for i in range(args.streams)]

    def serve_streams():
        prefilled, generated, nxt = [0] * args.streams, [0] * args.streams, [None] * args.streams
        decode_times = []
        while min(generated) < 256:
            plan, room = StepPlan(), args.chunk
            for i in range(args.streams):
                if prefilled[i] < 512 and room > 0:
                    end = min(512, prefilled[i] + room)
                    plan.prefill.append(Prefill(i, prompts[i], start=prefilled[i], end=end))
                    room -= end - prefilled[i]
                    prefilled[i] = end
                elif nxt[i] is not None and generated[i] < 256:
                    plan.decode.append((i, nxt[i]))
            t = time.perf_counter()
            logits = runner.run(plan)
            picks = torch.stack(list(logits.values())).argmax(-1).tolist() if logits else []
            if not plan.prefill:
                decode_times.append((len(plan.decode), time.perf_counter() - t))
            for slot, token in zip(logits, picks):
                nxt[slot] = token
                generated[slot] += 1
        return decode_times

    serve_streams()  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    decode_times = serve_streams()
    wall = time.perf_counter() - t
    full = [dt for n, dt in decode_times if n == args.streams]
    results.update({"streams": args.streams, "streams_wall_s": wall,
                    "streams_tokens_per_s": args.streams * 256 / wall,
                    "streams_decode_step_ms": 1e3 * statistics.median(full),
                    "streams_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
                    "streams_budget_gib": args.streams_budget_gib, "state_gib": runner.state.nbytes() / GiB})
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        mode = f"ds-qwen-vision tp={world}" + (f", all-reduce peer {args.allreduce}" if args.allreduce != "off" else "")
        args.out.write_text(json.dumps({"mode": mode, "ranks": gathered}, indent=1))
        print(json.dumps(gathered, indent=1))


def profile_kernels(fn, rank, calls: int = 3, top: int = 25) -> list[dict]:
    """torch.profiler (CUDA) over `calls` calls of fn: the top kernels by GPU time, ms per call; printed on
    rank 0 and returned for the results JSON (the last row: every kernel together)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [{"kernel": e.key[:120], "ms_per_call": e.self_device_time_total / 1e3 / calls,
             "launches_per_call": e.count / calls} for e in events[:top]]
    rows.append({"kernel": "(all kernels)", "ms_per_call": sum(e.self_device_time_total for e in events) / 1e3 / calls,
                 "launches_per_call": sum(e.count for e in events) / calls})
    if rank == 0:
        for r in rows:
            print(f"{r['ms_per_call']:9.3f} ms {r['launches_per_call']:7.0f}x  {r['kernel']}", flush=True)
    return rows


def profile_decode(runner, rank, StepPlan) -> None:
    """torch.profiler over 5 decode steps (graph replays; CUPTI sees the kernels inside the graph)."""
    from torch.profiler import ProfilerActivity, profile

    token = 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            token = int(torch.argmax(runner.run(StepPlan(decode=[(0, token)]))[0]))
    if rank == 0:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90),
              flush=True)


def baseline_main(args) -> None:
    """transformers' own generate on one GPU, the same config and random weights.

    One generate call per measurement with a fixed length (the static cache recompiles whenever its
    length changes); a streamer timestamps each token as generate hands it over (a host copy, so the
    device has finished it).
    """
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    device = torch.device("cuda", 0)
    config = make_config("27b")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen3_5ForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    randomize(model, seed=0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device)
    ids = torch.tensor([prompt_ids(config, 512, seed=1)], device=device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": args.decode_tokens + 1,
              "min_new_tokens": args.decode_tokens + 1}
    if args.baseline == "static":
        kwargs["cache_implementation"] = "static"

    def gen():
        clock = Clock()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, streamer=clock, **kwargs)
        tokens = clock.times[1:]  # times[0]: the prompt handed to the streamer
        return tokens[0] - start, [b - a for a, b in zip(tokens[1:], tokens[2:])]

    t = time.perf_counter()
    gen()  # warm-up; with the static cache this compiles
    warm = time.perf_counter() - t
    runs = [gen() for _ in range(2)]
    result = {"mode": f"transformers generate, 1 GPU, {args.baseline}", "gpu": torch.cuda.get_device_name(device),
              "weights_gib": weights / GiB, "copy_bandwidth_tbs": bw / 1e12, "floor_ms": 1e3 * weights / bw,
              "warmup_s": warm, "ttft_text512_ms": 1e3 * statistics.median(r[0] for r in runs),
              "decode_ms_per_token": 1e3 * statistics.median([d for r in runs for d in r[1]]),
              "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB}
    if args.baseline == "eager" and args.streams:  # the same concurrency, as one batch of equal prompts
        batch = torch.tensor([prompt_ids(config, 512, seed=100 + i) for i in range(args.streams)], device=device)
        kwargs.update(max_new_tokens=256, min_new_tokens=256)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(batch, **kwargs)
        torch.cuda.synchronize()
        result.update(streams=args.streams, streams_tokens_per_s=args.streams * 256 / (time.perf_counter() - t))
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="this run's JSON (required unless --collect)")
    p.add_argument("--baseline", choices=["eager", "static"], default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--budget-gib", type=float, default=None,
                   help="per-process device memory cap (engine mode; default 28 at tp >= 2, the card at tp=1)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of 5 decode steps")
    p.add_argument("--allreduce", choices=["off", "one_shot", "two_shot"], default="off",
                   help="engine: allreduce.peer_memory (kernels/allreduce.py; off = NCCL)")
    p.add_argument("--streams", type=int, default=16, help="concurrent requests (512 prompt, 256 new tokens)")
    p.add_argument("--streams-budget-gib", type=float, default=None,
                   help="per-process cap for the streams run (default 29.5 at tp >= 2)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step (limits.prefill_chunk_tokens)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dsqv-bench")
    p.add_argument("--collect", nargs="+", type=Path, help="result JSONs of one call -> the results file")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--what", default="decode", help="the WHAT of DATE-CARD-tpN-WHAT.json")
    p.add_argument("--command", default="", help="the command line that produced the results (recorded)")
    p.add_argument("--code", default="", help="the commit the results were measured with (recorded)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.collect:
        collect(args)
    elif args.out is None:
        p.error("--out is required")
    else:
        baseline_main(args) if args.baseline else engine_main(args)


def collect(args) -> None:
    """One call's engine and baseline JSONs -> benchmarks/results/DATE-CARD-tpN-WHAT.json (issue 10's format)."""
    import datetime

    rows, tp, card = [], None, None
    for path in args.collect:
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        if "ranks" in r:
            r0 = r["ranks"][0]
            tp, card = r0["tp"], r0["gpu"]
            g = r0.get  # a partial run (cut short) lacks the later phases' figures: None
            row = {"run": f"ds-qwen-vision tp={r0['tp']}", "decode_ms_per_token": r0["decode_ms_per_token"],
                   "floor_ms": r0["floor_ms"], "decode_over_floor": r0["decode_ms_per_token"] / r0["floor_ms"],
                   "ttft_text512_ms": g("ttft_text512_ms"), "ttft_image1024_text256_ms": g("ttft_image1024_text256_ms"),
                   "streams16_tokens_per_s": g("streams_tokens_per_s"), "step16_ms": g("streams_decode_step_ms"),
                   "step16_over_step1": (g("streams_decode_step_ms") or 0) / r0["decode_ms_per_token"] or None,
                   "peak_reserved_gib": max(x.get("peak_reserved_gib_8k_image") or 0 for x in r["ranks"]) or None,
                   "partial": bool(r.get("partial"))}
            row.update({k: v for k, v in r0.items() if k not in row and not isinstance(v, (dict, list))})
            rows.append(row)
            if g("ttft_text512_eager_prefill_ms") is not None:
                rows.append({"run": f"ds-qwen-vision tp={r0['tp']}, prefill eager (no prefill CUDA graphs), same "
                                    "runner, same run", "ttft_text512_ms": g("ttft_text512_eager_prefill_ms"),
                             "ttft_image1024_text256_ms": g("prefill_image1024_text256_eager_prefill_ms")
                             + (g("image_preprocess_ms") or 0)})
            row = {"run": f"ds-qwen-vision tp={r0['tp']}, fuse=False (transformers' forwards, no compiled "
                          "norms, eager prefill; decode attention kernel and fused weights as served), same run",
                   "decode_ms_per_token": r0["decode_unfused_ms_per_token"], "floor_ms": r0["floor_ms"],
                   "decode_over_floor": r0["decode_unfused_ms_per_token"] / r0["floor_ms"],
                   "ttft_text512_ms": g("ttft_text512_unfused_ms")}
        else:
            card = card or r["gpu"]
            row = {"run": r["mode"], "decode_ms_per_token": r["decode_ms_per_token"], "floor_ms": r["floor_ms"],
                   "decode_over_floor": r["decode_ms_per_token"] / r["floor_ms"],
                   "ttft_text512_ms": r["ttft_text512_ms"], "peak_allocated_gib": r["peak_allocated_gib"]}
            row.update({k: v for k, v in r.items() if k not in row and k != "mode"})
        rows.append(row)
    newest = max(p.stat().st_mtime for p in args.collect if p.exists())  # when the run wrote its figures
    date = datetime.datetime.fromtimestamp(newest, datetime.timezone.utc)
    name = (card or "GPU").replace("NVIDIA ", "").replace(" ", "-")
    out = args.results_dir / f"{date:%Y-%m-%d}-{name}-tp{tp or 1}-{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date.isoformat(timespec="seconds"), "card": card, "command": args.command,
                               "code": args.code, "tp": tp or 1, "rows": rows}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
