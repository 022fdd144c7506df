"""A Gated DeltaNet layer's decode / verify step over T >= 1 new tokens per row, read from and written into
the slot state: the depthwise causal conv update and the gated delta rule (gating included).

Why kernels of our own: in a decode step each GDN layer ran ~20 small kernels around the recurrence (the
conv window's cat / unfold / mul / sum / SiLU, the gating's exp / softplus / sigmoid chain, GQA's
repeat_interleave of q and k, flash-linear-attention's recurrence, a stack of its states, masked
`torch.where` write-backs): ~900 launches per 27B step, and at 16 rows the state copies moved ~200 MB per
layer beyond the recurrence's own read and write (docs/benchmarks.md). Here each is one Triton kernel that
reads the slot's state once and writes it once, in place, with the gating and the q/k L2 norm inside
(vLLM's and SGLang's decode kernels for this model do the same: fused sigmoid gating + recurrence with
in-place state, causal_conv1d_update). flash-linear-attention's `fused_recurrent_gated_delta_rule` has no
in-place, row-masked state and no gating, so it stays only as the `fla` backend, for comparison.

Where the states go (every backend):
* decode (`steps` None): the state after the last position replaces the slot's state in the rows where
  `active` is true (all rows when `active` is None); the other rows keep theirs.
* verify (`steps` given, [b, >= T, ...]): the state after each position t goes to steps[:, t] and the
  slot's state is left alone (runner/slot_state.py selects the accepted one later).

Backends: `triton` (CUDA; it also runs under TRITON_INTERPRET=1 on CPU, which the tests use), `torch` (the
reference: transformers' math one position at a time -- causal_conv1d_update, torch_recurrent_gated_delta_rule
with qk L2-normalised in fp32, queries scaled by head_k_dim^-1/2, state in fp32), `fla`. BACKEND picks one
(None: triton on CUDA where Triton imports, torch otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5.modeling_qwen3_5 import l2norm  # the reference's own (FLA's formula)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference path serves
    triton = None

try:  # flash-linear-attention (the `gpu` extra)
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent
except Exception:  # noqa: BLE001 - any import failure means: no fla backend
    _fla_recurrent = None

BACKEND: str | None = None


def backend_for(x: torch.Tensor) -> str:
    if BACKEND is not None:
        return BACKEND
    return "triton" if triton is not None and x.is_cuda else "torch"


def conv_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, active=None, steps=None):
    """Depthwise causal conv + SiLU over T new columns. x [b, T, C] (the in-projection's q|k|v columns,
    any strides), conv_state [b, C, K] (the last K inputs), weight [C, K]; steps [b, >= T, C, K].
    Returns [b, T, C] in x's dtype."""
    k = conv_state.shape[-1]
    if backend_for(x) == "triton" and k & (k - 1) == 0:
        return _conv_triton(x, conv_state, weight, active, steps)
    out, states = conv_steps(x.transpose(1, 2), conv_state, weight)
    _keep(conv_state, states, active, steps)
    return out.transpose(1, 2)


def gated_delta_update(mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
                       dt_bias: torch.Tensor, state: torch.Tensor, active=None, steps=None):
    """The gated delta rule over T positions. mixed [b, T, 2*Hk*Dk + Hv*Dv] (the conv's output, q | k | v),
    a, b [b, T, Hv] (the in-projection's), A_log, dt_bias [Hv], state [b, Hv, Dk, Dv] fp32 (this rank's
    heads); steps [b, >= T, Hv, Dk, Dv]. Returns the output [b, T, Hv, Dv] in mixed's dtype."""
    name = backend_for(mixed)
    dk = state.shape[2]
    if name == "triton" and dk & (dk - 1) == 0:  # the kernel holds a whole key row: a power of two
        return _rule_triton(mixed, a, b, A_log, dt_bias, state, active, steps)
    bsz, t, _ = mixed.shape
    hv, dk, dv = state.shape[1:]
    key_dim = (mixed.shape[-1] - hv * dv) // 2
    q, k, v = torch.split(mixed, [key_dim, key_dim, hv * dv], dim=-1)
    q, k, v = q.reshape(bsz, t, -1, dk), k.reshape(bsz, t, -1, dk), v.reshape(bsz, t, hv, dv)
    beta = b.sigmoid()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)  # as transformers' forward
    out, states = (_fla_steps if name == "fla" else recurrent_steps)(q, k, v, g, beta, state)
    _keep(state, states, active, steps)
    return out


def _keep(state, states, active, steps) -> None:
    """Where the states after each position ([b, T, ...]) go: see the module docstring."""
    if steps is not None:
        steps[:, :states.shape[1]] = states
    elif active is None:
        state.copy_(states[:, -1])
    else:
        torch.where(active.view(-1, *[1] * (state.dim() - 1)), states[:, -1].to(state.dtype), state, out=state)


# ---- the reference (torch) path ------------------------------------------------------------------------

def conv_steps(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, C, T] (new inputs), conv_state [b, C, K], weight [C, K].
    Returns out [b, C, T] and states [b, T, C, K] (the window after position t)."""
    k = conv_state.shape[-1]
    full = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)  # [b, C, K + T]
    states = full.unfold(-1, k, 1)[:, :, 1:].permute(0, 2, 1, 3)  # window ending at each new column
    out = (states.to(weight.dtype) * weight[None, None]).sum(-1)  # [b, T, C]
    return F.silu(out).transpose(1, 2).to(x.dtype), states


def recurrent_steps(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [b, T, Hk, Dk]; v [b, T, Hv, Dv]; g (log decay), beta [b, T, Hv]; state [b, Hv, Dk, Dv] fp32.
    Returns out [b, T, Hv, Dv] (v's dtype) and states [b, T, Hv, Dk, Dv] fp32."""
    dtype = v.dtype
    dk = k.shape[-1]
    q, k = _gqa(q, v), _gqa(k, v)
    q = l2norm(q.float()) * dk ** -0.5
    k = l2norm(k.float())
    v, g, beta = v.float(), g.float(), beta.float()
    outs, states = [], []
    for i in range(k.shape[1]):
        state = state * g[:, i].exp()[..., None, None]
        kv_mem = (state * k[:, i, :, :, None]).sum(dim=-2)  # [b, Hv, Dv]
        delta = (v[:, i] - kv_mem) * beta[:, i, :, None]
        state = state + k[:, i, :, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, i, :, :, None]).sum(dim=-2))
        states.append(state)
    return torch.stack(outs, 1).to(dtype), torch.stack(states, 1)


def _gqa(x, v):
    """Each key head serves Hv // Hk consecutive value heads."""
    return x.repeat_interleave(v.shape[2] // x.shape[2], dim=2) if x.shape[2] != v.shape[2] else x


def _fla_steps(q, k, v, g, beta, state):
    """flash-linear-attention's recurrence once per position, each call from the previous one's state."""
    q, k = _gqa(q, v), _gqa(k, v)
    outs, states = [], []
    for i in range(k.shape[1]):
        o, state = _fla_recurrent(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g=g[:, i:i + 1].float(),
                                  beta=beta[:, i:i + 1], initial_state=state, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
        outs.append(o)
        states.append(state)
    return torch.cat(outs, 1), torch.stack(states, 1)


# ---- the Triton kernels ----------------------------------------------------------------------------------

CONV_BLOCK = 256  # channels per program
RULE_BLOCK_V = 8  # value columns per program, one warp each (flash-linear-attention's choice for this rule)


def _flags(active, steps, like):
    """(active as bytes or a dummy pointer, steps or a dummy pointer, HAS_ACTIVE, STEPS)."""
    act = (active if active.dtype == torch.bool else active != 0).view(torch.uint8) if active is not None else like
    return act, (steps if steps is not None else like), active is not None, steps is not None


def _conv_triton(x, conv_state, weight, active, steps):
    b, t, c = x.shape
    k = conv_state.shape[-1]
    out = torch.empty((b, t, c), dtype=x.dtype, device=x.device)
    act, st, has_active, has_steps = _flags(active, steps, conv_state)
    assert conv_state.stride(2) == 1 and conv_state.stride(1) == k and weight.is_contiguous()
    assert x.stride(2) == 1 and (steps is None or steps.stride()[2:] == (k, 1))
    _conv_kernel[(triton.cdiv(c, CONV_BLOCK), b)](
        x, conv_state, weight, act, st, out, c, x.stride(0), x.stride(1), conv_state.stride(0),
        st.stride(0), st.stride(1) if has_steps else 0,
        T=t, K=k, BLOCK=CONV_BLOCK, HAS_ACTIVE=has_active, STEPS=has_steps)
    return out


def _rule_triton(mixed, a, b, A_log, dt_bias, state, active, steps):
    bsz, t, _ = mixed.shape
    hv, dk, dv = state.shape[1:]
    key_dim = (mixed.shape[-1] - hv * dv) // 2
    hk = key_dim // dk
    out = torch.empty((bsz, t, hv, dv), dtype=mixed.dtype, device=mixed.device)
    act, st, has_active, has_steps = _flags(active, steps, state)
    assert mixed.stride(2) == 1 and a.stride(2) == 1 and b.stride(2) == 1
    assert state.stride()[1:] == (dk * dv, dv, 1) and (steps is None or steps.stride()[2:] == (dk * dv, dv, 1))
    _rule_kernel[(triton.cdiv(dv, RULE_BLOCK_V), bsz * hv)](
        mixed, a, b, A_log, dt_bias, state, act, st, out, dk ** -0.5,
        mixed.stride(0), mixed.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), state.stride(0),
        st.stride(0), st.stride(1) if has_steps else 0,
        T=t, HV=hv, GROUP=hv // hk, DK=dk, DV=dv, KEY_DIM=key_dim, BLOCK_V=RULE_BLOCK_V,
        HAS_ACTIVE=has_active, STEPS=has_steps, num_warps=1)
    return out


if triton is not None:
    @triton.jit
    def _conv_kernel(x_ptr, state_ptr, w_ptr, act_ptr, steps_ptr, out_ptr, C, sxb, sxt, ssb, stb, stt,
                     T: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, HAS_ACTIVE: tl.constexpr,
                     STEPS: tl.constexpr):
        row = tl.program_id(1)
        rc = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rj = tl.arange(0, K)
        cm = rc < C
        w = tl.load(w_ptr + rc[:, None] * K + rj[None, :], mask=cm[:, None], other=0.0).to(tl.float32)
        s_ptrs = state_ptr + row * ssb + rc[:, None] * K
        window = tl.zeros((BLOCK, K), tl.float32)
        for t in tl.static_range(T):
            # the window after new column t: columns t+1 .. t+K of [state (K) | x (T)]
            src = t + 1 + rj
            from_state = (src < K)[None, :] & cm[:, None]
            from_x = (src >= K)[None, :] & cm[:, None]
            old = tl.load(s_ptrs + tl.where(src < K, src, 0)[None, :], mask=from_state, other=0.0)
            new = tl.load(x_ptr + row * sxb + tl.where(src >= K, src - K, 0)[None, :] * sxt + rc[:, None],
                          mask=from_x, other=0.0)
            window = tl.where(from_state, old.to(tl.float32), new.to(state_ptr.dtype.element_ty).to(tl.float32))
            y = tl.sum(window * w, 1)
            y = y / (1.0 + tl.exp(-y))  # SiLU
            tl.store(out_ptr + (row * T + t) * C + rc, y.to(out_ptr.dtype.element_ty), mask=cm)
            if STEPS:
                tl.store(steps_ptr + row * stb + t * stt + rc[:, None] * K + rj[None, :],
                         window.to(steps_ptr.dtype.element_ty), mask=cm[:, None])
        if not STEPS:
            keep = cm[:, None] & (rj < K)[None, :]
            if HAS_ACTIVE:  # the row's flag as a vector: the interpreter does not broadcast a scalar mask
                keep = keep & (tl.load(act_ptr + row + 0 * rj) != 0)[None, :]
            tl.store(s_ptrs + rj[None, :], window.to(state_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _rule_kernel(x_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, state_ptr, act_ptr, steps_ptr, out_ptr, scale,
                     sxb, sxt, sab, sat, sbb, sbt, ssb, stb, stt,
                     T: tl.constexpr, HV: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     KEY_DIM: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ACTIVE: tl.constexpr, STEPS: tl.constexpr):
        rh = tl.program_id(1)
        row = rh // HV
        h = rh % HV
        kh = h // GROUP  # each key head serves GROUP consecutive value heads
        rk = tl.arange(0, DK)
        rv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        vm = rv < DV
        s_off = row * ssb + h * DK * DV + rk[:, None] * DV + rv[None, :]
        s = tl.load(state_ptr + s_off, mask=vm[None, :], other=0.0).to(tl.float32)  # bf16 state: float32 here
        decay = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
        dt_bias = tl.load(dtb_ptr + h).to(tl.float32)
        for t in tl.static_range(T):
            xt = x_ptr + row * sxb + t * sxt
            q = tl.load(xt + kh * DK + rk).to(tl.float32)
            k = tl.load(xt + KEY_DIM + kh * DK + rk).to(tl.float32)
            v = tl.load(xt + 2 * KEY_DIM + h * DV + rv, mask=vm, other=0.0).to(tl.float32)
            q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
            k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
            a = tl.load(a_ptr + row * sab + t * sat + h).to(tl.float32) + dt_bias
            g = decay * tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # softplus, torch's threshold
            beta = 1.0 / (1.0 + tl.exp(-tl.load(b_ptr + row * sbb + t * sbt + h).to(tl.float32)))
            s = s * tl.exp(g)
            delta = (v - tl.sum(s * k[:, None], 0)) * beta
            s = s + k[:, None] * delta[None, :]
            o = tl.sum(s * q[:, None], 0)
            tl.store(out_ptr + ((row * T + t) * HV + h) * DV + rv, o.to(out_ptr.dtype.element_ty), mask=vm)
            if STEPS:
                tl.store(steps_ptr + row * stb + t * stt + h * DK * DV + rk[:, None] * DV + rv[None, :],
                         s.to(steps_ptr.dtype.element_ty), mask=vm[None, :])
        if not STEPS:
            keep = (rk < DK)[:, None] & vm[None, :]
            if HAS_ACTIVE:
                keep = keep & (tl.load(act_ptr + row + 0 * rv) != 0)[None, :]
            tl.store(state_ptr + s_off, s.to(state_ptr.dtype.element_ty), mask=keep)
