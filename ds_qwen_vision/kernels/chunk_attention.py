"""Attention of a prefill chunk (more than 8 query tokens) over a PAGED KV cache, GQA, causal by position:
query (r, i) sees row r's positions [0, qpos[r, i]], which live in the pool blocks row r's block table names
(decode_attention.PagedKV: the cache layout and why positions, not masks).

Why: a prefill chunk replayed as a CUDA graph attends over its sequence's whole cache capacity because its
start is a tensor. PyTorch's SDPA takes a boolean mask only in its memory-efficient kernel, which reads every
key and value it is given, after transformers expands the KV heads for GQA: on one H200 that was 10.2 ms of a
64-token chunk's 41.8 ms of kernels (16 layers), 14.8 ms at 512 tokens (torch.profiler, docs/benchmarks.md),
over a contiguous 9,472-position cache; SDPA cannot read a paged one at all. This kernel (flash-attention's
forward, one program per block of query tokens and query head) reads, through the block table, only the key
tiles up to the block's largest position, found from qpos in the kernel (no host read, no [T, L] temporary:
a sequence's capacity may be 262,144 positions), and reads the KV heads in place.

`chunk_attention` (CUDA) has the contract of decode_attention.reference_attention, which is its reference
path (decode_attention.static_cache_attention keeps it for CPU). Scores and softmax in float32, probabilities
cast to the value dtype before P @ V, as SDPA.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path serves
    triton = None

BLOCK_M, BLOCK_N = 64, 32
# (BLOCK_M, BLOCK_N, warps, stages): the launch shape; benchmarks/kernels_h200.py (`--only chunk`) times others
TILES = (BLOCK_M, BLOCK_N, 8, 2)


def applies(query) -> bool:
    dim = query.shape[-1]
    return triton is not None and query.is_cuda and 16 <= dim <= 256 and dim & (dim - 1) == 0


def chunk_attention(query, key_pool, value_pool, paged, scaling, tiles: tuple[int, int, int, int] = TILES):
    """query [b, Hq, T, D] (may be strided); key_pool/value_pool [num_blocks, Hkv, P, D]; paged a
    decode_attention.PagedKV (table [b, blocks] int32, qpos [b, T] int64, read on the device only).
    Returns [b, T, Hq, D]."""
    block_m, block_n, warps, stages = tiles
    from .decode_attention import pool_args

    b, n_heads, t, dim = query.shape
    kv_heads = key_pool.shape[1]
    table, qpos = paged.table, paged.qpos
    (k, ks), (v, vs) = pool_args(key_pool), pool_args(value_pool)
    out = torch.empty((b, t, n_heads, dim), dtype=query.dtype, device=query.device)
    _forward[(triton.cdiv(t, block_m), b * n_heads)](
        query, k, v, ks, vs, table, qpos, out, scaling, t,
        *query.stride(), *k.stride(), *v.stride(), *ks.stride()[:3], table.stride(0), *qpos.stride(),
        *out.stride(), HEADS=n_heads, GROUP=n_heads // kv_heads, D=dim, P=paged.block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, FP32=query.dtype == torch.float32, FP8=ks is not k,
        num_warps=warps if dim >= 128 else 4, num_stages=stages)
    return out


if triton is not None:
    @triton.jit
    def attend_tile(q, k_ptrs, v_ptrs, n_ok, keep, m_i, l_i, acc, scaling, FP32: tl.constexpr,
                    ks_ptrs, vs_ptrs, FP8: tl.constexpr):
        """One key tile of flash attention's online softmax (also the decode kernel's, decode_attention.py):
        scores and softmax in float32, row sums from the float32 probabilities, P @ V from P in the value
        dtype (as the reference). FP8 pools: each key / value dequantized (e4m3 x its scale, ks_ptrs /
        vs_ptrs [BLOCK_N]) to the query's dtype first. Returns the updated running max, row sums and
        accumulator."""
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        if FP8:
            k = (k.to(tl.float32) * tl.load(ks_ptrs, mask=n_ok, other=0.0)[:, None]).to(q.dtype)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(keep, s * scaling, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        if FP8:
            v = (v.to(tl.float32) * tl.load(vs_ptrs, mask=n_ok, other=0.0)[:, None]).to(q.dtype)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    # Not specialised on the chunk's length or qpos's row stride (the chunk's length too), nor the table's:
    # an eager continuing chunk of any length (prefill graphs off) reuses the variant warm-up compiled
    # instead of compiling after ready.
    @triton.jit(do_not_specialize=["T", "stb", "spb"])
    def _forward(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, qpos_ptr, out_ptr, scaling, T,
                 sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd, ssb, ssh, ssl, stb, spb, spt,
                 sob, sot, soh, sod,
                 HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr, FP8: tl.constexpr):
        row_head = tl.program_id(1)
        row = row_head // HEADS
        head = row_head % HEADS
        kvh = head // GROUP
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, D)
        m_ok = rm < T
        q = tl.load(q_ptr + row * sqb + head * sqh + rm[:, None] * sqt + rd[None, :] * sqd, mask=m_ok[:, None],
                    other=0.0)
        qpos = tl.load(qpos_ptr + row * spb + rm * spt, mask=m_ok, other=-1)  # [BLOCK_M]; -1 past T: sees nothing
        end = tl.max(qpos, 0) + 1  # no key at or past the block's largest position + 1 is read
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for n0 in range(0, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < end
            # position p is at offset p % P of pool block table[row, p // P] (int64: a pool may pass 2^31 elements)
            blk = tl.load(table_ptr + row * stb + rn // P, mask=n_ok, other=0).to(tl.int64)
            off = (rn % P)[:, None]
            s_off = blk * ssb + kvh * ssh + (rn % P) * ssl  # the FP8 scales of these positions
            m_i, l_i, acc = attend_tile(q, k_ptr + blk[:, None] * skb + kvh * skh + off * skl + rd[None, :] * skd,
                                        v_ptr + blk[:, None] * svb + kvh * svh + off * svl + rd[None, :] * svd,
                                        n_ok, rn[None, :] <= qpos[:, None], m_i, l_i, acc, scaling, FP32,
                                        ks_ptr + s_off, vs_ptr + s_off, FP8)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key (past T): zeros
        tl.store(out_ptr + row * sob + rm[:, None] * sot + head * soh + rd[None, :] * sod,
                 o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
