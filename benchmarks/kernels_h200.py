"""Kernel-level check and timing on one GPU, the 27B decode shapes at tp=1 (issue 10):

    python3 benchmarks/kernels_h200.py --out OUT/kernels.json

1. Decode attention (kernels/decode_attention.py): the split-KV Triton kernel against a float64 reference
   (bf16 inputs) and against the matmul reference path, 1 and 8 query tokens, 1 and 16 rows, a paged cache
   holding 512 or 9,000 tokens per row; time per layer call (16 calls, one per attention layer, each over its
   own pool, replayed as a CUDA graph) and the keys and values read against copy bandwidth. `--only attention`.
2. Projections at 1..16 rows: cuBLAS (F.linear) on the separate and the fused weights, and the Triton skinny
   GEMM (benchmarks/gemv.py), as achieved weight-read bandwidth against the measured copy bandwidth. Each
   timing replays a CUDA graph over enough distinct weight copies that none is served from L2.
3. The GDN decode step without its GEMMs (kernels/gdn_step.py: conv update + gated delta rule, state from
   and into the slot state): the Triton backend against flash-linear-attention's recurrence with the torch
   gating and write-back (the path served before) and the torch reference, 1 and 16 rows, all rows or a
   masked subset decoding; 48 layers' distinct states per replay, as a 27B step. Errors against the reference
   path in float64 from the same bf16 inputs (the bf16 torch path's own error beside).
   `--only gdn` runs this part alone.
4. Prefill-chunk attention over the paged cache (kernels/chunk_attention.py) at its launch shapes
   (CHUNK_TILES) against SDPA on contiguous expanded keys with a lower-right causal bias (flash), a served
   chunk of 2,048 queries at starts 2,048 / 4,096 / 6,144; 8 layers' caches per replay; error against
   float64. Also SDPA as an eager chunk could call it: the blocks gathered contiguous, the copy timed, the KV
   heads not expanded (enable_gqa). `--only chunk`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gemv  # noqa: E402  (the measured alternative, kept beside its benchmark)
from ds_qwen_vision.kernels.decode_attention import reference_attention, split_kv_attention  # noqa: E402

HIDDEN = 5120


def graph_time_ms(fn, calls: int, repeats: int = 20) -> float:
    """Median ms per call of `calls` invocations of fn(i) captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return sorted(times)[len(times) // 2]


def copy_bw() -> float:
    a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(200):  # ~0.2 s of copies first: an idle card's clocks ramp up (2.71 TB/s read cold, 2026-12-01)
        b.copy_(a)
    ms = graph_time_ms(lambda i: b.copy_(a), 4)
    return 2 * a.numel() * 2 / (ms * 1e-3)


def attention(results, bw: float) -> None:
    """Decode attention over the paged cache (blocks of 64, each row's blocks its own, 24 / 4 heads of 256): the
    split-KV kernel against float64 and the matmul reference path, 1 and 16 rows, 1 and 8 query tokens, 512 and
    9,000 tokens of context; 16 layers' pools per replay. The keys and values read, against copy bandwidth
    (issue 25's long-context decode: >= 85%)."""
    from ds_qwen_vision.kernels.decode_attention import PagedKV

    rows = []
    hq, hkv, d, block = 24, 4, 256, 64
    for b in (1, 16):
        for t in (1, 8):
            for ctx in (512, 9000):
                blocks = -(-(ctx + t) // block)
                pools = [tuple(torch.randn(1 + b * blocks, hkv, block, d, device="cuda", dtype=torch.bfloat16)
                               for _ in range(2)) for _ in range(16)]
                table = (1 + torch.arange(b * blocks, device="cuda", dtype=torch.int32)).view(b, blocks)
                paged = PagedKV(table, (ctx + torch.arange(t, device="cuda")).expand(b, t).contiguous(), block)
                q = torch.randn(b, t, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                scale = d ** -0.5
                k, v = pools[0]
                ref64 = reference_attention(q.double(), k.double(), v.double(), paged, scale)
                err = ((split_kv_attention(q, k, v, paged, scale).double() - ref64).norm() / ref64.norm()).item()
                err_mm = ((reference_attention(q, k, v, paged, scale).double() - ref64).norm() / ref64.norm()).item()
                t_kernel = graph_time_ms(lambda i: split_kv_attention(q, *pools[i], paged, scale), 16)
                t_matmul = graph_time_ms(lambda i: reference_attention(q, *pools[i], paged, scale), 16)
                read = 2 * b * (ctx + t) * hkv * d * 2  # keys and values up to the last query, bf16
                rows.append({"rows": b, "query_tokens": t, "context": ctx, "rel_err_kernel": err,
                             "rel_err_matmul": err_mm, "kernel_us": 1e3 * t_kernel, "matmul_us": 1e3 * t_matmul,
                             "kernel_read_of_copy_bw": read / (t_kernel * 1e-3) / bw})
                print(f"attention b={b} t={t} ctx={ctx}: kernel {1e3 * t_kernel:.1f} us "
                      f"({read / (t_kernel * 1e-3) / bw:.0%} of copy bandwidth, rel err {err:.1e}), "
                      f"matmul {1e3 * t_matmul:.1f} us (rel err {err_mm:.1e})", flush=True)
                del pools
                torch.cuda.empty_cache()
    results["attention"] = rows


SHAPES = {  # name: (rows of each member, in_features); tp=1 27B
    "gdn in_proj qkv|z|b|a": ((10240, 6144, 48, 48), HIDDEN),
    "mlp gate|up": ((17408, 17408), HIDDEN),
    "attn q|k|v": ((12288, 1024, 1024), HIDDEN),
    "gdn out_proj": ((HIDDEN,), 6144),
    "attn o_proj": ((HIDDEN,), 6144),
    "mlp down_proj": ((HIDDEN,), 17408),
    "lm_head": ((248320,), HIDDEN),
}


def projections(results, bw) -> None:
    rows = []
    for name, (members, k) in SHAPES.items():
        n = sum(members)
        nbytes = n * k * 2
        copies = max(2, -(-(1 << 30) // nbytes))  # >= 1 GiB of distinct weights per replay
        fused = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        parts = [list(w.split(members)) for w in fused]
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.double(), fused[0].double())
            got = gemv.skinny_linear(x, fused[0])
            err = ((got.double() - ref).norm() / ref.norm()).item()
            t_sep = graph_time_ms(lambda i: [F.linear(x, p) for p in parts[i]], copies)
            t_fused = graph_time_ms(lambda i: F.linear(x, fused[i]), copies)
            t_triton = graph_time_ms(lambda i: gemv.skinny_linear(x, fused[i]), copies)
            row = {"proj": name, "rows": m, "n": n, "k": k, "weight_mb": nbytes / 1e6,
                   "cublas_separate_us": 1e3 * t_sep, "cublas_fused_us": 1e3 * t_fused, "triton_us": 1e3 * t_triton,
                   "triton_rel_err": err, "floor_us": 1e6 * nbytes / bw}
            for key in ("cublas_separate", "cublas_fused", "triton"):
                row[key + "_pct_of_copy_bw"] = 100 * row["floor_us"] / row[key + "_us"]
            rows.append(row)
            print(f"{name:24s} m={m:2d}: floor {row['floor_us']:7.1f} us | cuBLAS separate {1e3 * t_sep:7.1f} "
                  f"({row['cublas_separate_pct_of_copy_bw']:3.0f}%) fused {1e3 * t_fused:7.1f} "
                  f"({row['cublas_fused_pct_of_copy_bw']:3.0f}%) | triton {1e3 * t_triton:7.1f} "
                  f"({row['triton_pct_of_copy_bw']:3.0f}%, rel err {err:.1e})", flush=True)
        del fused, parts
        torch.cuda.empty_cache()
    results["projections"] = rows


GDN = {"hk": 16, "hv": 48, "dk": 128, "dv": 128, "k": 4, "layers": 48}  # the 27B's Gated DeltaNet layers


def gdn(results, bw) -> None:
    from ds_qwen_vision.kernels import gdn_step

    hk, hv, dk, dv, ksz, layers = (GDN[x] for x in ("hk", "hv", "dk", "dv", "k", "layers"))
    c = 2 * hk * dk + hv * dv
    rows = []
    for m in (1, 16):
        proj = torch.randn(m, 1, c + hv * dv + 2 * hv, device="cuda", dtype=torch.bfloat16)
        x, _, beta_in, a = torch.split(proj, [c, hv * dv, hv, hv], dim=-1)
        weight = torch.randn(c, ksz, device="cuda", dtype=torch.bfloat16) * 0.5
        A_log = torch.randn(hv, device="cuda", dtype=torch.bfloat16)
        dt_bias = torch.randn(hv, device="cuda", dtype=torch.bfloat16)
        conv = torch.randn(layers, m, c, ksz, device="cuda", dtype=torch.bfloat16)
        rec = 0.1 * torch.randn(layers, m, hv, dk, dv, device="cuda")
        active = torch.arange(m, device="cuda") % 3 != 1 if m > 1 else None

        def step(i, backend, act):
            gdn_step.BACKEND = backend
            mixed = gdn_step.conv_update(x, conv[i], weight, act)
            return gdn_step.gated_delta_update(mixed, a, beta_in, A_log, dt_bias, rec[i], act)

        gdn_step.BACKEND = "torch"  # the truth: the reference path in float64 from the same bf16 inputs
        exact = (conv[0].double(), rec[0].double())
        out64 = gdn_step.gated_delta_update(gdn_step.conv_update(x.double(), exact[0], weight.double(), active),
                                            a.double(), beta_in.double(), A_log.double(), dt_bias.double(),
                                            exact[1], active)
        ref = (out64, *exact)
        outs = {}
        for backend in ("torch", "triton", "fla"):
            if backend == "fla" and gdn_step._fla_recurrent is None:
                continue
            c0, r0 = conv[0].clone(), rec[0].clone()
            outs[backend] = (step(0, backend, active).double(), conv[0].double(), rec[0].double())
            conv[0].copy_(c0)
            rec[0].copy_(r0)
        for backend in outs:
            errs = [((got - want).norm() / want.norm()).item() for got, want in zip(outs[backend], ref)]
            for act in ((None, active) if m > 1 else (None,)):
                ms = graph_time_ms(lambda i: step(i, backend, act), layers)
                row = {"rows": m, "backend": backend, "masked_rows": act is not None, "us_per_layer": 1e3 * ms,
                       "ms_per_48_layers": ms * layers, "rel_err_out_conv_state": errs,
                       "state_floor_us": 1e6 * 2 * rec[0].numel() * 4 / bw}
                rows.append(row)
                print(f"gdn step m={m:2d} {backend:6s} masked={act is not None!s:5s}: {1e3 * ms:7.1f} us/layer "
                      f"({ms * layers:.2f} ms / 48 layers; state r+w floor {row['state_floor_us']:.1f} us); "
                      f"rel err out/conv/state {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}", flush=True)
        gdn_step.BACKEND = None
        del conv, rec
        torch.cuda.empty_cache()
    results["gdn_step"] = rows


# chunk_attention launch shapes (BLOCK_M, BLOCK_N, warps, stages), the served one first (chunk_attention.TILES)
CHUNK_TILES = [(64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2)]


def chunk(results) -> None:
    """A served prefill chunk's attention (2,048 queries, paged cache of 64-position blocks, 24 / 4 heads of
    256) at its three continuing starts of an 8k prompt: the Triton kernel at each CHUNK_TILES shape against
    PyTorch's SDPA on the same keys made contiguous and expanded (lower-right causal: flash where it takes it),
    8 layers' caches per replay; errors against float64."""
    from torch.nn.attention.bias import causal_lower_right

    from ds_qwen_vision.kernels.chunk_attention import chunk_attention
    from ds_qwen_vision.kernels.decode_attention import PagedKV, gather_kv

    rows = []
    hq, hkv, d, t, block = 24, 4, 256, 2048, 64
    for start in (2048, 4096, 6144):
        length = start + t
        blocks = length // block
        pools = [(torch.randn(blocks + 1, hkv, block, d, device="cuda", dtype=torch.bfloat16),
                  torch.randn(blocks + 1, hkv, block, d, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
        table = torch.arange(1, blocks + 1, device="cuda", dtype=torch.int32)[None]
        paged = PagedKV(table, (start + torch.arange(t, device="cuda"))[None], block)
        q = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        scale = d ** -0.5
        flat = [tuple(x[1:].permute(1, 0, 2, 3).reshape(1, hkv, length, d) for x in pool) for pool in pools]
        k64, v64 = (x.double().repeat_interleave(hq // hkv, 1) for x in flat[0])
        mask = torch.arange(length, device="cuda")[None, :] <= paged.qpos[0][:, None]
        ref = torch.softmax((q.double() @ k64.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), -1)
        ref = (ref @ v64).transpose(1, 2)
        flops = 4 * d * hq * t * (start + (t + 1) / 2)  # QK^T and PV over the visible keys

        def rel(out):
            return ((out.double() - ref).norm() / ref.norm()).item()

        row = {"query_tokens": t, "start": start, "tflops_per_call": flops / 1e12}
        for tiles in CHUNK_TILES:
            name = "_".join(map(str, tiles))
            try:
                row[f"kernel_{name}_rel_err"] = rel(chunk_attention(q, *pools[0], paged, scale, tiles))
                ms = graph_time_ms(lambda i: chunk_attention(q, *pools[i % 8], paged, scale, tiles), 8)
                row[f"kernel_{name}_us"], row[f"kernel_{name}_tflops"] = 1e3 * ms, flops / ms / 1e9
            except Exception as e:  # noqa: BLE001 -- a launch shape this card cannot hold (shared memory)
                row[f"kernel_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        expanded = [tuple(x.repeat_interleave(hq // hkv, 1) for x in kv) for kv in flat]
        bias = causal_lower_right(t, length)
        try:
            row["sdpa_rel_err"] = rel(F.scaled_dot_product_attention(q, *expanded[0], attn_mask=bias,
                                                                     scale=scale).transpose(1, 2))
            ms = graph_time_ms(lambda i: F.scaled_dot_product_attention(q, *expanded[i % 8], attn_mask=bias,
                                                                        scale=scale), 8)
            row["sdpa_us"], row["sdpa_tflops"] = 1e3 * ms, flops / ms / 1e9
        except Exception as e:  # noqa: BLE001 -- recorded, not fatal
            row["sdpa_error"] = f"{type(e).__name__}: {str(e)[:200]}"

        def gathered(i):
            # what an eager chunk (its key count known on the host) would cost through SDPA: the row's blocks
            # gathered contiguous (the copy timed too), the KV heads as they are (enable_gqa), lower-right causal
            k, v = (gather_kv(x, table, block) for x in pools[i % 8])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)

        try:
            row["sdpa_gather_gqa_rel_err"] = rel(gathered(0).transpose(1, 2))
            ms = graph_time_ms(gathered, 8)
            row["sdpa_gather_gqa_us"], row["sdpa_gather_gqa_tflops"] = 1e3 * ms, flops / ms / 1e9
        except Exception as e:  # noqa: BLE001 -- recorded, not fatal (flash may refuse GQA here)
            row["sdpa_gather_gqa_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del pools, flat, expanded, k64, v64, ref
        torch.cuda.empty_cache()
    results["chunk_attention"] = rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", choices=("attention", "projections", "gdn", "chunk"))
    a = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bw()
    results = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_tbs": bw / 1e12}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    parts = {"attention": lambda r: attention(r, bw), "projections": lambda r: projections(r, bw), "gdn": lambda r: gdn(r, bw),
             "chunk": chunk}
    for name, part in parts.items():
        if a.only not in (None, name):
            continue
        try:
            part(results)
        except Exception as e:  # keep what the other part measured
            results.setdefault("errors", []).append(repr(e))
            print("ERROR", repr(e), flush=True)
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
