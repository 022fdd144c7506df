"""Gated DeltaNet forward for T >= 1 new tokens per row from a slot's cached conv + recurrent state.

Used for the plain decode step (T = 1) and for the speculative verify (T = k + 1). It returns the conv
and recurrent state after EACH of the T positions, so that after verification the state after the last
accepted token is selected, never recomputed (vLLM keeps one state per draft position in its own cache
slot; SGLang keeps the intermediate states and scatters the accepted one: the same idea).

Two paths with the same math, that of transformers' `causal_conv1d_update` and
`torch_recurrent_gated_delta_rule` (qk L2-normalised in fp32, queries scaled by head_k_dim^-1/2,
state in fp32):
- the reference path (CPU, or CUDA without flash-linear-attention): plain torch, one position at a time;
- CUDA with flash-linear-attention: its `fused_recurrent_gated_delta_rule` (use_qk_l2norm_in_kernel=True,
  the gating `g` / `beta` computed as transformers does) once per position, each call starting from the
  previous position's state, which it returns as its final state.

The layer's input projections come only through `projections.gdn_in_proj` (fused there by the `fused`
work); the output goes through the layer's own `norm(core, z)` and `out_proj`.

`gdn_chunk` is the prefill forward for chunks run from fixed buffers (CUDA graphs of prefill chunks,
runner/prefill_graphs.py): transformers' chunked path with padding positions that leave the state alone.

`install(model)` puts these paths in front of every GDN layer: a per-instance forward that takes them when
the cache view is a decode/verify/graph-prefill view (`view.gdn_step` is set) and transformers' own
forward otherwise (an eager prefill, or no cache at all).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .projections import gdn_in_proj

try:  # flash-linear-attention (the `gpu` extra)
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent
except Exception:  # noqa: BLE001 - any import failure means: use the reference path
    _fla_recurrent = None


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # as transformers' / FLA's l2norm


def conv_steps(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over T new columns, keeping the window after each.

    x [b, C, T] (new inputs), conv_state [b, C, K] (the last K inputs), weight [C, K].
    Returns out [b, C, T] and states [b, T, C, K] (the window after position t)."""
    b, c, t = x.shape
    k = conv_state.shape[-1]
    full = torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)  # [b, C, K + T]
    states = full.unfold(-1, k, 1)[:, :, 1:].permute(0, 2, 1, 3)  # window ending at each new column
    out = (states.to(weight.dtype) * weight[None, None]).sum(-1)  # [b, T, C]
    return F.silu(out).transpose(1, 2).to(x.dtype), states


def recurrent_steps(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T positions, keeping the state after each.

    q, k [b, T, Hk, Dk]; v [b, T, Hv, Dv]; g (log decay), beta [b, T, Hv]; state [b, Hv, Dk, Dv] fp32.
    Returns out [b, T, Hv, Dv] (q/v dtype) and states [b, T, Hv, Dk, Dv] fp32."""
    dtype = v.dtype
    b, t, hk, dk = k.shape
    hv = v.shape[2]
    if hk != hv:  # each key head serves hv // hk consecutive value heads
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    if _fla_recurrent is not None and q.is_cuda:
        outs, states = [], []
        for i in range(t):
            o, state = _fla_recurrent(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g=g[:, i:i + 1].float(),
                                      beta=beta[:, i:i + 1], initial_state=state, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
            outs.append(o)
            states.append(state)
        return torch.cat(outs, 1), torch.stack(states, 1)
    q = _l2norm(q.float()) * dk ** -0.5
    k = _l2norm(k.float())
    v, g, beta = v.float(), g.float(), beta.float()
    outs, states = [], []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        kv_mem = (state * k[:, i, :, :, None]).sum(dim=-2)  # [b, Hv, Dv]
        delta = (v[:, i] - kv_mem) * beta[:, i, :, None]
        state = state + k[:, i, :, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, i, :, :, None]).sum(dim=-2))
        states.append(state)
    return torch.stack(outs, 1).to(dtype), torch.stack(states, 1)


def gdn_multi_token(gdn, hidden: torch.Tensor, conv_state: torch.Tensor, recurrent_state: torch.Tensor):
    """One GDN layer over T new tokens per row. hidden [b, T, hidden_size]; conv_state [b, C, K];
    recurrent_state [b, Hv, Dk, Dv] fp32 (this rank's heads). Returns the layer output [b, T, hidden_size],
    conv states [b, T, C, K] and recurrent states [b, T, Hv, Dk, Dv] after each position."""
    b, t, _ = hidden.shape
    mixed_qkv, z, beta_in, a = gdn_in_proj(gdn, hidden)
    mixed, conv_states = conv_steps(mixed_qkv.transpose(1, 2), conv_state, gdn.conv1d.weight.squeeze(1))
    mixed = mixed.transpose(1, 2)
    query, key, value = torch.split(mixed, [gdn.key_dim, gdn.key_dim, gdn.value_dim], dim=-1)
    query = query.reshape(b, t, -1, gdn.head_k_dim)
    key = key.reshape(b, t, -1, gdn.head_k_dim)
    value = value.reshape(b, t, -1, gdn.head_v_dim)
    beta = beta_in.sigmoid()
    g = -gdn.A_log.float().exp() * F.softplus(a.float() + gdn.dt_bias)  # as transformers' forward
    core, rec_states = recurrent_steps(query, key, value, g, beta, recurrent_state)
    core = gdn.norm(core.reshape(-1, gdn.head_v_dim), z.reshape(-1, gdn.head_v_dim))
    return gdn.out_proj(core.reshape(b, t, -1)), conv_states, rec_states


def gdn_chunk(gdn, hidden: torch.Tensor, view) -> torch.Tensor:
    """One GDN layer over a prefill chunk of T positions in fixed buffers (runner/prefill_graphs.py; `view`
    a slot_state.PrefillView): transformers' prefill forward, op for op (the conv over [state | chunk],
    its chunked gated delta rule from the slot's state), except that positions past the real tokens
    (padding up to the graph's size) leave the state as it was: their beta and log-decay g are zero,
    so the rule's update is the identity there, and the conv state kept is the window after the last
    real token (view.conv_index), not after the padding. hidden [1, T, hidden_size]."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf  # its chunk rule: FLA's where installed

    conv_state, rec_state = view.gdn_state(gdn.layer_idx)
    b, t, _ = hidden.shape
    mixed_qkv, z, beta_in, a = gdn_in_proj(gdn, hidden)
    full = torch.cat([conv_state, mixed_qkv.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # [1, C, K + T]
    weight = gdn.conv1d.weight  # [C, 1, K]
    # the window ending at each new column: a valid conv over [state | chunk] (causal_conv1d_fn's values)
    conv = F.conv1d(full.to(weight.dtype), weight, gdn.conv1d.bias, groups=full.shape[1])[..., 1:]
    mixed = F.silu(conv).to(hidden.dtype).transpose(1, 2)
    query, key, value = torch.split(mixed, [gdn.key_dim, gdn.key_dim, gdn.value_dim], dim=-1)
    query = query.reshape(b, t, -1, gdn.head_k_dim)
    key = key.reshape(b, t, -1, gdn.head_k_dim)
    value = value.reshape(b, t, -1, gdn.head_v_dim)
    valid = view.valid.view(1, t, 1)
    beta = beta_in.sigmoid() * valid.to(beta_in.dtype)
    g = -gdn.A_log.float().exp() * F.softplus(a.float() + gdn.dt_bias) * valid
    core, final = hf.torch_chunk_gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=rec_state,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    view.gdn_update(gdn.layer_idx, full.index_select(-1, view.conv_index), final)
    core = gdn.norm(core.reshape(-1, gdn.head_v_dim), z.reshape(-1, gdn.head_v_dim))
    return gdn.out_proj(core.reshape(b, t, -1))


def _forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    step = getattr(cache_params, "gdn_step", None)
    if step is None:
        return self._dsqv_hf_forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
    if step == "prefill":
        return gdn_chunk(self, hidden_states, cache_params)
    conv, recurrent = cache_params.gdn_state(self.layer_idx)
    out, conv_states, rec_states = gdn_multi_token(self, hidden_states, conv, recurrent)
    cache_params.gdn_update(self.layer_idx, conv_states, rec_states)
    return out


def install(model) -> None:
    """Route every GDN layer's decode/verify through gdn_multi_token (idempotent)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    for module in model.modules():
        if isinstance(module, Qwen3_5GatedDeltaNet) and not hasattr(module, "_dsqv_hf_forward"):
            module._dsqv_hf_forward = module.forward
            module.forward = types.MethodType(_forward, module)
