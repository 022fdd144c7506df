"""Fused forwards for transformers' Qwen3.5 decoder layer, full attention and MLP, installed on the
instances (install_fused_forwards); classes, module names and weights stay transformers'.

What each saves in a decode step (27B: 64 layers, 16 of them full attention):
* Qwen3_5MLP: one GEMM for gate_proj | up_proj (tp_policy.fuse_projections) and SiLU·mul in one kernel.
* Qwen3_5Attention: one GEMM for q_proj | k_proj | v_proj, q/k RMSNorm + rotary in one kernel, the output
  gate x·sigmoid(g) in one kernel (decode attention itself: kernels/decode_attention.py).
* Qwen3_5DecoderLayer: the residual add and the post-attention RMSNorm in one kernel.
The Gated DeltaNet mixer is not touched here (its decode forward lives in kernels/gdn.py and asks
kernels.projections.gdn_in_proj for its fused input projection).

They serve every step. In decode and speculative verify every GEMM is a weight read and every kernel launch
counts. In prefill the compiled chains replace transformers' eager float32 elementwise passes over the whole
chunk: a chunk replayed as a graph pays none of their host time, and an eager chunk runs them eagerly below
model_runner.COMPILED_PREFILL_TOKENS (where the host bounds it: dynamo's guards cost more than they save) and
compiled from there (where the GPU does). Until 2026-12-08 chunks of more than 8 tokens ran transformers'
forwards: the compiled norms alone took an 8k-token prefill of 32 layers from 551.9 to 473.0 ms on one H100.

Each forward is transformers' own, op for op, with the fused pieces swapped in; `compiled=False` runs
the elementwise chains eagerly (the CPU reference path that tests/test_fused.py checks against
transformers' modules in float32).
"""
from __future__ import annotations

import types

import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

from ..tp_policy import decoder_layers
from .elementwise import add_rms_norm, compiled, qk_norm_rope, sigmoid_gate, silu_mul
from .projections import fused_projection


def mlp_forward(self, x):
    gate, up = fused_projection(self, x, ("gate_proj", "up_proj"))
    return self.down_proj(self._dsqv_silu_mul(gate, up))


def attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = fused_projection(self, hidden_states, ("q_proj", "k_proj", "v_proj"))
    query_states, gate = torch.chunk(q.view(*input_shape, -1, self.head_dim * 2), 2, dim=-1)
    gate = gate.reshape(*input_shape, -1)
    cos, sin = position_embeddings
    query_states, key_states = self._dsqv_qk_norm_rope(query_states, k.view(hidden_shape), self.q_norm.weight,
                                                       self.k_norm.weight, self.q_norm.eps, self.k_norm.eps, cos, sin)
    value_states = v.view(hidden_shape).transpose(1, 2)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    attn_output, attn_weights = interface(self, query_states, key_states, value_states, attention_mask,
                                          dropout=0.0 if not self.training else self.attention_dropout,
                                          scaling=self.scaling, **kwargs)
    attn_output = self._dsqv_sigmoid_gate(attn_output.reshape(*input_shape, -1), gate)
    return self.o_proj(attn_output), attn_weights


def decoder_layer_forward(self, hidden_states, position_embeddings, attention_mask=None, position_ids=None,
                          past_key_values=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    if self.block_type == "linear_attention":
        hidden_states = self.linear_attn(hidden_states=hidden_states, cache_params=past_key_values,
                                         attention_mask=attention_mask, **kwargs)
    else:
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_ids=position_ids, past_key_values=past_key_values,
                                          position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    residual, hidden_states = self._dsqv_add_rms_norm(residual, hidden_states, norm.weight, norm.eps)
    return residual + self.mlp(hidden_states)


def install_fused_forwards(model, compiled_chains: bool | None = None) -> None:
    """Swap the fused forwards in on every language-model decoder layer, its attention and its MLP.
    compiled_chains: compile the elementwise chains (default: when the model is on CUDA)."""
    if compiled_chains is None:
        compiled_chains = next(model.model.language_model.parameters()).is_cuda
    for layer in decoder_layers(model):  # the MTP head's layer too (speculative drafts are decode steps)
        _install(layer, decoder_layer_forward, _dsqv_add_rms_norm=compiled(add_rms_norm, compiled_chains))
        _install(layer.mlp, mlp_forward, _dsqv_silu_mul=compiled(silu_mul, compiled_chains))
        if hasattr(layer, "self_attn"):
            _install(layer.self_attn, attention_forward, _dsqv_sigmoid_gate=compiled(sigmoid_gate, compiled_chains),
                     _dsqv_qk_norm_rope=compiled(qk_norm_rope, compiled_chains))


def _install(module, forward, **chains) -> None:
    for name, fn in chains.items():
        setattr(module, name, fn)
    module.forward = types.MethodType(forward, module)
