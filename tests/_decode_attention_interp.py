"""Run under TRITON_INTERPRET=1 (tests/test_fused.py starts it): the Triton decode-attention kernels and the
prefill-chunk attention kernel (kernels/chunk_attention.py) on CPU against a float64 reference written from
the definition (softmax(q k^T * scale, masked) v, GQA)."""
import sys

import torch

from ds_qwen_vision.kernels.chunk_attention import chunk_attention
from ds_qwen_vision.kernels.decode_attention import reference_attention, split_kv_attention


def definition(q, k, v, mask, scale):
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.expand(b, 1, t, k.shape[2]), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def main():
    torch.manual_seed(0)
    worst = 0.0
    for b, hq, hkv, t, d, length, splits in [(2, 6, 2, 1, 32, 200, 3), (1, 8, 2, 3, 64, 130, 2),
                                             (3, 4, 4, 8, 16, 70, None), (1, 12, 2, 2, 32, 257, 4)]:
        q = torch.randn(b, t, hq, d).transpose(1, 2)  # strided like the layer's query
        k, v = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
        pos = torch.randint(0, length - t, (b,))
        pos[0] = 0  # a row whose first token sees one key
        qpos = pos[:, None] + torch.arange(t)  # [b, t]
        mask = (torch.arange(length)[None, None, :] <= qpos[:, :, None])[:, None]  # [b, 1, t, L]
        if t == 1 and b > 1:
            mask = mask[:, :, :1]
        ref = definition(q, k, v, mask, d ** -0.5)
        for name, out in (("kernel", split_kv_attention(q, k, v, mask, d ** -0.5, splits)),
                          ("reference", reference_attention(q, k, v, mask, d ** -0.5))):
            assert out.shape == ref.shape and not out.isnan().any(), (name, out.shape)
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, rel)
            print(f"{name} b={b} hq={hq} hkv={hkv} t={t} d={d} L={length}: rel {rel:.2e}")
            assert rel < 1e-5, (name, rel)
    # prefill chunks over a static cache, masked by position as runner/prefill_graphs.py does: the chunk's
    # tokens at start.., padding rows past the prompt's end, keys past the chunk never visible
    for b, hq, hkv, t, d, length, start, real in [(1, 6, 2, 70, 32, 300, 37, 61), (2, 4, 1, 20, 16, 96, 0, 20),
                                                  (1, 8, 8, 9, 64, 64, 50, 5)]:
        q = torch.randn(b, t, hq, d).transpose(1, 2)
        k, v = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
        pos = start + torch.arange(t)
        pos[real:] = start + real + torch.arange(t - real) + 3  # padding: positions past the prompt
        mask = (torch.arange(length)[None, :] <= pos[:, None])[None, None]  # [1, 1, t, L], shared by the rows
        ref = definition(q, k, v, mask, d ** -0.5)
        out = chunk_attention(q, k, v, mask, d ** -0.5)
        assert out.shape == ref.shape and not out.isnan().any(), out.shape
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, rel)
        print(f"chunk b={b} hq={hq} hkv={hkv} t={t} d={d} L={length} start={start}: rel {rel:.2e}")
        assert rel < 1e-5, rel
    print(f"OK worst {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
