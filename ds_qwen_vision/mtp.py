"""The checkpoint's multi-token-prediction head (`mtp.*` in Qwen3.6's safetensors), as a module.

transformers has no module for it and drops its keys; the names and shapes here are the checkpoint's:
`mtp.fc.weight` [hidden, 2*hidden], `mtp.pre_fc_norm_embedding.weight`, `mtp.pre_fc_norm_hidden.weight`,
`mtp.norm.weight` and `mtp.layers.N.*` -- a gated full-attention decoder layer with its MLP, transformers'
own `Qwen3_5DecoderLayer` class, so the shard table's rules and DeepSpeed's AutoTP treat it like the
main layers. It shares `embed_tokens` and `lm_head` with the main model (`mtp_use_dedicated_embeddings:
false`), so it holds neither.

A draft, as vLLM's `qwen3_5_mtp.py` computes it:
    norm(layer(fc(cat[pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)]))) -> lm_head
where h_i is the main model's last hidden state at position i AFTER its final norm (what vLLM's
Qwen3_5Model.forward returns and its proposer hands to the drafter), paired with the token at i + 1, at
rotary/KV position i. Further drafts feed the head's own output (after `mtp.norm`, as vLLM's
Qwen3_5MultiTokenPredictor.forward returns it) with the token it drafted, one position on.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Qwen3_5MTP(nn.Module):
    def __init__(self, text_config):
        super().__init__()
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

        n = getattr(text_config, "mtp_num_hidden_layers", 1) or 1
        self.first_layer_idx = text_config.num_hidden_layers  # its KV lives beside the main layers' (slot state)
        config = copy.deepcopy(text_config)
        config.layer_types = list(config.layer_types) + ["full_attention"] * n
        self.config = config
        h, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(h, eps=eps)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(config, self.first_layer_idx + i) for i in range(n))
        self.norm = Qwen3_5RMSNorm(h, eps=eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, position_embeddings, attention_mask,
                position_ids, past_key_values, step: int = 0) -> torch.Tensor:
        """embeds [b, t, hidden] (of the tokens at i + 1), hidden [b, t, hidden] (h_i); returns the head's
        normed output [b, t, hidden] (lm_head gives the draft logits; it is also the next draft's h)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        x = self.layers[step % len(self.layers)](x, position_embeddings=position_embeddings,
                                                 attention_mask=attention_mask, position_ids=position_ids,
                                                 past_key_values=past_key_values)
        return self.norm(x)
