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


def draft_vocabulary(tokenizer, n: int, vocab_size: int) -> list[int]:
    """The token ids the MTP head may draft with `speculative.draft_vocab` n: the n lowest ids of the
    tokenizer's base vocabulary and every added token (end of turn, thinking and tool-call markers), within
    the model's `vocab_size`. Why the lowest: a byte-level BPE (Qwen's) numbers its tokens in merge order,
    and merges are learned most frequent pair first, so low ids are the corpus's common tokens -- a proxy
    for the measured frequencies that FR-Spec's token maps (SGLang's --speculative-token-map) are made from."""
    base = min(n, tokenizer.vocab_size)
    added = {i for i in tokenizer.added_tokens_decoder if base <= i < vocab_size}
    return list(range(min(base, vocab_size))) + sorted(added)


class DraftHead(nn.Module):
    """The MTP head's drafts over part of the vocabulary (FR-Spec; `speculative.draft_vocab`): lm_head's rows
    of `ids` only. A draft of the 27B reads 248,320 x 5,120 bf16 of lm_head (2.5 GB at tp=1), three times a
    step at k=3; with 32k ids it reads an eighth. Only drafts change: the verify runs the whole lm_head,
    so the output is exactly the whole vocabulary's (greedy, and sampled too: the drafter stays
    deterministic); a target token outside `ids` is never drafted, which only costs acceptance.

    Under tensor parallelism lm_head is DeepSpeed's LmHeadLinearAllreduce (tp_policy: each rank holds a
    slice of the hidden columns, the logits are all-reduced): the rows here are this rank's slice of those
    rows, and the partial logits go through the same all-reduce (`inference_all_reduce`, which the peer
    all-reduce replaces where it is installed). Returns the drafted token ids, [b, t]."""

    def __init__(self, lm_head: nn.Module, ids: list[int]):
        super().__init__()
        weight = lm_head.weight
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.weight = nn.Parameter(weight.detach()[self.ids], requires_grad=False)  # indexing copies
        sizes = getattr(lm_head, "_partition_sizes", None)
        self.group = getattr(lm_head, "mp_group", None) if sizes is not None and len(sizes) > 1 else None
        start = sum(sizes[:lm_head.tp_index]) if self.group is not None else 0
        self.cols = (start, start + weight.shape[1])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(hidden[..., self.cols[0]:self.cols[1]], self.weight.t())
        if self.group is not None:
            from deepspeed import comm as dist

            dist.inference_all_reduce(logits, group=self.group)
        return self.ids[logits.argmax(-1)]


def attach_draft_head(model, tokenizer, n: int, device) -> str | None:
    """`model.mtp.draft_head`: a DraftHead over draft_vocabulary(tokenizer, n); None, or why not (a config
    error). Every rank reads the same tokenizer; the head's all-reduce is as wide as the vocabulary, so the
    ranks check that theirs agree before any step uses it."""
    import os

    from .model import agree, log, ranks_min

    if n >= tokenizer.vocab_size:
        return (f"speculative.draft_vocab ({n:,}) is not below the tokenizer's vocabulary ({tokenizer.vocab_size:,}): "
                f"it would draft over all of it from a copy of lm_head; set 0 (the whole vocabulary) or fewer")
    vocab = model.config.text_config.vocab_size
    ids = draft_vocabulary(tokenizer, n, vocab)
    if not agree(ranks_min(len(ids), device) == len(ids), device):
        return f"the ranks' draft vocabularies differ ({len(ids):,} ids on this rank): check every rank's tokenizer files"
    model.mtp.draft_head = DraftHead(model.lm_head, ids)
    log(f"[rank {os.environ.get('RANK', '0')}] MTP drafts over {len(ids):,} of {vocab:,} token ids (speculative.draft_vocab {n:,}; "
        f"{model.mtp.draft_head.weight.nbytes / (1 << 20):.0f} MiB of lm_head rows a rank)")
    return None
