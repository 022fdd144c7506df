"""Attention of a prefill chunk (9..1024 query tokens) over a whole static KV cache, GQA, with a boolean mask
whose visible keys per query lie below a bound (causal by position, as runner/prefill_graphs.py builds it).

Why: a prefill chunk replayed as a CUDA graph attends over the slot's whole static cache (9,472 positions
for the 27B's 8k + image limits) because its start is a tensor. PyTorch's SDPA takes a boolean mask only
in its memory-efficient kernel, which reads every key and value of the cache, after transformers expands
the KV heads for GQA: on one H200 that was 10.2 ms of a 64-token chunk's 41.8 ms of kernels (16 layers),
14.8 ms at 512 tokens (torch.profiler, docs/benchmarks.md). This kernel (flash-attention's forward, one
program per block of query tokens and query head) reads only the key tiles below the block's last visible
key, found from the mask itself, and reads the KV heads in place.

`chunk_attention` (CUDA) has the contract of decode_attention.reference_attention; the reference path is
PyTorch's SDPA (decode_attention.static_cache_attention keeps it for CPU and for anything this kernel does
not take). Scores and softmax in float32, probabilities cast to the value dtype before P @ V, as SDPA.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path serves
    triton = None

MAX_TOKENS = 1024  # the largest prefill graph (runner/prefill_graphs.py); longer chunks keep SDPA
BLOCK_M, BLOCK_N = 64, 32


def applies(query, attention_mask) -> bool:
    dim = query.shape[-1]
    return (triton is not None and query.is_cuda and attention_mask is not None
            and attention_mask.dtype == torch.bool and query.shape[2] <= MAX_TOKENS
            and 16 <= dim <= 256 and dim & (dim - 1) == 0)


def chunk_attention(query, key, value, attention_mask, scaling):
    """query [b, Hq, T, D]; key/value [b, Hkv, L, D]; attention_mask [b or 1, 1, T, L] bool (True = attend).
    Returns [b, T, Hq, D]."""
    b, n_heads, t, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    mask = attention_mask.expand(b, 1, t, length)
    # per query token, one past its last visible key: a tile at or beyond the block's largest is never read
    ends = torch.where(mask[:, 0], torch.arange(1, length + 1, device=mask.device, dtype=torch.int32), 0).amax(-1)
    out = torch.empty((b, t, n_heads, dim), dtype=query.dtype, device=query.device)
    _forward[(triton.cdiv(t, BLOCK_M), b * n_heads)](
        query, key, value, mask, ends, out, scaling, t,
        *query.stride(), *key.stride(), *value.stride(), mask.stride(0), mask.stride(2), mask.stride(3),
        ends.stride(0), *out.stride(),
        HEADS=n_heads, GROUP=n_heads // kv_heads, D=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        FP32=query.dtype == torch.float32, num_warps=8 if dim >= 128 else 4, num_stages=2)
    return out


if triton is not None:
    @triton.jit
    def attend_tile(q, k_ptrs, v_ptrs, n_ok, keep, m_i, l_i, acc, scaling, FP32: tl.constexpr):
        """One key tile of flash attention's online softmax (also the decode kernel's, decode_attention.py):
        scores and softmax in float32, row sums from the float32 probabilities, P @ V from P in the value
        dtype (as the reference). Returns the updated running max, row sums and accumulator."""
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
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
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    # Not specialised on the chunk's length or the mask's row stride (the key span): an eager continuing chunk
    # of any length (prefill graphs off) reuses the variant warm-up compiled instead of compiling after ready.
    @triton.jit(do_not_specialize=["T", "smt", "seb"])
    def _forward(q_ptr, k_ptr, v_ptr, mask_ptr, ends_ptr, out_ptr, scaling, T,
                 sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd, smb, smt, sml, seb,
                 sob, sot, soh, sod,
                 HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, FP32: tl.constexpr):
        row_head = tl.program_id(1)
        row = row_head // HEADS
        head = row_head % HEADS
        kvh = head // GROUP
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, D)
        m_ok = rm < T
        q = tl.load(q_ptr + row * sqb + head * sqh + rm[:, None] * sqt + rd[None, :] * sqd, mask=m_ok[:, None],
                    other=0.0)
        end = tl.max(tl.load(ends_ptr + row * seb + rm, mask=m_ok, other=0), 0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for n0 in range(0, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < end
            keep = tl.load(mask_ptr + row * smb + rm[:, None] * smt + rn[None, :] * sml,
                           mask=m_ok[:, None] & n_ok[None, :], other=0) != 0
            m_i, l_i, acc = attend_tile(q, k_ptr + row * skb + kvh * skh + rn[:, None] * skl + rd[None, :] * skd,
                                        v_ptr + row * svb + kvh * svh + rn[:, None] * svl + rd[None, :] * svd,
                                        n_ok, keep, m_i, l_i, acc, scaling, FP32)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key (padding): zeros
        tl.store(out_ptr + row * sob + rm[:, None] * sot + head * soh + rd[None, :] * sod,
                 o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
