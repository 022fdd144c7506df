"""Run under TRITON_INTERPRET=1 (tests/test_fused.py starts it): kernels/fp8_linear.py on CPU against the
reference paths in fp8.py -- the activation quantization against fp8.quantize_activation (the same e4m3 values
and scales), the W8A16 matmul against fp8.dequantize then a float64 matmul, over shapes with partial blocks,
several K splits and 1..16 rows. `--cuda`: the compiled kernels on a GPU (the benchmarks' device calls).

The interpreter's float32 -> e4m3 cast drops the exponent's carry when a value rounds up to the next power of
two (124.3 gives 64, not 128; 0.0149 gives 0.0137, not 0.0156, at the subnormals' edge; a GPU's cvt is right):
there, and only there, a value may fall short of the reference's power of two (by at most half); on CUDA every
value must be identical."""
import os
import sys

import torch

from ds_qwen_vision.fp8 import FP8, dequantize, quantize_activation as reference_quantize
from ds_qwen_vision.checkpoint import quantize_blockwise
from ds_qwen_vision.kernels import fp8_linear


# the interpreter: float32 (its bf16 emulation of tl.dot is not the GPU's); CUDA: bf16, the serving dtype
# (tl.dot would take float32 as tf32)
DTYPES = (torch.bfloat16,) if "--cuda" in sys.argv else (torch.float32,)


def rel(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def main() -> None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if "--cuda" in sys.argv:
        torch.set_default_device("cuda")
    g = torch.Generator(device=torch.get_default_device()).manual_seed(0)
    for m, k in ((1, 128), (6, 1152), (33, 640)):
        x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k // 128).repeat_interleave(128)
        q, scale = fp8_linear.quantize_activation(x)
        q_ref, scale_ref = reference_quantize(x)
        assert scale.shape == scale_ref.shape and scale.stride() == scale_ref.stride(), (scale.stride(), scale_ref.stride())
        assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0), (m, k)
        got, want = q.float(), q_ref.float()
        carry = interpreted & (torch.frexp(want)[0].abs() == 0.5) & (got.abs() < want.abs()) & (2 * got.abs() >= want.abs())
        same = got == want
        bad = ~(same | carry)
        assert not bad.any(), (m, k, got[bad][:8], want[bad][:8], (x / scale.repeat_interleave(128, 1))[bad][:8])
        print(f"quantize {m}x{k}: scales equal, {same.float().mean().item():.4%} of values identical"
              + (f" (the rest: the interpreter's carry, {int(carry.sum())})" if interpreted else ""))
    for m, n, k in ((1, 200, 640), (5, 384, 2048), (16, 64, 1024), (3, 1000, 4096), (2, 64, 4096)):
        w = torch.randn(n, k, generator=g, dtype=torch.float32)
        wq, scale = quantize_blockwise(w, (128, 128))
        assert wq.dtype == FP8
        for dtype in DTYPES:
            x = torch.randn(m, k, generator=g).to(dtype)
            want = x.double() @ dequantize(wq, scale, (128, 128), dtype).double().T
            for tiles in (fp8_linear.Tiles(), fp8_linear.Tiles(block_n=128, per_sm=4), fp8_linear.Tiles(block_n=32)):
                got = fp8_linear.w8a16_matmul(x, wq, scale, tiles)
                assert got.dtype == dtype and got.shape == (m, n)
                err = rel(got, want)
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                assert err < tol, (m, n, k, dtype, tiles, err)
                print(f"w8a16 {m}x{n}x{k} {dtype} block_n {tiles.block_n} "
                      f"(splits {fp8_linear.splits_for(n, k, 4, tiles)}): relative error {err:.2e}")
    print("OK")


if __name__ == "__main__":
    main()
