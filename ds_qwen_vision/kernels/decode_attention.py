"""Attention of a full-attention layer over its PAGED KV cache, GQA (registered with transformers'
AttentionInterface, so transformers' own attention layers call it).

The cache of a layer is one pool of blocks, `[num_blocks, Hkv, P, D]` (P = block_size positions a block);
a sequence's positions live in the blocks its row of a block table names (runner/: the block manager).
Block 0 is a null block no sequence owns: unmapped table entries point at it, and padding queries may
write and read garbage there. Which keys a query sees is given by positions, not by a boolean mask: query
(r, i) attends to row r's positions [0, qpos[r, i]] (`PagedKV`). A `[T, L]` mask is no longer affordable
when a sequence's capacity is 100k+ positions, and positions let a kernel stop at a row's last key.

Three paths computing the same function:
* `reference_attention` (CPU, and CUDA where no kernel applies): gathers each row's blocks into a
  contiguous cache, builds the mask from qpos, two GQA-packed matmuls.
* `split_kv_attention` (CUDA, 1..8 query tokens a row: decode and speculative verify): a split-KV
  ("flash-decoding") Triton kernel. Each program takes one (row, kv head) and one slice of that row's keys
  [0, max qpos + 1), read in the kernel, so a short row in a long-capacity cache reads only its own keys and
  a long row is cut across all the slices (the number of slices is fixed by the launch, so a CUDA graph
  holds). The query heads of that kv head and the T query tokens are the rows of one tile, so each key and
  value is read once for all of them. A second small kernel merges the slices by their log-sum-exp.
* `chunk_attention.chunk_attention` (CUDA, a prefill chunk of more than 8 tokens): flash attention's forward
  over the same paged cache (kernels/chunk_attention.py).
A first prefill chunk (no mask: its keys are its own) takes PyTorch's SDPA, causal.
Scores and softmax in float32, probabilities cast to the value dtype before P @ V, as SDPA's kernels
and the reference do.

A pool may be an `Fp8Pool` (memory.kv_cache_dtype "fp8_e4m3"): every path dequantizes each key and value it
reads (e4m3 x its own scale) to the query's dtype before the same arithmetic, so the only difference from the
exact cache is the rounding of what was stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import chunk_attention

ATTENTION = "dsqv_static"
MAX_QUERY_TOKENS = 8  # decode (1) and speculative verify (k + 1 <= 8)


@dataclass
class PagedKV:
    """Where a batch's keys live in the paged cache and which keys each query sees (causal by position):
    row r's position p is in pool block table[r, p // block_size] at offset p % block_size; query (r, i)
    attends to positions [0, qpos[r, i]]."""
    table: torch.Tensor   # [b, blocks_per_seq] int32
    qpos: torch.Tensor    # [b, T] int64 (a row's T queries; decode T=1, speculative verify T<=8, prefill chunk T>8)
    block_size: int


@dataclass
class MixedMask:
    """The attention mask of a forward whose sequence is one sequence's prefill chunk (its first `t` queries)
    followed by one token for each decode row (runner/slot_state.MixedView): the chunk's queries attend
    through `chunk` ([1, blocks] table, qpos [1, t]), decode row r's through row r of `decode` (qpos
    [rows, 1]); both read the same pools."""

    chunk: PagedKV
    decode: PagedKV
    t: int


FP8_MAX = 448.0  # the largest finite float8 e4m3fn


@dataclass
class Fp8Pool:
    """A KV pool stored in float8 e4m3 (memory.kv_cache_dtype "fp8_e4m3"; vLLM's --kv-cache-dtype fp8): data
    [num_blocks, Hkv, P, D] and one float32 scale per stored vector, scale [num_blocks, Hkv, P] = the vector's
    largest magnitude / 448, so each key and value (one token, one head) keeps its own range. vLLM keeps one
    scale per layer (1.0 unless calibrated); a scale per vector costs 4 bytes beside the D bytes of data and
    needs no calibration."""
    data: torch.Tensor   # float8_e4m3fn
    scale: torch.Tensor  # float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 data [..., D], float32 scale [...]) with x ~= data * scale[..., None]."""
    scale = x.abs().amax(-1).float().clamp(min=1e-30) / FP8_MAX
    return (x.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def gather_kv(pool, table, block_size, dtype=None):
    """pool [num_blocks, Hkv, P, D] (or an Fp8Pool, dequantized to `dtype`); table [b, blocks] -> each row's
    blocks in order, [b, Hkv, blocks * P, D] (a copy, contiguous)."""
    b, blocks = table.shape
    idx = table.long()
    if isinstance(pool, Fp8Pool):
        data = pool.data.view(torch.uint8)[idx].view(torch.float8_e4m3fn)  # [b, blocks, Hkv, P, D]
        rows = (data.float() * pool.scale[idx][..., None]).to(dtype or torch.float32)
    else:
        rows = pool[idx]  # [b, blocks, Hkv, P, D]
    return rows.transpose(1, 2).reshape(b, pool.shape[1], blocks * block_size, pool.shape[-1])


def reference_attention(query, key_pool, value_pool, paged: PagedKV, scaling):
    """query [b, Hq, T, D] (may be strided); key_pool/value_pool [num_blocks, Hkv, P, D]. Returns [b, T, Hq, D]."""
    b, n_heads, t, dim = query.shape
    table = paged.table
    if not query.is_cuda:  # only the blocks up to the batch's last visible key (CUDA: no host sync, graphs)
        table = table[:, :int(paged.qpos.max()) // paged.block_size + 1]
    key = gather_kv(key_pool, table, paged.block_size, query.dtype)  # [b, Hkv, L, D]
    value = gather_kv(value_pool, table, paged.block_size, query.dtype)
    kv_heads, length = key.shape[1], key.shape[2]
    group = n_heads // kv_heads
    visible = torch.arange(length, device=query.device) <= paged.qpos[:, :, None]  # [b, T, L]
    q = query.reshape(b, kv_heads, group * t, dim)  # q head h reads kv head h // group; rows (head, token)
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # [b, kv_heads, group*t, len]
    scores = scores.view(b, kv_heads, group, t, -1).masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.matmul(scores.view(b, kv_heads, group * t, -1).softmax(-1).to(value.dtype), value)
    return out.view(b, n_heads, t, dim).transpose(1, 2)


def static_cache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface. attention_mask None: key/value are the chunk's own keys (a first
    prefill chunk), SDPA causal. A PagedKV (or a MixedMask of two): key/value are the layer's pools, read
    through the block table by the kernels above (CUDA) or the reference.

    For one query token over a long cache, PyTorch's SDPA picks the memory-efficient kernel, which does not
    split the keys: 550 us per call over 9,472 positions on H200 (36% of a decode step, torch.profiler).
    """
    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if isinstance(attention_mask, MixedMask):  # a prefill chunk and decode rows in one forward
        return mixed_attention(module, query, key, value, attention_mask, scaling), None
    if not isinstance(attention_mask, PagedKV):
        raise TypeError(f"{ATTENTION} attention takes None, a PagedKV or a MixedMask, not {type(attention_mask)}")
    if chunk_attention.applies(query):  # CUDA, Triton, a power-of-two head dim 16..256: both kernels
        if query.shape[2] <= MAX_QUERY_TOKENS:
            return split_kv_attention(query, key, value, attention_mask, scaling), None
        return chunk_attention.chunk_attention(query, key, value, attention_mask, scaling), None
    return reference_attention(query, key, value, attention_mask, scaling), None


AttentionInterface.register(ATTENTION, static_cache_attention)


def mixed_attention(module, query, key_pool, value_pool, mask: MixedMask, scaling):
    """query [1, Hq, t + rows, D]; key_pool / value_pool [num_blocks, Hkv, P, D]. Each part through the path
    it takes on its own (the chunk: split-KV or chunk kernel by its length; decode rows: the split-KV kernel;
    the reference off CUDA). Returns [1, t + rows, Hq, D]."""
    t = mask.t
    chunk, _ = static_cache_attention(module, query[:, :, :t], key_pool, value_pool, mask.chunk, scaling=scaling)
    decode_q = query[0, :, t:].transpose(0, 1).unsqueeze(2)  # [rows, Hq, 1, D], strided
    decode, _ = static_cache_attention(module, decode_q, key_pool, value_pool, mask.decode, scaling=scaling)
    return torch.cat([chunk, decode.transpose(0, 1)], dim=1)


# ---- the Triton kernel (CUDA; also runs under TRITON_INTERPRET=1 on CPU, which the tests use) -------------
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path serves
    triton = None

BLOCK_N = 64
PROGRAMS = 264  # (row, kv head, slice) programs to aim for: two per SM of an H100 / H200 (132 SMs)


def split_kv_attention(query, key_pool, value_pool, paged: PagedKV, scaling, splits: int | None = None):
    """Same contract as reference_attention, for T <= MAX_QUERY_TOKENS. table int32 (or int64), qpos int64,
    any strides; read on the device only (CUDA-graph safe)."""
    b, n_heads, t, dim = query.shape
    kv_heads = key_pool.shape[1]
    group = n_heads // kv_heads
    m = group * t
    block_m = max(16, triton.next_power_of_2(m))
    if splits is None:  # from the launch's shape only (a graph fixes it); a row's keys are cut in the kernel
        capacity = paged.table.shape[1] * paged.block_size  # only binds for a cache of < PROGRAMS tiles
        splits = max(1, min(triton.cdiv(capacity, BLOCK_N), triton.cdiv(PROGRAMS, b * kv_heads)))
    table, qpos = paged.table, paged.qpos
    (k, ks), (v, vs) = pool_args(key_pool), pool_args(value_pool)
    part = torch.empty((b, kv_heads, splits, m, dim), dtype=torch.float32, device=query.device)
    lse = torch.empty((b, kv_heads, splits, m), dtype=torch.float32, device=query.device)
    out = torch.empty((b, t, n_heads, dim), dtype=query.dtype, device=query.device)
    _partial[(b * kv_heads, splits)](
        query, k, v, ks, vs, table, qpos, part, lse, scaling,
        *query.stride(), *k.stride(), *v.stride(), *ks.stride()[:3], table.stride(0), *qpos.stride(),
        KV_HEADS=kv_heads, GROUP=group, T=t, M=m, D=dim, P=paged.block_size, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        SPLITS=splits, FP32=query.dtype == torch.float32, FP8=ks is not k, num_warps=4 if block_m <= 16 else 8)
    _merge[(b * kv_heads, m)](
        part, lse, out, *out.stride(), KV_HEADS=kv_heads, GROUP=group, T=t, M=m, D=dim,
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), SPLIT_BLOCK=16, num_warps=4)
    return out


def pool_args(pool):
    """A pool as the kernels take it, (data, scales): an Fp8Pool's (its scales contiguous: the kernels take
    one set of scale strides for keys and values); any other pool as (pool, pool), the second unread."""
    if isinstance(pool, Fp8Pool):
        assert pool.scale.stride() == pool.scale.contiguous().stride()
        return pool.data, pool.scale
    return pool, pool


if triton is not None:
    @triton.jit(do_not_specialize=["stb"])
    def _partial(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, qpos_ptr, part_ptr, lse_ptr, scaling,
                 sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd, ssb, ssh, ssl, stb, spb, spt,
                 KV_HEADS: tl.constexpr, GROUP: tl.constexpr, T: tl.constexpr, M: tl.constexpr,
                 D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLITS: tl.constexpr, FP32: tl.constexpr, FP8: tl.constexpr):
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
        qpos = tl.load(qpos_ptr + row * spb + tok * spt, mask=rows_ok, other=-1)  # [BLOCK_M], a tile row's last key
        # this row's keys [0, max qpos + 1) in SPLITS equal BLOCK_N-aligned slices; a slice past the end is idle
        length = tl.max(qpos, 0) + 1
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < end
            # position p is at offset p % P of pool block table[row, p // P] (int64: a pool may pass 2^31 elements)
            blk = tl.load(table_ptr + row * stb + rn // P, mask=n_ok, other=0).to(tl.int64)
            off = (rn % P)[:, None]
            s_off = blk * ssb + kvh * ssh + (rn % P) * ssl  # the FP8 scales of these positions
            m_i, l_i, acc = chunk_attention.attend_tile(
                q, k_ptr + blk[:, None] * skb + kvh * skh + off * skl + rd[None, :] * skd,
                v_ptr + blk[:, None] * svb + kvh * svh + off * svl + rd[None, :] * svd,
                n_ok, rn[None, :] <= qpos[:, None], m_i, l_i, acc, scaling, FP32, ks_ptr + s_off, vs_ptr + s_off, FP8)
        base = (row_head * SPLITS + split) * M
        has = l_i > 0
        tl.store(lse_ptr + base + rm, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=rows_ok)
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(part_ptr + (base + rm)[:, None] * D + rd[None, :], o, mask=(rows_ok & has)[:, None])

    @triton.jit
    def _merge(part_ptr, lse_ptr, out_ptr, sob, sot, soh, sod,
               KV_HEADS: tl.constexpr, GROUP: tl.constexpr, T: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
               SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
        row_head = tl.program_id(0)
        r = tl.program_id(1)  # (query head in group) * T + token
        rs = tl.arange(0, SPLITS_P2)
        rd = tl.arange(0, D)
        lse = tl.load(lse_ptr + (row_head * SPLITS + rs) * M + r, mask=rs < SPLITS, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        used = lse > float("-inf")
        total = tl.sum(tl.where(used, tl.exp(lse - top), 0.0), 0)
        last = tl.max(tl.where(used, rs + 1, 0), 0)  # slices past the row's keys did no work: not read
        # the slices' outputs SPLIT_BLOCK at a time: all at once, [SPLITS_P2, D] float32 (256 x 256 at one row
        # and two kv heads) is 512 values a thread at 4 warps, past the 255 registers a thread has
        res = tl.zeros((D,), tl.float32)
        for s0 in range(0, last, SPLIT_BLOCK):
            rb = s0 + tl.arange(0, SPLIT_BLOCK)
            idx = (row_head * SPLITS + rb) * M + r
            lb = tl.load(lse_ptr + idx, mask=rb < last, other=float("-inf"))
            ok = lb > float("-inf")
            o = tl.load(part_ptr + idx[:, None] * D + rd[None, :], mask=ok[:, None], other=0.0)
            res += tl.sum(o * tl.where(ok, tl.exp(lb - top), 0.0)[:, None], 0)
        res = res / tl.where(total > 0, total, 1.0)
        row = row_head // KV_HEADS
        head = (row_head % KV_HEADS) * GROUP + r // T
        tl.store(out_ptr + row * sob + (r % T) * sot + head * soh + rd * sod, res.to(out_ptr.dtype.element_ty))
