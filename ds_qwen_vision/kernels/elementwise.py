"""The decode step's elementwise chains as pure functions: each is its own CPU reference path, and on
CUDA the same function compiled (torch.compile / inductor: one Triton kernel per chain instead of one
kernel per op). Pure functions of tensors compile once per shape rank and are safe inside CUDA graphs;
compiling whole decoder layers was tried and broke the cache writes (docs/benchmarks.md).

The arithmetic follows transformers' Qwen3.5 modules op for op (float32 statistics, the zero-centred
RMSNorm weight applied as (1 + w) in float32, the cast back at the same place); tests/test_fused.py
checks each against those modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Qwen3_5MLP's act_fn(gate_proj(x)) * up_proj(x), act_fn = SiLU."""
    return F.silu(gate) * up


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Qwen3_5Attention's output gate: attn_output * sigmoid(gate)."""
    return x * torch.sigmoid(gate)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3_5RMSNorm (zero-centred weight)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor x [b, heads, t, d]; cos/sin [b, t, rotary_dim]
    (partial rotary: the dims past rotary_dim pass through)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    rotated = torch.cat((-x_rot[..., rd // 2:], x_rot[..., :rd // 2]), dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 q_eps: float, k_eps: float, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3_5Attention's q_norm / k_norm (per head, over head_dim) and rotary embedding:
    q, k [b, t, heads, head_dim] -> [b, heads, t, head_dim] each."""
    q = rms_norm(q, q_weight, q_eps).transpose(1, 2)
    k = rms_norm(k, k_weight, k_eps).transpose(1, 2)
    return rope(q, cos, sin), rope(k, cos, sin)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden = residual + x, then Qwen3_5RMSNorm(hidden): returns (hidden, normed hidden)."""
    hidden = residual + x
    h = hidden.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    return hidden, out.type_as(hidden)


_COMPILED: dict = {}


def compiled(fn, on_cuda: bool):
    """fn compiled once (dynamic shapes) for CUDA tensors; fn itself elsewhere."""
    if not on_cuda:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]
