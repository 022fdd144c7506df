"""Run under TRITON_INTERPRET=1 (tests/test_fused.py starts it): the Triton decode-attention kernel and the
prefill-chunk attention kernel (kernels/chunk_attention.py), and reference_attention, over a paged KV cache,
on CPU against a float64 definition (softmax(q k^T * scale, causal by position) v, GQA) computed from each
row's contiguous keys and values, before they are scattered into the pool through a shuffled block table."""
import sys

import torch

from ds_qwen_vision.kernels.chunk_attention import chunk_attention
from ds_qwen_vision.kernels import chunk_attention as chunk_module
from ds_qwen_vision.kernels.decode_attention import (Fp8Pool, MixedMask, PagedKV, quantize_fp8, reference_attention,
                                                     split_kv_attention, static_cache_attention)


def definition(q, k, v, qpos, scale):
    """q [b, Hq, T, D]; k/v [b, Hkv, L, D] contiguous per row; qpos [b, T]. Returns [b, T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    visible = torch.arange(k.shape[2]) <= qpos[:, None, :, None]  # [b, 1, T, L]
    return (s.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def paged(k, v, lengths, block_size, spare=3):
    """Scatter each row's first lengths[r] positions of k/v [b, Hkv, L, D] into pools whose blocks are a
    random permutation (block 0 the null block, large finite garbage, for every unmapped table entry; `spare`
    unused blocks of garbage too). Returns key_pool, value_pool, table [b, L / block_size] int32."""
    b, hkv, length, d = k.shape
    per_row = length // block_size
    used = [-(-int(n) // block_size) for n in lengths]
    ids = (torch.randperm(sum(used) + spare) + 1).tolist()  # pool blocks 1.. in a random order
    table = torch.zeros(b, per_row, dtype=torch.int32)
    pools = [torch.randn(sum(used) + spare + 1, hkv, block_size, d) * 100 for _ in range(2)]  # garbage
    for r in range(b):
        for j in range(used[r]):
            table[r, j] = blk = ids.pop()
            for pool, x in zip(pools, (k, v)):
                pool[blk] = x[r, :, j * block_size:(j + 1) * block_size]
    return *pools, table


def check(name, out, ref, worst):
    assert out.shape == ref.shape and not out.isnan().any(), (name, out.shape)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"{name}: rel {rel:.2e}")
    assert rel < 1e-5, (name, rel)
    return max(worst, rel)


def main():
    if "--cuda" in sys.argv:  # the compiled kernels on a GPU (benchmarks' device calls), not the interpreter
        torch.set_default_device("cuda")
    torch.manual_seed(0)
    worst = 0.0
    # decode and speculative verify: row 0's first token sees one key; the last row is long enough for
    # many slices; a row's tokens are its last T positions
    for b, hq, hkv, t, d, length, block_size, splits in [
            (3, 6, 2, 1, 32, 512, 16, 5), (2, 8, 2, 3, 64, 256, 32, 2), (3, 4, 4, 8, 16, 192, 64, None),
            (2, 12, 2, 2, 32, 640, 16, 8), (1, 4, 1, 1, 16, 128, 64, 4),
            (2, 4, 2, 2, 16, 1280, 16, 20)]:  # 20 slices: merged 16 at a time
        q = torch.randn(b, t, hq, d).transpose(1, 2)  # strided like the layer's query
        k, v = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
        lengths = torch.randint(t, length // 2, (b,))
        lengths[0] = t  # the first token of row 0 sees a single key
        lengths[-1] = length - 5  # nearly the whole capacity, across every slice
        qpos = lengths[:, None] - t + torch.arange(t)  # [b, t] int64
        key_pool, value_pool, table = paged(k, v, lengths, block_size)
        ref = definition(q, k, v, qpos, d ** -0.5)
        kv = PagedKV(table, qpos, block_size)
        tag = f"b={b} hq={hq} hkv={hkv} t={t} d={d} L={length} P={block_size} lengths={lengths.tolist()}"
        worst = check(f"decode kernel {tag}", split_kv_attention(q, key_pool, value_pool, kv, d ** -0.5, splits),
                      ref, worst)
        worst = check(f"reference {tag}", reference_attention(q, key_pool, value_pool, kv, d ** -0.5), ref, worst)
    # prefill chunks: the chunk's tokens at start.. (its keys written before attention), padding queries past
    # the prompt's end whose positions map to the null block (their output is not compared)
    for b, hq, hkv, t, d, length, block_size, starts, real in [
            (1, 6, 2, 70, 32, 320, 16, [37], 61), (2, 4, 1, 20, 16, 128, 32, [0, 90], 20),
            (2, 8, 8, 9, 64, 128, 64, [50, 3], 5)]:
        q = torch.randn(b, t, hq, d).transpose(1, 2)
        k, v = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
        starts = torch.tensor(starts)
        qpos = starts[:, None] + torch.arange(t)  # [b, t]
        qpos[:, real:] += 3  # padding: positions past the prompt, in blocks the table leaves at 0
        key_pool, value_pool, table = paged(k, v, starts + real, block_size)
        kv = PagedKV(table, qpos, block_size)
        ref = definition(q, k, v, qpos, d ** -0.5)[:, :real]
        tag = f"b={b} hq={hq} hkv={hkv} t={t} d={d} L={length} P={block_size} starts={starts.tolist()}"
        out = chunk_attention(q, key_pool, value_pool, kv, d ** -0.5)
        assert out.isfinite().all(), "padding queries read finite garbage"
        worst = check(f"chunk kernel {tag}", out[:, :real], ref, worst)
        # another launch shape (benchmarks/kernels_h200.py times them): the same values
        out = chunk_attention(q, key_pool, value_pool, kv, d ** -0.5, tiles=(128, 64, 8, 2))
        worst = check(f"chunk kernel 128x64 {tag}", out[:, :real], ref, worst)
        worst = check(f"reference {tag}", reference_attention(q, key_pool, value_pool, kv, d ** -0.5)[:, :real],
                      ref, worst)
    # a mixed forward (one sequence's chunk, then one token per decode row) through the attention interface,
    # the kernels taken as on CUDA: the chunk by its length (split-KV at 4 tokens, chunk kernel at 12), the
    # decode rows' strided queries by the split-KV kernel, all from one pool
    # FP8 pools (memory.kv_cache_dtype fp8_e4m3): every path against the definition on the stored values
    # (e4m3 x scale), decode / verify and a prefill chunk
    for b, hq, hkv, t, d, length, block_size in [(3, 6, 2, 1, 32, 512, 16), (2, 8, 2, 4, 64, 256, 32),
                                                  (2, 4, 1, 20, 16, 128, 32)]:
        q = torch.randn(b, t, hq, d).transpose(1, 2)
        k, v = (torch.randn(b, hkv, length, d) * torch.rand(b, hkv, length, 1) * 8 for _ in "kv")
        k, v = (data.double() * scale[..., None] for data, scale in (quantize_fp8(k), quantize_fp8(v)))
        lengths = torch.randint(t, length, (b,))
        qpos = lengths[:, None] - t + torch.arange(t)
        key_pool, value_pool, table = paged(k.float(), v.float(), lengths, block_size)
        key_pool, value_pool = (Fp8Pool(*quantize_fp8(p)) for p in (key_pool, value_pool))
        kv = PagedKV(table, qpos, block_size)
        ref = definition(q, k, v, qpos, d ** -0.5)
        tag = f"fp8 b={b} hq={hq} hkv={hkv} t={t} d={d} L={length} P={block_size}"
        kernel = split_kv_attention if t <= 8 else chunk_attention
        worst = check(f"{kernel.__name__} {tag}", kernel(q, key_pool, value_pool, kv, d ** -0.5), ref, worst)
        worst = check(f"reference {tag}", reference_attention(q, key_pool, value_pool, kv, d ** -0.5), ref, worst)
    chunk_module.applies = lambda query: True
    for t, block_size in [(4, 16), (12, 32)]:
        rows, hq, hkv, d, length = 3, 4, 2, 32, 256
        k, v = torch.randn(1 + rows, hkv, length, d), torch.randn(1 + rows, hkv, length, d)
        lengths = torch.tensor([40 + t, 1, 100, 250])  # the chunk's sequence first
        key_pool, value_pool, table = paged(k, v, lengths, block_size)
        q = torch.randn(1, t + rows, hq, d).transpose(1, 2)
        chunk_qpos = 40 + torch.arange(t)[None]  # [1, t]
        decode_qpos = lengths[1:, None] - 1  # [rows, 1]
        mask = MixedMask(PagedKV(table[:1], chunk_qpos, block_size), PagedKV(table[1:], decode_qpos, block_size), t)
        out, _ = static_cache_attention(None, q, key_pool, value_pool, mask, scaling=d ** -0.5)
        want = torch.cat([definition(q[:, :, :t], k[:1], v[:1], chunk_qpos, d ** -0.5),
                          definition(q[0, :, t:].transpose(0, 1)[:, :, None], k[1:], v[1:], decode_qpos,
                                     d ** -0.5).transpose(0, 1)], dim=1)
        worst = check(f"mixed t={t} P={block_size} lengths={lengths.tolist()}", out, want, worst)
    print(f"OK worst {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
