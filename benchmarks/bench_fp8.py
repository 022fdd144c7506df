"""FP8 weights against bf16 at runner level, one card, one call (issue 26): the same random model, timed in bf16,
then its language-model linears quantized in place the way Qwen's FP8 checkpoints are (128 x 128 blocks,
checkpoint.quantize_blockwise; modules_to_not_convert as checkpoint.fp8_not_converted names them) and timed again.

    # GPU: the 27B's widths, 32 of 64 layers (bf16 and FP8 copies of the linears together fit one H100 there)
    python3 benchmarks/bench_fp8.py --out OUT/fp8.json
    # CPU (the script end to end; the reference path, its figures mean nothing)
    python3 benchmarks/bench_fp8.py --preset tiny --device cpu --layers 4 --context 256 --chunk 64 --steps 8 \\
        --repeats 1 --block 32

The timings are bench_paged.measure's (TTFT of an 8k prompt, decode at 1 and 16 rows, 512 and 8k context).
Also recorded: how many linears took the block-scaled GEMM (fp8.probe_gemm decides; the rest dequantize), the
weights' bytes before and after, and how far the FP8 model's logits for the 8k prompt are from bf16's (random
weights: the real model's accuracy is not measured by this). Target: FP8 decode <= 0.65x bf16's at one row.
Then the GEMM table (gemm_table): every FP8 weight shape in CUDA graphs, bf16 against the block-scaled GEMM and
the W8A16 kernel at each TILES launch shape, and what each would make of one decode step's GEMMs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_paged import build, measure  # noqa: E402


@torch.no_grad()
def quantize_in_place(model, block: tuple[int, int]) -> dict:
    """The model's converted linears (fp8.converted_linears) become FP8 with their bf16 values quantized."""
    from ds_qwen_vision.checkpoint import fp8_not_converted, quantize_blockwise
    from ds_qwen_vision.fp8 import Fp8Format, convert, converted_linears

    fmt = Fp8Format(block, tuple(fp8_not_converted(model.config)))
    values = {name: m.weight.data for name, m in converted_linears(model, fmt).items()}
    convert(model, fmt, 1)  # FP8 weights of the same shapes, empty, and the GEMM probe
    for name, w in values.items():
        module = model.get_submodule(name)
        q, scale = quantize_blockwise(w, block)
        module.weight.copy_(q)
        module.weight_scale_inv.copy_(scale)
    modules = [model.get_submodule(n) for n in values]
    return {"converted_linears": len(modules), "through_gemm": sum(m.fp8_gemm for m in modules)}


# W8A16 launch shapes timed against the default (kernels/fp8_linear.Tiles: block_n, warps, stages, per_sm)
TILES = [(32, 4, 4, 2), (64, 4, 4, 2), (64, 8, 4, 2), (64, 4, 4, 4), (128, 4, 4, 2), (128, 8, 4, 2), (128, 8, 3, 4)]


@torch.no_grad()
def gemm_table(model, device) -> dict:
    """Each distinct FP8 weight shape of the quantized model (fused groups included), in CUDA graphs: ms per call
    of the bf16 matmul (the weight dequantized), the activation quantization + block-scaled GEMM
    (fp8.CHOSEN.gemm), and the W8A16 kernel at each TILES launch shape (up to 16 rows); and per implementation
    the sum over one decode step's GEMMs (each shape times its count in the step) at 1 row."""
    from ds_qwen_vision.fp8 import CHOSEN, FP8, dequantize, scaled_gemm
    from ds_qwen_vision.kernels import fp8_linear
    from ds_qwen_vision.tp_policy import FUSED_SCALE, FUSED_WEIGHT
    from kernels_h200 import graph_time_ms

    def graph_ms(calls: list) -> float:  # each call reads its own weight copy: L2 serves none
        return graph_time_ms(lambda i: calls[i % len(calls)](), 4 * len(calls))

    shapes, count = {}, {}
    for m in model.modules():
        for w_name, s_name in (("weight", "weight_scale_inv"), (FUSED_WEIGHT, FUSED_SCALE)):
            w = getattr(m, w_name, None)
            if isinstance(w, torch.Tensor) and w.dtype == FP8 and w.shape[0] % 128 == 0 and w.shape[1] % 512 == 0:
                shapes.setdefault(tuple(w.shape), (w, getattr(m, s_name)))
                fused_member = w.untyped_storage().nbytes() != w.numel()  # a view into its group's weight
                if not fused_member:  # the decode step runs the group's GEMM, not its members'
                    count[tuple(w.shape)] = count.get(tuple(w.shape), 0) + 1
    rows, step = [], {}
    for (n, k), (w, scale) in sorted(shapes.items()):
        copies = max(1, -(-(160 << 20) // (n * k)))  # > 3x the L2 of an H100 / H200 in FP8 bytes
        ws = [w.clone() for _ in range(copies)]
        refs = [dequantize(c, scale, (128, 128), torch.bfloat16) for c in ws[:max(1, copies // 2)]]
        for m in (1, 4, 16, 2048):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            row = {"n": n, "k": k, "rows": m, "in_step": count.get((n, k), 0),
                   "bf16_ms": graph_ms([lambda r=r: x @ r.T for r in refs]),
                   "scaled_mm_ms": graph_ms([lambda c=c: scaled_gemm(x, c, scale, CHOSEN.gemm) for c in ws])}
            if m <= fp8_linear.W8A16_MAX_ROWS:
                for t in TILES:
                    tiles = fp8_linear.Tiles(*t)
                    row[f"w8a16_ms_{'_'.join(map(str, t))}"] = graph_ms(
                        [lambda c=c: fp8_linear.w8a16_matmul(x, c, scale, tiles) for c in ws])
            if m == 1:
                for key, ms in row.items():
                    if key.endswith("_ms") or "_ms_" in key:
                        step[key] = step.get(key, 0.0) + ms * row["in_step"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ws, refs
    print(json.dumps({"decode_step_gemms_ms_at_1_row": step}), flush=True)
    return {"shapes": rows, "decode_step_gemms_ms_at_1_row": step,
            "note": "CUDA-graph replays, each call on its own copy of the weight (none from L2); tiles = "
                    "block_n_warps_stages_per_sm (kernels/fp8_linear.Tiles)"}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="27b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="the chunked prefill's kernels by kind, both runs")
    p.add_argument("--block", type=int, default=128, help="the FP8 scale block (Qwen's: 128)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    t0 = time.perf_counter()
    model, device = build(args)
    args.label = "bf16"
    before = weight_bytes(model)
    bf16 = measure(model, device, args)
    info = quantize_in_place(model, (args.block, args.block))
    args.label = "fp8"
    fp8 = measure(model, device, args)
    gemms = gemm_table(model, device) if device.type == "cuda" else []
    a, b = fp8.pop("first_logits"), bf16.pop("first_logits")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python3", *sys.argv]),
              "card": bf16["gpu"], "label": f"random bf16 weights, {args.preset} widths, {args.layers} layers, tp=1; "
                                            f"FP8: the same weights quantized ({args.block}x{args.block} blocks)",
              "weights_gib": {"bf16": before / 2**30, "fp8": weight_bytes(model) / 2**30}, **info,
              "logits_rel_err_fp8_vs_bf16": float((a - b).norm() / b.norm()),
              "same_argmax": int(a.argmax()) == int(b.argmax()), "runs": [bf16, fp8], "gemms": gemms,
              "ratio_fp8_to_bf16": {k: fp8[k] / bf16[k] for k in bf16 if k.endswith("_ms")},
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
