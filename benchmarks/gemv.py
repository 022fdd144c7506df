"""Skinny GEMM (1..16 rows) for decode projections: y [m, n] = x [m, k] @ w [n, k]^T.

A decode step reads every weight once for a handful of rows, so a projection is bound by how fast its
weight streams from memory. cuBLAS answers these shapes with split-K GEMV kernels plus a separate
reduce. This Triton kernel gives each program a block of output features and the whole reduction (no
second kernel), with several K tiles in flight. `benchmarks/kernels_h200.py` times it against cuBLAS on
every decode projection shape (2026-12-01, H200, docs/benchmarks.md): on the fused weights cuBLAS
already reads at the copy-bandwidth floor and this kernel is within 0-5% of it (lm_head: 7%), inside
run-to-run spread, so serving keeps cuBLAS (torch.nn.functional.linear, also the CPU reference) and
this stays the measured alternative, here beside its benchmark (nothing serves it).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_ROWS = 16


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _skinny[grid](x2, weight, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0), BLOCK_M=16)
    return out.view(*shape[:-1], n)


if triton is not None:
    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bn, bk, w, s in [(32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 4),
                                      (32, 512, 4, 3), (64, 64, 4, 6), (16, 512, 4, 4)]],
        key=["n", "k"])
    @triton.jit
    def _skinny(x_ptr, w_ptr, o_ptr, m, n, k, sx, sw, so,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_ptr + rm[:, None] * sx + kk[None, :], mask=(rm[:, None] < m) & (kk[None, :] < k), other=0.0)
            wt = tl.load(w_ptr + rn[:, None] * sw + kk[None, :], mask=(rn[:, None] < n) & (kk[None, :] < k), other=0.0)
            acc += tl.dot(xt, tl.trans(wt))
        tl.store(o_ptr + rm[:, None] * so + rn[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=(rm[:, None] < m) & (rn[None, :] < n))
