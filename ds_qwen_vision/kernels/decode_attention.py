"""Decode attention: 1..8 query tokens per row over a whole static KV cache, GQA (registered with
transformers' AttentionInterface, so transformers' own attention layers call it).

Two paths computing the same function:
* `reference_attention` (CPU, and CUDA where the kernel does not apply): two GQA-packed matmuls.
* `split_kv_attention` (CUDA): a split-KV ("flash-decoding") Triton kernel. Each program takes one
  (row, kv head) and one slice of the cache; the query heads of that kv head and the T query tokens are
  the rows of one tile, so each key and value is read once for all of them. Tiles of keys that the mask
  hides entirely are skipped without reading K or V: under a CUDA graph the cache length is fixed (9,472
  positions) while a conversation holds a few hundred, and the matmul path reads (and casts to float32)
  every position. A second small kernel merges the slices by their log-sum-exp.
Scores and softmax in float32, probabilities cast to the value dtype before P @ V, as SDPA's kernels
and the reference do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import chunk_attention

ATTENTION = "dsqv_static"
MAX_QUERY_TOKENS = 8  # decode (1) and speculative verify (k + 1 <= 8)


def reference_attention(query, key, value, attention_mask, scaling):
    """query [b, Hq, T, D]; key/value [b, Hkv, L, D]; mask [b, 1, T or 1, L] bool (True = attend) or None.
    Returns [b, T, Hq, D]."""
    b, n_heads, t, dim = query.shape
    kv_heads = key.shape[1]
    group = n_heads // kv_heads
    q = query.reshape(b, kv_heads, group * t, dim)  # q head h reads kv head h // group; rows (head, token)
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # [b, kv_heads, group*t, len]
    if attention_mask is not None:
        mask = attention_mask.expand(b, 1, t, key.shape[2])[:, :, None]  # [b, 1, 1, t, len]
        scores = scores.view(b, kv_heads, group, t, -1).masked_fill(~mask, float("-inf")).view_as(scores)
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [b, kv_heads, group*t, dim]
    return out.view(b, n_heads, t, dim).transpose(1, 2)


def static_cache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: the decode paths above for 1..8 tokens; a prefill chunk with a
    boolean mask on CUDA: kernels/chunk_attention.py; otherwise (CPU, no mask, long chunks) SDPA.

    For one query token over a whole static cache, PyTorch's SDPA picks the memory-efficient kernel,
    which does not split the keys: 550 us per call over 9,472 positions on H200 (36% of a decode
    step, torch.profiler).
    """
    if isinstance(attention_mask, MixedMask):  # a prefill chunk and decode rows in one forward
        return mixed_attention(module, query, key, value, attention_mask, scaling), None
    t = query.shape[2]
    if t > MAX_QUERY_TOKENS and chunk_attention.applies(query, attention_mask):  # a prefill chunk (graph)
        return chunk_attention.chunk_attention(query, key, value, attention_mask, scaling), None
    if t > MAX_QUERY_TOKENS or (t > 1 and attention_mask is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    dim = query.shape[-1]
    if (query.is_cuda and triton is not None and attention_mask is not None and attention_mask.dtype == torch.bool
            and dim >= 16 and dim & (dim - 1) == 0):
        return split_kv_attention(query, key, value, attention_mask, scaling), None
    return reference_attention(query, key, value, attention_mask, scaling), None


AttentionInterface.register(ATTENTION, static_cache_attention)


@dataclass
class MixedMask:
    """The attention mask of a forward whose sequence is one slot's prefill chunk (its first `t` positions)
    followed by one token for each decode row (runner/slot_state.MixedView): the chunk's queries attend
    over its slot's cache (`chunk` [1, 1, t, L] bool), decode row r's over row r's (`decode` [rows, 1, 1, L])."""

    chunk: torch.Tensor
    decode: torch.Tensor
    t: int
    slot: torch.Tensor  # [1], the chunk's slot


def mixed_attention(module, query, key, value, mask: MixedMask, scaling):
    """query [1, Hq, t + rows, D]; key / value every slot's cache [slots, Hkv, L, D]. Each part through the
    path it takes on its own (a chunk: kernels/chunk_attention.py or SDPA; decode rows: the split-KV kernel
    or the reference). Returns [1, t + rows, Hq, D]."""
    t, rows = mask.t, mask.decode.shape[0]
    chunk, _ = static_cache_attention(module, query[:, :, :t], key.index_select(0, mask.slot),
                                      value.index_select(0, mask.slot), mask.chunk, scaling=scaling)
    decode_q = query[0, :, t:].transpose(0, 1).unsqueeze(2).contiguous()  # [rows, Hq, 1, D]
    decode, _ = static_cache_attention(module, decode_q, key[:rows], value[:rows], mask.decode, scaling=scaling)
    return torch.cat([chunk, decode.transpose(0, 1)], dim=1)


# ---- the Triton kernel (CUDA; also runs under TRITON_INTERPRET=1 on CPU, which the tests use) -------------
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path serves
    triton = None

BLOCK_N = 64


def split_kv_attention(query, key, value, attention_mask, scaling, splits: int | None = None):
    """Same contract as reference_attention; attention_mask is required (bool)."""
    b, n_heads, t, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = n_heads // kv_heads
    m = group * t
    block_m = max(16, triton.next_power_of_2(m))
    if splits is None:  # enough (row, kv head, slice) programs to fill the GPU twice over
        splits = max(1, min(triton.cdiv(length, BLOCK_N), triton.cdiv(264, b * kv_heads)))
    chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(length, chunk)
    mask = attention_mask.expand(b, 1, t, length)
    part = torch.empty((b, kv_heads, splits, m, dim), dtype=torch.float32, device=query.device)
    lse = torch.empty((b, kv_heads, splits, m), dtype=torch.float32, device=query.device)
    out = torch.empty((b, t, n_heads, dim), dtype=query.dtype, device=query.device)
    _partial[(b * kv_heads, splits)](
        query, key, value, mask, part, lse, scaling, length, chunk,
        *query.stride(), *key.stride(), *value.stride(), mask.stride(0), mask.stride(2), mask.stride(3),
        KV_HEADS=kv_heads, GROUP=group, T=t, M=m, D=dim, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        SPLITS=splits, FP32=query.dtype == torch.float32, num_warps=4 if block_m <= 16 else 8)
    _merge[(b * kv_heads, m)](
        part, lse, out, *out.stride(), KV_HEADS=kv_heads, GROUP=group, T=t, M=m, D=dim,
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr, scaling, length, chunk,
                 sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd, smb, smt, sml,
                 KV_HEADS: tl.constexpr, GROUP: tl.constexpr, T: tl.constexpr, M: tl.constexpr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                 FP32: tl.constexpr):
        row_head = tl.program_id(0)
        split = tl.program_id(1)
        row = row_head // KV_HEADS
        kvh = row_head % KV_HEADS
        rm = tl.arange(0, BLOCK_M)  # tile row = (query head in group) * T + token
        g = rm // T
        tok = rm % T
        rd = tl.arange(0, D)
        rows_ok = rm < M
        q = tl.load(q_ptr + row * sqb + (kvh * GROUP + g)[:, None] * sqh + tok[:, None] * sqt + rd[None, :] * sqd,
                    mask=rows_ok[:, None], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < end
            keep = tl.load(mask_ptr + row * smb + tok[:, None] * smt + rn[None, :] * sml,
                           mask=rows_ok[:, None] & n_ok[None, :], other=0) != 0
            if tl.max(keep.to(tl.int32)) > 0:  # a tile the mask hides entirely reads no K or V
                m_i, l_i, acc = chunk_attention.attend_tile(
                    q, k_ptr + row * skb + kvh * skh + rn[:, None] * skl + rd[None, :] * skd,
                    v_ptr + row * svb + kvh * svh + rn[:, None] * svl + rd[None, :] * svd,
                    n_ok, keep, m_i, l_i, acc, scaling, FP32)
        base = (row_head * SPLITS + split) * M
        has = l_i > 0
        tl.store(lse_ptr + base + rm, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=rows_ok)
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(part_ptr + (base + rm)[:, None] * D + rd[None, :], o, mask=(rows_ok & has)[:, None])

    @triton.jit
    def _merge(part_ptr, lse_ptr, out_ptr, sob, sot, soh, sod,
               KV_HEADS: tl.constexpr, GROUP: tl.constexpr, T: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
               SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
        row_head = tl.program_id(0)
        r = tl.program_id(1)  # (query head in group) * T + token
        rs = tl.arange(0, SPLITS_P2)
        rd = tl.arange(0, D)
        idx = (row_head * SPLITS + rs) * M + r
        lse = tl.load(lse_ptr + idx, mask=rs < SPLITS, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        used = lse > float("-inf")
        w = tl.where(used, tl.exp(lse - top), 0.0)
        o = tl.load(part_ptr + idx[:, None] * D + rd[None, :], mask=used[:, None], other=0.0)  # idle slices: no read
        total = tl.sum(w, 0)
        res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        row = row_head // KV_HEADS
        head = (row_head % KV_HEADS) * GROUP + r // T
        tl.store(out_ptr + row * sob + (r % T) * sot + head * soh + rd * sod, res.to(out_ptr.dtype.element_ty))
