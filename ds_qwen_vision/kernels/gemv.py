"""Skinny GEMM (1..16 rows) for decode projections: y [m, n] = x [m, k] @ w [n, k]^T.

A decode step reads every weight once for a handful of rows, so a projection is bound by how fast its
weight streams from memory. cuBLAS answers these shapes with split-K GEMV kernels plus a separate
reduce (docs/benchmarks.md: ~73% of copy bandwidth at tp=2). This Triton kernel gives each program a
block of output features and the whole reduction (no second kernel), with several K tiles in flight;
`benchmarks/kernels_h200.py` times it against cuBLAS per shape and `linear` uses whichever won for
that weight (`choose`). CPU reference: torch.nn.functional.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_ROWS = 16
# (n, k) of a weight -> True when the Triton kernel beat cuBLAS at 1 row on this device (see choose)
_PICK: dict[tuple[int, int, int], bool] = {}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias), through the faster kernel for this weight's shape when rows <= 16."""
    rows = x.numel() // x.shape[-1]
    if rows <= MAX_ROWS and x.is_cuda and _PICK.get((weight.shape[0], weight.shape[1], weight.device.index)):
        return skinny_linear(x, weight)
    return F.linear(x, weight)


def choose(weight: torch.Tensor, repeats: int = 20) -> bool:
    """Time both kernels on this weight at 1 and 16 rows (device events) and remember the winner."""
    key = (weight.shape[0], weight.shape[1], weight.device.index)
    if key in _PICK or triton is None or not weight.is_cuda:
        return _PICK.get(key, False)
    total = {"cublas": 0.0, "triton": 0.0}
    for rows in (1, 16):
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        for name, fn in (("cublas", F.linear), ("triton", skinny_linear)):
            total[name] += triton.testing.do_bench(lambda: fn(x, weight), warmup=5, rep=repeats,
                                                   return_mode="median")
    _PICK[key] = total["triton"] < 0.97 * total["cublas"]
    return _PICK[key]


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
