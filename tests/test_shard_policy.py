"""The shard table covers every language-model weight exactly once and no vision weight."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ds_qwen_vision.tp_policy import (SHARD_TABLE, Shard, gdn_segments, is_language_model, rules_for,
                                      shard_ranges, shard_tensor)


def checkpoint_shapes(ckpt: str) -> dict[str, tuple[int, ...]]:
    index = json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())
    shapes = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(Path(ckpt) / file), "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def per_rank_share(shapes: dict, tp: int, itemsize: int = 4):
    """(bytes per rank, whole bytes, replicated names) of the language model under the table."""
    per_rank = whole = 0
    replicated = []
    for name, shape in shapes.items():
        if not is_language_model(name):
            continue
        (rule,) = rules_for(name)
        n = itemsize * int(torch.Size(shape).numel())
        whole += n
        if rule.dim is None:
            replicated.append(name)
            per_rank += n
        else:
            assert shape[rule.dim] % tp == 0, f"{name} {shape} does not split over {tp}"
            per_rank += n // tp
    return per_rank, whole, replicated


def test_every_language_model_weight_has_exactly_one_rule(tiny_ckpt):
    shapes = checkpoint_shapes(tiny_ckpt)
    lm = [n for n in shapes if is_language_model(n)]
    vision = [n for n in shapes if n.startswith("model.visual.")]
    assert lm and vision and len(lm) + len(vision) == len(shapes), "unexpected top-level keys"
    for name in lm:
        assert len(rules_for(name)) == 1, f"{name}: {len(rules_for(name))} rules"
    for name in vision:
        assert rules_for(name) == [], f"vision weight {name} matched a shard rule"
    # Every rule is used: a dead rule hides a renamed weight.
    for pattern, _ in SHARD_TABLE:
        assert any(__import__("re").fullmatch(pattern, n) for n in lm), f"rule {pattern} matches nothing"


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_share_of_language_model_bytes(tiny_ckpt, tp):
    shapes = checkpoint_shapes(tiny_ckpt)
    # The MTP head's fc is replicated on purpose (tp_policy: one copy costs less than a gather); at the
    # tiny widths its 2*hidden^2 would dominate the share, so the share is of the main model.
    assert rules_for("mtp.fc.weight")[0].dim is None
    per_rank, whole, replicated = per_rank_share({n: s for n, s in shapes.items() if n != "mtp.fc.weight"}, tp)
    print(f"tp={tp}: each rank holds {per_rank / whole:.4f} of the language-model bytes; "
          f"replicated: {sorted({n.split('.')[-2] for n in replicated})}")
    # Only the norms stay whole (each is a vector the size of hidden or head_dim, applied after an all-reduce
    # or per head): they are why the share is a hair over 1/tp.
    assert all(n.endswith(("norm.weight", "layernorm.weight")) or n.startswith("mtp.pre_fc_norm_") for n in replicated)
    assert 1 / tp < per_rank / whole < 1 / tp + 0.01


def test_segmented_cut_keeps_q_k_v_parts_and_heads_together():
    full = torch.arange(2 + 2 + 6).float().unsqueeze(1)  # [q(2) | k(2) | v(6)]
    rule = Shard(0, segmented=True)
    assert shard_tensor(full, rule, 2, 0, (2, 2, 6)).flatten().tolist() == [0, 2, 4, 5, 6]
    assert shard_tensor(full, rule, 2, 1, (2, 2, 6)).flatten().tolist() == [1, 3, 7, 8, 9]
    assert shard_ranges(12, 4, 3) == [(9, 12)]


def test_rank_major_permutation_makes_deepspeed_block_cut_a_segment_cut(tiny_ckpt):
    """tp_policy.permute_fused_rows + DeepSpeed's contiguous cut == the table's per-segment cut."""
    from transformers import AutoConfig, Qwen3_5ForConditionalGeneration

    from ds_qwen_vision.tp_policy import permute_fused_rows

    config = AutoConfig.from_pretrained(tiny_ckpt)
    config.text_config.num_hidden_layers = 1
    config.text_config.layer_types = ["linear_attention"]
    model = Qwen3_5ForConditionalGeneration(config)
    w = model.model.language_model.layers[0].linear_attn.in_proj_qkv.weight.detach().clone()
    for tp in (2, 4):
        model.model.language_model.layers[0].linear_attn.in_proj_qkv.weight.data = w.clone()
        permute_fused_rows(model, tp)
        permuted = model.model.language_model.layers[0].linear_attn.in_proj_qkv.weight
        for rank, block in enumerate(permuted.chunk(tp, 0)):
            assert torch.equal(block, shard_tensor(w, Shard(0, segmented=True), tp, rank,
                                                   gdn_segments(config.text_config)))
