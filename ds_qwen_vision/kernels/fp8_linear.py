"""The CUDA kernels of the block-scaled FP8 linears (fp8.py holds the format, the layers and which path runs).

* `quantize_activation`: x [M, K] -> e4m3 [M, K] and one float32 scale per token and 128 columns (Qwen's
  `activation_scheme: dynamic`), in one kernel. Eager torch takes six (float, abs, amax, divide, clamp, cast)
  and two copies, once per linear: on one H100 that was 170 ms of an 8k-token prefill of 32 layers, more than
  the FP8 GEMMs saved (docs/benchmarks.md). Its reference is fp8.quantize_activation.
* `w8a16_matmul`: x [M, K] (bf16, M <= 16: decode and speculative verify) @ (W e4m3 x its 128 x 128 block
  scale)^T: the e4m3 tile widened to bf16 (exact), multiplied with float32 accumulation, each 128-column step's
  product scaled by its block's scale (the reference path rounds weight x scale to bf16 first: the two agree
  within bf16 rounding). A decode GEMM is a read of its weight. cuBLASLt's block-scaled kernel tiles 128 rows
  of tokens and 128 of outputs, which leaves SMs idle for a 5,120-wide output and pays the activation
  quantization on top: 0.81x bf16's decode step on one H100 where the bytes allow ~0.55x. Here a program reads
  `Tiles.block_n` output rows over a split of K, so every shape fills the card; one split stores the product,
  several store float32 partial sums that a second kernel adds in split order (deterministic). Measured
  (2026-12-08, docs/benchmarks.md): its first form (the weight x scale rounded to bf16 per element, always a
  float32 buffer and two more kernels) gave 0.79x; this form and the Tiles alternatives are for the next run.

Triton's e4m3 (float8e4nv) needs compute capability 8.9 (fp8.probe_gemm checks each path on the device before
it serves; tests/_fp8_linear_interp.py runs both under the Triton interpreter against the reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: fp8.py keeps the reference paths
    triton = None

GROUP = 128       # activation scale group (columns), = the weight's scale block
GROUPS_PER_PROGRAM = 8
W8A16_MAX_ROWS = 16  # tl.dot's smallest M tile: decode (1 row per sequence) and verify (k + 1 <= 8) fit


def quantize_activation(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 128, rows contiguous) -> (e4m3 [M, K], float32 scales [M, K / 128] with
    stride (1, M): token-major, as cuBLASLt wants them)."""
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2d.device)
    scale = torch.empty((k // GROUP, m), dtype=torch.float32, device=x2d.device)
    groups = k // GROUP
    _quantize[(m, triton.cdiv(groups, GROUPS_PER_PROGRAM))](x2d, q, scale, m, groups, x2d.stride(0),
                                                            GROUP=GROUP, G=GROUPS_PER_PROGRAM)
    return q, scale.t()


@dataclass(frozen=True)
class Tiles:
    """The W8A16 kernel's launch shape: output rows per program, warps, pipeline stages, and programs per SM that
    the K split aims at. benchmarks/bench_fp8.py times alternatives (its TILES) inside CUDA graphs."""
    block_n: int = 64
    warps: int = 4
    stages: int = 4
    per_sm: int = 2


TILES = Tiles()


def splits_for(n: int, k: int, sms: int, tiles: Tiles = TILES) -> int:
    """Split K so that about tiles.per_sm programs per SM read the weight (a power of two, each split at least
    four scale groups)."""
    programs, splits = triton.cdiv(n, tiles.block_n), 1
    while programs * splits < tiles.per_sm * sms and k // (splits * 2) >= 4 * GROUP:
        splits *= 2
    return splits


_SMS: dict = {}


def w8a16_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                 tiles: Tiles = TILES) -> torch.Tensor:
    """x [M <= 16, K] @ (weight [N, K] e4m3 x scale_inv [N / 128, K / 128])^T -> [M, N] in x's dtype."""
    m, k = x2d.shape
    n = weight.shape[0]
    if GROUP % tiles.block_n or m > W8A16_MAX_ROWS:  # a tile's rows share one scale row
        raise ValueError(f"W8A16: {m} rows (at most {W8A16_MAX_ROWS}), block_n {tiles.block_n} (a divisor of {GROUP})")
    if x2d.is_cuda and x2d.device.index not in _SMS:
        _SMS[x2d.device.index] = torch.cuda.get_device_properties(x2d.device).multi_processor_count
    splits = splits_for(n, k, _SMS.get(x2d.device.index, 4), tiles)  # (4 under the interpreter: splits exercised)
    span = triton.cdiv(triton.cdiv(k, splits), GROUP) * GROUP
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    # one split writes the product itself; several write float32 partial sums, added in split order
    partial = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x2d.device)
    _w8a16[(triton.cdiv(n, tiles.block_n), splits)](
        x2d, weight, scale_inv, partial, m, n, k, span, x2d.stride(0), weight.stride(0), scale_inv.stride(0),
        BLOCK_M=W8A16_MAX_ROWS, BLOCK_N=tiles.block_n, BLOCK_K=GROUP, num_warps=tiles.warps,
        num_stages=tiles.stages)
    if splits > 1:
        _sum_splits[(triton.cdiv(m * n, 1024),)](partial, out, m * n, SPLITS=splits, BLOCK=1024)
    return out


if triton is not None:
    @triton.jit
    def _quantize(x_ptr, q_ptr, s_ptr, M, GROUPS, stride_x, GROUP: tl.constexpr, G: tl.constexpr):
        row = tl.program_id(0)
        g = tl.program_id(1) * G + tl.arange(0, G)
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ok = (g < GROUPS)[:, None]
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
        tl.store(q_ptr + row * GROUPS * GROUP + cols, (x / scale[:, None]).to(tl.float8e4nv), mask=ok)
        tl.store(s_ptr + g * M + row, scale, mask=g < GROUPS)

    @triton.jit
    def _w8a16(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, SPAN, stride_x, stride_w, stride_s,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # BLOCK_N divides the 128-row scale block and BLOCK_K is one: a program's tile has one scale per K step,
        # applied to the tile's product (e4m3 -> bf16 is exact, the dot accumulates in float32)
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = pid_k * SPAN
        s_row = s_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_s
        for k0 in range(start, tl.minimum(start + SPAN, K), BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=(rm < M)[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype))) * tl.load(s_row + k0 // BLOCK_K)
        out = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & n_ok[None, :])

    @triton.jit
    def _sum_splits(p_ptr, out_ptr, MN, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
