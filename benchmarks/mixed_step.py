"""A step that prefills while streams decode: the chunk and the decode rows in one forward (runner/
prefill_graphs.py, `mixed`) against the baseline in the same run, the same runner with the two as separate
forwards (the chunk's prefill graph, then the decode graph), and a decode step alone.

    # GPU (one card): 27B widths with 8 of the 64 layers (checkpoint built on the GPU, like bench_served's)
    python benchmarks/mixed_step.py --layers 8 --out OUT
    # CPU check of the script (minutes)
    python benchmarks/mixed_step.py --preset tiny --layers 4 --device cpu --dtype float32 --slots 4 --out /tmp/mixed

Slot 0 prefills a first chunk of n tokens (a new text prompt each step) while slots 1.. decode one token
each; the median over --steps steps of each kind, with the host waiting for every step (as a served step's
gap is that step's wall time). Writes OUT/DATE-CARD-tp1-mixed-step.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="27b")
    p.add_argument("--layers", type=int, default=8, help="text layers (a multiple of 4)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/dsqv-mixed-step"))
    args = p.parse_args()

    import torch

    from ds_qwen_vision.checkpoint import PRESETS, build_checkpoint
    from ds_qwen_vision.model import DTYPES, init_distributed, load_model
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner
    from ds_qwen_vision.runner.warmup import _text_ids

    preset = f"{args.preset}-{args.layers}layers"
    PRESETS[preset] = copy.deepcopy(PRESETS[args.preset])
    PRESETS[preset]["text"]["num_hidden_layers"] = args.layers
    t = time.perf_counter()
    path = build_checkpoint(args.ckpt_dir / preset, preset=preset, seed=0, dtype=args.dtype,
                            device="cuda" if args.device == "cuda" else None)
    build_s = time.perf_counter() - t
    init_distributed(args.device)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model = load_model(str(path), 1, args.device, DTYPES[args.dtype], show_progress=False)
    t = time.perf_counter()
    # prefill_graph_tokens: the graph path on CPU too (run eagerly there), so the script checks itself
    runner = ModelRunner(model, device, max_slots=args.slots, max_len=2048, prefill_graph_tokens=max(args.chunks),
                         mixed_prefill=True)
    runner_s = time.perf_counter() - t
    graphs = runner.prefill_graphs
    mixed_sizes = list(graphs.mixed)
    ids = _text_ids(model.config, max(args.chunks) + 64)  # ordinary text tokens (no image placeholders)
    decoding = list(range(1, args.slots))
    for slot in decoding:  # every other slot holds a 64-token prompt and decodes
        runner.run(StepPlan(prefill=[Prefill(slot, ids[slot:slot + 64])]))

    def timed(plan) -> float:
        sync()
        t0 = time.perf_counter()
        runner.run(plan)
        sync()
        return time.perf_counter() - t0

    def median(plan) -> float:
        timed(plan)  # once untimed: the first use of this size in this process
        return 1e3 * statistics.median(timed(plan) for _ in range(args.steps))

    decode = [(slot, ids[slot]) for slot in decoding]
    rows = [{"run": f"decode step alone, {len(decode)} rows", "ms": median(StepPlan(decode=decode))}]
    for n in args.chunks:
        plan = StepPlan(prefill=[Prefill(0, ids[:n], [], None, 0, n)], decode=decode)
        graphs.mixed = mixed_sizes
        one = median(plan) if runner.mixed(plan) is not None else None
        graphs.mixed = []  # the baseline: the same buffers and graphs, the chunk and the decode as two forwards
        two = median(plan)
        graphs.mixed = mixed_sizes
        alone = median(StepPlan(prefill=[Prefill(0, ids[:n], [], None, 0, n)]))
        rows.append({"run": f"chunk of {n} + {len(decode)} decode rows", "chunk_tokens": n,
                     "one_forward_ms": one, "two_forwards_ms": two, "chunk_alone_ms": alone,
                     "one_over_two": one / two if one else None})
        print(json.dumps(rows[-1]), flush=True)
    card = torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu"
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "card": card,
           "command": " ".join(["python", "benchmarks/mixed_step.py", *sys.argv[1:]]), "tp": 1,
           "checkpoint": {"preset": args.preset, "layers": args.layers, "dtype": args.dtype, "weights": "random"},
           "slots": args.slots, "cuda_graphs": runner.cuda_graphs, "mixed_graph_sizes": mixed_sizes,
           "build_s": build_s, "runner_init_s": runner_s, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{datetime.date.today().isoformat()}-{card.replace('NVIDIA ', '').replace(' ', '-')}-tp1-mixed-step.json"
    (args.out / name).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
