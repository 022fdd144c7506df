"""Gated DeltaNet forwards for the runner's steps: T >= 1 new tokens per row from a slot's cached state.

`gdn_multi_token` is the plain decode step (T = 1) and the speculative verify (T = k + 1): the layer's
input projection (one GEMM, `projections.gdn_in_proj`), then the conv update and the gated delta rule of
kernels/gdn_step.py, which read the slot's state and write it back in place (decode) or keep the state
after each of the T positions in the step buffers (verify: after verification the state after the last
accepted token is selected, never recomputed -- vLLM keeps one state per draft position in its own cache
slot; SGLang keeps the intermediate states and scatters the accepted one: the same idea), then the
layer's own `norm(core, z)` and `out_proj`.

`gdn_chunk` is the prefill forward for chunks run from fixed buffers (CUDA graphs of prefill chunks,
runner/prefill_graphs.py): transformers' chunked path with padding positions that leave the state alone.
`gdn_mixed` is a forward whose sequence is such a chunk followed by one token per decode row: one input
and one output projection, the chunk's rule and the decode rows' step kernels in between.

`install(model)` puts these paths in front of every GDN layer: a per-instance forward that takes them when
the cache view is a decode/verify/graph-prefill/mixed view (`view.gdn_step` is set) and transformers' own
forward otherwise (an eager prefill, or no cache at all). That forward's causal conv is transformers'
PyTorch fallback unless the `causal_conv1d` package is installed: on one H100 its depthwise conv kernel took
23 ms of an 8k-token prefill of 32 layers (docs/benchmarks.md, 2026-12-08). On CUDA with
flash-linear-attention `install` swaps in FLA's Triton causal conv (`fla_conv1d`) where a probe at start-up
finds it matching the fallback on every rank (`fla_conv_problem`, agreed).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .gdn_step import conv_update, gated_delta_update
from .projections import gdn_in_proj


def gdn_multi_token(gdn, hidden: torch.Tensor, conv_state: torch.Tensor, recurrent_state: torch.Tensor,
                    active: torch.Tensor | None = None, conv_steps: torch.Tensor | None = None,
                    rec_steps: torch.Tensor | None = None) -> torch.Tensor:
    """One GDN layer over T new tokens per row. hidden [b, T, hidden_size]; conv_state [b, C, K];
    recurrent_state [b, Hv, Dk, Dv] fp32 (this rank's heads). Decode (no step buffers): the state after
    the last position replaces the given states in the rows where `active` (all: None). Verify: the
    states after each position go to conv_steps [b, >= T, C, K] / rec_steps [b, >= T, Hv, Dk, Dv] and the
    given states are left alone. Returns the layer output [b, T, hidden_size]."""
    b, t, _ = hidden.shape
    mixed_qkv, z, beta_in, a = gdn_in_proj(gdn, hidden)
    mixed = conv_update(mixed_qkv, conv_state, gdn.conv1d.weight.squeeze(1), active, conv_steps)
    core = gated_delta_update(mixed, a, beta_in, gdn.A_log, gdn.dt_bias, recurrent_state, active, rec_steps)
    core = gdn.norm(core.reshape(-1, gdn.head_v_dim), z.reshape(-1, gdn.head_v_dim))
    return gdn.out_proj(core.reshape(b, t, -1))


def gdn_chunk(gdn, hidden: torch.Tensor, view) -> torch.Tensor:
    """One GDN layer over a prefill chunk of T positions in fixed buffers (runner/prefill_graphs.py; `view`
    a slot_state.PrefillView): transformers' prefill forward, op for op (the conv over [state | chunk],
    its chunked gated delta rule from the slot's state), except that positions past the real tokens
    (padding up to the graph's size) leave the state as it was: their beta and log-decay g are zero,
    so the rule's update is the identity there, and the conv state kept is the window after the last
    real token (view.conv_index), not after the padding. hidden [1, T, hidden_size]."""
    b, t, _ = hidden.shape
    mixed_qkv, z, beta_in, a = gdn_in_proj(gdn, hidden)
    core = _chunk_rule(gdn, mixed_qkv, beta_in, a, view)
    core = gdn.norm(core.reshape(-1, gdn.head_v_dim), z.reshape(-1, gdn.head_v_dim))
    return gdn.out_proj(core.reshape(b, t, -1))


def gdn_mixed(gdn, hidden: torch.Tensor, view) -> torch.Tensor:
    """One GDN layer over [a prefill chunk (view.t positions) | one token per decode row] in one sequence
    (`view` a slot_state.MixedView): one input projection and one output projection for both, the chunk's
    rule as gdn_chunk's, the decode rows' as gdn_multi_token's. hidden [1, t + rows, hidden_size]."""
    t = view.t
    mixed_qkv, z, beta_in, a = gdn_in_proj(gdn, hidden)
    chunk = _chunk_rule(gdn, mixed_qkv[:, :t], beta_in[:, :t], a[:, :t], view.chunk)

    def rows(x):  # the decode tokens as rows of one token each: [rows, 1, ...]
        return x[0, t:].unsqueeze(1).contiguous()

    conv_state, rec_state, active, _, _ = view.decode.gdn_step_state(gdn.layer_idx)
    mixed = conv_update(rows(mixed_qkv), conv_state, gdn.conv1d.weight.squeeze(1), active)
    decode = gated_delta_update(mixed, rows(a), rows(beta_in), gdn.A_log, gdn.dt_bias, rec_state, active)
    core = torch.cat([chunk.reshape(-1, gdn.head_v_dim), decode.reshape(-1, gdn.head_v_dim)])
    core = gdn.norm(core, z.reshape(-1, gdn.head_v_dim))
    return gdn.out_proj(core.reshape(1, hidden.shape[1], -1))


def _chunk_rule(gdn, mixed_qkv: torch.Tensor, beta_in: torch.Tensor, a: torch.Tensor, view) -> torch.Tensor:
    """The conv and chunked delta rule of a prefill chunk from its input projections ([1, T, ...]); updates
    the slot's state (gdn_chunk says how padding leaves it alone). Returns the rule's output [1, T, Hv, Dv]."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf  # its chunk rule

    conv_state, rec_state = view.gdn_state(gdn.layer_idx)
    b, t, _ = mixed_qkv.shape
    full = torch.cat([conv_state, mixed_qkv.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # [1, C, K + T]
    weight = gdn.conv1d.weight  # [C, 1, K]
    # the window ending at each new column: a valid conv over [state | chunk] (causal_conv1d_fn's values)
    conv = F.conv1d(full.to(weight.dtype), weight, gdn.conv1d.bias, groups=full.shape[1])[..., 1:]
    mixed = F.silu(conv).to(mixed_qkv.dtype).transpose(1, 2)
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
    return core


def _forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    step = getattr(cache_params, "gdn_step", None)
    if step is None:
        return self._dsqv_hf_forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
    if step == "prefill":
        return gdn_chunk(self, hidden_states, cache_params)
    if step == "mixed":
        return gdn_mixed(self, hidden_states, cache_params)
    return gdn_multi_token(self, hidden_states, *cache_params.gdn_step_state(self.layer_idx))


def fla_conv1d(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None, **kwargs) -> torch.Tensor:
    """transformers' `causal_conv1d_fn` (x [B, C, T] -> [B, C, T]: zeros on the left, the activation after)
    through FLA's Triton kernel, which reads [B, T, C]: the GDN forward hands it a transposed view of exactly
    that for a first chunk (nothing copied), [conv state | chunk] for a continuing one."""
    from fla.modules.causal_conv1d import causal_conv1d

    out, _ = causal_conv1d(hidden_states.transpose(1, 2), weight=weight, bias=bias, activation=activation)
    return out.transpose(1, 2)


@torch.no_grad()
def fla_conv_problem(device: torch.device) -> str | None:
    """None where FLA's causal conv matches transformers' fallback on this device (a first chunk's layout and
    a continuing one's, bf16); else why not."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    if device.type != "cuda":
        return "not a CUDA device"
    if hf.causal_conv1d_fn is fla_conv1d:
        return None
    try:
        g = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(96, 4, device=device, generator=g, dtype=torch.bfloat16)
        for x in (torch.randn(1, 300, 96, device=device, generator=g, dtype=torch.bfloat16).transpose(1, 2),
                  torch.randn(1, 96, 304, device=device, generator=g, dtype=torch.bfloat16)):
            want, got = hf.causal_conv1d_fn(x, weight, None, activation="silu"), fla_conv1d(x, weight, None, "silu")
            err = float((got.float() - want.float()).norm() / want.float().norm())
            if got.shape != want.shape or not err < 2e-2:
                return f"FLA's causal conv differs from transformers' ({tuple(got.shape)}, relative error {err:.3g})"
    except Exception as e:  # noqa: BLE001 -- FLA missing or failing here: the fallback serves
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


def install(model) -> None:
    """Route every GDN layer's decode/verify through gdn_multi_token (idempotent); on CUDA, FLA's causal conv
    for the eager prefill where it passes its probe."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    from ..model import agree, log

    device = next(model.parameters()).device
    if device.type == "cuda":  # every rank alike (each runs its own heads' conv: no collective, one arithmetic)
        why = fla_conv_problem(device)
        if agree(why is None, device):
            hf.causal_conv1d_fn = fla_conv1d
        else:
            log(f"GDN prefill: transformers' PyTorch causal conv ({why or 'FLA failed on another rank'})")
    for module in model.modules():
        if isinstance(module, hf.Qwen3_5GatedDeltaNet) and not hasattr(module, "_dsqv_hf_forward"):
            module._dsqv_hf_forward = module.forward
            module.forward = types.MethodType(_forward, module)
