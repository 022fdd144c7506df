"""Run under TRITON_INTERPRET=1 (tests/test_fused.py starts it): kernels/gdn_step.py's Triton conv update and
gated delta rule on CPU against its torch reference path (which tests/test_speculative.py checks against
transformers' GDN forward), in both modes -- decode (state in place, masked rows) and verify (step
buffers) -- with GQA, strided inputs as the fused in-projection gives them, and float32."""
import sys

import torch

from ds_qwen_vision.kernels import gdn_step


def case(b, t, hk, hv, dk, dv, k, verify, seed):
    g = torch.Generator().manual_seed(seed)
    c = 2 * hk * dk + hv * dv
    width = c + hv * dv + 2 * hv  # the fused in-projection's output: q|k|v, z, b, a as column views
    proj = torch.randn(b, t, width, generator=g)
    x, _, beta_in, a = torch.split(proj, [c, hv * dv, hv, hv], dim=-1)
    conv = torch.randn(b, c, k, generator=g)
    rec = torch.randn(b, hv, dk, dv, generator=g) * 0.3
    weight = torch.randn(c, k, generator=g) * 0.5
    A_log, dt_bias = torch.randn(hv, generator=g), torch.randn(hv, generator=g)
    a = a * 8  # reach softplus' linear branch (> 20) now and then
    active = torch.rand(b, generator=g) > 0.4
    active[0] = True
    results = {}
    for name in ("torch", "triton"):
        gdn_step.BACKEND = name
        conv_in, rec_in = conv.clone(), rec.clone()
        conv_st = torch.zeros(b, t + 2, c, k) if verify else None
        rec_st = torch.zeros(b, t + 2, hv, dk, dv) if verify else None
        mixed = gdn_step.conv_update(x, conv_in, weight, None if verify else active, conv_st)
        out = gdn_step.gated_delta_update(mixed, a, beta_in, A_log, dt_bias, rec_in, None if verify else active,
                                          rec_st)
        results[name] = (mixed, out, conv_in, rec_in, conv_st, rec_st)
    gdn_step.BACKEND = None
    worst = 0.0
    for i, (want, got) in enumerate(zip(results["torch"], results["triton"])):
        if want is None:
            continue
        assert got.shape == want.shape and not got.isnan().any(), (i, got.shape)
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        assert err < 1e-5, (i, err)
    if not verify:  # inactive rows untouched
        idle = ~active
        got_conv, got_rec = results["triton"][2:4]
        assert torch.equal(got_conv[idle], conv[idle]) and torch.equal(got_rec[idle], rec[idle])
    else:
        assert torch.equal(results["triton"][2], conv) and torch.equal(results["triton"][3], rec)
    return worst


def main():
    worst = 0.0
    for args in [(3, 1, 2, 4, 16, 16, 4, False, 0), (2, 3, 2, 4, 16, 24, 4, True, 1),
                 (1, 1, 1, 1, 32, 8, 2, False, 2), (2, 2, 2, 6, 16, 12, 4, False, 3)]:
        err = case(*args)
        worst = max(worst, err)
        print(f"b,t,hk,hv,dk,dv,k,verify={args[:8]}: rel {err:.2e}")
    print(f"OK worst {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
