"""How every language-model weight of Qwen3.6 (`Qwen3_5ForConditionalGeneration`) is sharded.

`SHARD_TABLE` is the single source of truth: one rule per weight name. Everything else in this
file carries the table out:

* `shard_ranges` turns a rule into the rows/columns a rank keeps (used by the checkpoint loader
  and by the tests that compare every shard against the full weight);
* `apply_tensor_parallel` hands the model to `deepspeed.init_inference`, whose AutoTP replaces
  every language-model `nn.Linear` with DeepSpeed's `LinearLayer` / `LinearAllreduce`
  (its `injection_policy` names the row-parallel layers of each class). Before that, the parts
  init_inference cannot express are done with DeepSpeed's own layers where it has one (the
  `LmHeadLinearAllreduce` head, the `VocabParallelEmbedding`) and by hand where it has none: the
  per-segment `[q | k | v]` cut of the Gated DeltaNet (fused projection and depthwise conv) and the
  per-head vectors `A_log` / `dt_bias`.

The vision tower (`model.visual.*`) matches no rule: it stays whole on every rank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

LM = r"model\.language_model\."
LAYER = LM + r"layers\.\d+\."
MTP = r"mtp\."
MTP_LAYER = MTP + r"layers\.\d+\."


@dataclass(frozen=True)
class Shard:
    """One rule: which dimension is cut across ranks (None = replicated) and how."""
    dim: int | None
    segmented: bool = False  # cut each part of a fused [q | k | v] tensor separately, then re-join
    why: str = ""


COLUMN = Shard(0, why="output features, contiguous per rank")
ROW = Shard(1, why="input features; DeepSpeed all-reduces the partial outputs")


def replicated(why: str) -> Shard:
    return Shard(None, why=why)


# (full parameter name pattern, rule). Patterns use the checkpoint's own key names.
SHARD_TABLE: tuple[tuple[str, Shard], ...] = (
    # Gated full attention (every 4th layer). q_proj emits [query_h | gate_h] per head, heads in order,
    # so a contiguous column cut gives each rank whole heads with their own gates.
    (LAYER + r"self_attn\.q_proj\.weight", Shard(0, why="whole q heads, each with its output gate")),
    (LAYER + r"self_attn\.[kv]_proj\.weight", Shard(0, why="whole kv heads (GQA groups stay aligned)")),
    (LAYER + r"self_attn\.o_proj\.weight", ROW),
    (LAYER + r"self_attn\.[qk]_norm\.weight", replicated("RMSNorm over head_dim, shared by every head")),
    # Gated DeltaNet, head-parallel: rank r keeps value heads [r*Hv/tp, (r+1)*Hv/tp) and the key heads
    # they read (transformers repeats key head j//(Hv/Hk) for value head j), so no gather is needed.
    (LAYER + r"linear_attn\.in_proj_qkv\.weight", Shard(0, segmented=True, why="[q | k | v] cut per segment")),
    (LAYER + r"linear_attn\.conv1d\.weight", Shard(0, segmented=True, why="depthwise conv over [q | k | v] channels")),
    (LAYER + r"linear_attn\.in_proj_z\.weight", Shard(0, why="output gate, by value heads")),
    (LAYER + r"linear_attn\.in_proj_[ba]\.weight", Shard(0, why="one row per value head")),
    (LAYER + r"linear_attn\.(A_log|dt_bias)", Shard(0, why="one entry per value head")),
    (LAYER + r"linear_attn\.norm\.weight", replicated("gated RMSNorm over head_v_dim, shared by every head")),
    (LAYER + r"linear_attn\.out_proj\.weight", ROW),
    # MLP
    (LAYER + r"mlp\.(gate|up)_proj\.weight", COLUMN),
    (LAYER + r"mlp\.down_proj\.weight", ROW),
    (LAYER + r"(input|post_attention)_layernorm\.weight", replicated("acts on the full, all-reduced hidden state")),
    # Ends of the stack
    (LM + r"embed_tokens\.weight", Shard(0, why="vocabulary rows; DeepSpeed's VocabParallelEmbedding all-reduces")),
    (LM + r"norm\.weight", replicated("acts on the full hidden state")),
    (r"lm_head\.weight", Shard(1, why="DeepSpeed's LmHeadLinearAllreduce: hidden split + all-reduce of logits")),
    # The multi-token-prediction head (speculative decoding, ds_qwen_vision/mtp.py). Its layer is a gated
    # full-attention decoder layer (transformers' Qwen3_5DecoderLayer): cut like the main ones, whole
    # heads per rank, so its KV cache is per rank too. It shares embed_tokens and lm_head with the model.
    (MTP_LAYER + r"self_attn\.q_proj\.weight", Shard(0, why="whole q heads, each with its output gate")),
    (MTP_LAYER + r"self_attn\.[kv]_proj\.weight", Shard(0, why="whole kv heads (GQA groups stay aligned)")),
    (MTP_LAYER + r"self_attn\.o_proj\.weight", ROW),
    (MTP_LAYER + r"self_attn\.[qk]_norm\.weight", replicated("RMSNorm over head_dim, shared by every head")),
    (MTP_LAYER + r"mlp\.(gate|up)_proj\.weight", COLUMN),
    (MTP_LAYER + r"mlp\.down_proj\.weight", ROW),
    (MTP_LAYER + r"(input|post_attention)_layernorm\.weight", replicated("acts on the full, all-reduced hidden state")),
    (MTP + r"fc\.weight", replicated("[hidden, 2*hidden], its input is the full hidden state; 1/64 of a layer's "
                                      "weights, so one copy per rank costs less than a gather")),
    (MTP + r"pre_fc_norm_(embedding|hidden)\.weight", replicated("acts on the full embedding / hidden state")),
    (MTP + r"norm\.weight", replicated("acts on the full hidden state")),
)

_COMPILED = tuple((re.compile(p), rule) for p, rule in SHARD_TABLE)

# Projections of one layer that read the same input, run as one GEMM (a decode step reads each weight once
# for a row or a few, so six small GEMMs of a GDN layer cost six launches, six split-K reduces and the
# b/a weights' latency for 48 rows each). Each member keeps its checkpoint name, its rule above and its
# DeepSpeed layer: after sharding, `fuse_projections` lays this rank's member shards side by side in one
# storage and makes each member's weight a view of its rows, so the loader's reads land in the fused
# weight and the fused weight is, by construction, the concatenation of the table's cuts.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "linear_attn": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),  # kernels.projections.gdn_in_proj
    "mlp": ("gate_proj", "up_proj"),
    "self_attn": ("q_proj", "k_proj", "v_proj"),
}
FUSED_WEIGHT = "dsqv_fused_weight"  # on the mixer/MLP module: [sum of member rows, in_features], this rank's
FUSED_SPLITS = "dsqv_fused_splits"  # rows of each member, in FUSED_PROJECTIONS order
FUSED_SCALE = "dsqv_fused_scale"    # an FP8 fused weight's block scales (fp8.fuse_fp8); absent in bf16


def rules_for(name: str) -> list[Shard]:
    """Every rule whose pattern matches `name` (the tests require exactly one for language-model weights)."""
    return [rule for pattern, rule in _COMPILED if pattern.fullmatch(name)]


def rule_for(name: str) -> Shard | None:
    """The rule for a checkpoint key, or None for weights that stay whole (the vision tower)."""
    matches = rules_for(name)
    if len(matches) > 1:
        raise ValueError(f"{name} matches {len(matches)} shard rules")
    return matches[0] if matches else None


def is_language_model(name: str) -> bool:
    return name.startswith(("model.language_model.", "lm_head.", "mtp."))


def gdn_segments(text_config) -> tuple[int, int, int]:
    """Widths of the [q | k | v] parts of the fused GDN projection and its conv (full model)."""
    key_dim = text_config.linear_key_head_dim * text_config.linear_num_key_heads
    value_dim = text_config.linear_value_head_dim * text_config.linear_num_value_heads
    return key_dim, key_dim, value_dim


def check_divisible(text_config, tp: int) -> None:
    """Refuse a tp that would cut a head (or a vocabulary row block) in two, before any work."""
    counts = {
        "num_attention_heads": text_config.num_attention_heads,
        "num_key_value_heads": text_config.num_key_value_heads,
        "linear_num_key_heads": text_config.linear_num_key_heads,
        "linear_num_value_heads": text_config.linear_num_value_heads,
        "intermediate_size": text_config.intermediate_size,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
    }
    bad = [f"{k}={v}" for k, v in counts.items() if v % tp]
    if bad:
        raise ValueError(f"tensor parallel size {tp} must divide {', '.join(bad)}")


def shard_ranges(size: int, tp: int, rank: int, segments: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """[start, stop) ranges along the cut dimension that `rank` keeps, in order.

    Without segments: one contiguous 1/tp block. With segments (fused [q | k | v]): the rank's 1/tp
    block of each segment, re-joined in segment order, so the local tensor is again [q_r | k_r | v_r].
    """
    segments = segments or (size,)
    assert sum(segments) == size, (segments, size)
    ranges, offset = [], 0
    for seg in segments:
        assert seg % tp == 0, f"segment of {seg} does not split over tp={tp}"
        step = seg // tp
        ranges.append((offset + rank * step, offset + (rank + 1) * step))
        offset += seg
    return ranges


def shard_tensor(full: torch.Tensor, rule: Shard, tp: int, rank: int, segments=None) -> torch.Tensor:
    """This rank's part of a full weight according to `rule` (a view-free copy)."""
    if rule.dim is None:
        return full
    ranges = shard_ranges(full.shape[rule.dim], tp, rank, segments if rule.segmented else None)
    return torch.cat([full.narrow(rule.dim, a, b - a) for a, b in ranges], dim=rule.dim)


def row_parallel_linears(model_module) -> dict[type, tuple[str, ...]]:
    """DeepSpeed `injection_policy`: for each language-model layer class, its row-parallel Linears.

    Derived from the table so the two can never disagree. Every other Linear inside these classes
    becomes a column-parallel `LinearLayer`. The vision tower has its own classes and is not named.
    """
    policy: dict[type, set[str]] = {}
    for name, module in model_module.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith("model.language_model.layers."):
            continue
        rule = rule_for(name + ".weight")
        parent_name, child = name.rsplit(".", 1)
        cls = type(model_module.get_submodule(parent_name))
        policy.setdefault(cls, set())
        if rule is not None and rule.dim == 1:
            policy[cls].add("." + child)
    return {cls: tuple(sorted(names)) for cls, names in policy.items()}


def permute_fused_rows(model, tp: int) -> None:
    """Reorder the fused GDN projection's rows rank-major, [q0 k0 v0 | q1 k1 v1 | ...].

    DeepSpeed's LinearLayer cuts a Linear into tp contiguous blocks; after this permutation block r is
    exactly rank r's [q_r | k_r | v_r], i.e. the per-segment cut the table asks for. Needs no rank.
    """
    segments = gdn_segments(model.config.text_config)
    for name, module in model.named_modules():
        if name.endswith("linear_attn.in_proj_qkv") and not module.weight.is_meta:
            size = module.weight.shape[0]
            order = [torch.arange(a, b) for r in range(tp) for a, b in shard_ranges(size, tp, r, segments)]
            module.weight.data = module.weight.data[torch.cat(order)].contiguous()


def decoder_layers(model) -> list:
    """The language model's decoder layers and, when loaded, the MTP head's (mtp.py: the same class)."""
    mtp = getattr(model, "mtp", None)
    return [*model.model.language_model.layers, *(mtp.layers if mtp is not None else ())]


@torch.no_grad()
def fuse_projections(model) -> None:
    """One storage per FUSED_PROJECTIONS group of every language-model layer; members become views of it.

    Runs after sharding (on this rank's shards; the cut is the table's, see verify_shards) and before
    loading. Values are kept, so it also works on a model that already holds weights. Meta weights are
    left alone. Transient memory: one layer's group at a time. The fused weight is a plain attribute,
    not a parameter: parameters() still counts each weight once, through its member.
    """
    for layer in decoder_layers(model):
        for kind, members in FUSED_PROJECTIONS.items():
            parent = getattr(layer, kind, None)
            if parent is None:
                continue
            weights = [getattr(parent, m).weight for m in members]
            if any(w.is_meta for w in weights) or getattr(parent, FUSED_WEIGHT, None) is not None:
                continue
            assert all(getattr(parent, m).bias is None for m in members), f"{kind}: fused projections have no bias"
            fused = torch.cat([w.data for w in weights], dim=0)  # [rows, in_features], contiguous
            offset = 0
            for w in weights:
                w.data = fused[offset:offset + w.shape[0]]
                offset += w.shape[0]
            setattr(parent, FUSED_WEIGHT, fused)
            setattr(parent, FUSED_SPLITS, tuple(w.shape[0] for w in weights))
            if fused.is_cuda:
                # DeepSpeed allocated each member in its own allocator segment; hand those back now, or
                # the fusing would hold every projection twice (reserved) by the last layer.
                torch.cuda.empty_cache()


def fused_weight(module) -> torch.Tensor | None:
    """The module's fused projection weight, if its members still share it (None: run them one by one)."""
    fused = getattr(module, FUSED_WEIGHT, None)
    if fused is None:
        return None
    # A member whose weight was replaced after fusing no longer aliases the fused storage: refuse it.
    # Pointer arithmetic only: this runs in every forward, and prefill is bound by host time.
    members = next(m for m in FUSED_PROJECTIONS.values() if hasattr(module, m[0]))
    row_bytes = fused.stride(0) * fused.element_size()
    address = fused.data_ptr()
    for name, rows in zip(members, getattr(module, FUSED_SPLITS)):
        w = getattr(module, name).weight
        if w.data_ptr() != address or w.shape[0] != rows:
            return None
        address += rows * row_bytes
    return fused


@torch.no_grad()
def shard_gated_deltanet(gdn, tp: int, rank: int) -> None:
    """Slice what DeepSpeed cannot express in one GDN layer, and fix its derived shapes in the same place."""
    segments = (gdn.key_dim, gdn.key_dim, gdn.value_dim)
    for attr in ("num_k_heads", "num_v_heads"):
        assert getattr(gdn, attr) % tp == 0, f"{attr}={getattr(gdn, attr)} does not split over tp={tp}"
    conv = gdn.conv1d  # weight [conv_dim, 1, kernel], channels [q | k | v]
    conv.weight = nn.Parameter(shard_tensor(conv.weight, Shard(0, segmented=True), tp, rank, segments),
                               requires_grad=False)
    assert conv.bias is None, "Qwen3.6 GDN conv has no bias"
    gdn.A_log = nn.Parameter(shard_tensor(gdn.A_log, Shard(0), tp, rank), requires_grad=False)
    gdn.dt_bias = nn.Parameter(shard_tensor(gdn.dt_bias, Shard(0), tp, rank), requires_grad=False)
    gdn.num_k_heads //= tp
    gdn.num_v_heads //= tp
    gdn.key_dim //= tp
    gdn.value_dim //= tp
    gdn.conv_dim //= tp
    conv.in_channels = conv.out_channels = conv.groups = gdn.conv_dim


def tp_group(tp: int):
    """The tensor-parallel process group, created the way init_inference creates it.

    init_inference reuses a group registered on InferenceEngine, so the hand-sliced parts below and
    DeepSpeed's layers share one group. It must exist first: the hand slicing happens before DeepSpeed
    allocates storage, so that no rank ever allocates a whole tensor it will cut.
    """
    from deepspeed import comm as dist
    from deepspeed.inference.engine import InferenceEngine

    if InferenceEngine.inference_mp_group is None:
        InferenceEngine.inference_mp_group = dist.new_group(list(range(tp)))
    return InferenceEngine.inference_mp_group


def apply_tensor_parallel(model, tp: int, dtype: torch.dtype):
    """Shard a `Qwen3_5ForConditionalGeneration` over the tp ranks; returns DeepSpeed's engine.

    Works on a model with real weights (every rank holds the same full model) and on one built on the
    meta device, where only shapes change and DeepSpeed then allocates this rank's shards (the loader
    fills them). Requires `deepspeed.init_distributed()` first.
    """
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.module_inject.layers import LmHeadLinearAllreduce, VocabParallelEmbedding

    check_divisible(model.config.text_config, tp)
    if tp > 1:
        group = tp_group(tp)
        rank = dist.get_rank(group=group)
        permute_fused_rows(model, tp)
        lm = model.model.language_model
        for layer in lm.layers:
            if hasattr(layer, "linear_attn"):
                shard_gated_deltanet(layer.linear_attn, tp, rank)
        # The head first: DeepSpeed's lm_head layer copies its weight, which unties it from a tied embedding
        # before the embedding is cut by vocabulary rows.
        head = LmHeadLinearAllreduce(model.lm_head, group)
        if head.weight.is_meta:
            # init_inference ties a meta lm_head to the embedding (its meta-checkpoint path assumes tied
            # weights). An empty real shard (no pages touched) keeps this head its own; the loader fills it.
            head.weight = nn.Parameter(torch.empty_like(head.weight, device="cpu"), requires_grad=False)
        model.lm_head = head
        lm.embed_tokens = VocabParallelEmbedding(lm.embed_tokens, group, name="embed_tokens")
    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": tp, "tp_grain_size": 1},  # grain 1: plain 1/tp blocks, as the table says
        dtype=dtype,
        replace_with_kernel_inject=False,
        injection_policy=row_parallel_linears(model) if tp > 1 else None,
    )
    fuse_projections(engine.module)
    verify_shards(engine.module, tp)
    return engine


def verify_shards(model, tp: int) -> None:
    """Fail loudly at load if any language-model weight is not exactly the shape the table implies.

    Guards against DeepSpeed's AutoTP heuristics ever cutting a layer differently from the table.
    """
    errors = []
    for name, param in model.named_parameters():
        if not is_language_model(name):
            continue
        rule = rule_for(name)
        if rule is None:
            errors.append(f"{name}: no shard rule")
            continue
        full = full_weight_shape(model, name)
        expect = list(full)
        if rule.dim is not None:
            expect[rule.dim] //= tp
        if list(param.shape) != expect:
            errors.append(f"{name}: shape {list(param.shape)}, table expects {expect} (full {list(full)})")
    if errors:
        raise RuntimeError("tensor-parallel shards do not follow SHARD_TABLE:\n  " + "\n  ".join(errors))


def full_weight_shape(model, name: str) -> tuple[int, ...]:
    """The unsharded shape of a language-model parameter, from the config alone."""
    c = model.config.text_config
    kd, _, vd = gdn_segments(c)
    leaf = name.rsplit(".", 2)
    kind = leaf[-2] if leaf[-1] == "weight" else leaf[-1]
    shapes = {
        "q_proj": (2 * c.num_attention_heads * c.head_dim, c.hidden_size),
        "k_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
        "v_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
        "o_proj": (c.hidden_size, c.num_attention_heads * c.head_dim),
        "q_norm": (c.head_dim,), "k_norm": (c.head_dim,),
        "in_proj_qkv": (2 * kd + vd, c.hidden_size),
        "conv1d": (2 * kd + vd, 1, c.linear_conv_kernel_dim),
        "in_proj_z": (vd, c.hidden_size),
        "in_proj_b": (c.linear_num_value_heads, c.hidden_size),
        "in_proj_a": (c.linear_num_value_heads, c.hidden_size),
        "A_log": (c.linear_num_value_heads,), "dt_bias": (c.linear_num_value_heads,),
        "norm": (c.linear_value_head_dim,) if ".linear_attn." in name else (c.hidden_size,),
        "out_proj": (c.hidden_size, vd),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
        "input_layernorm": (c.hidden_size,), "post_attention_layernorm": (c.hidden_size,),
        "embed_tokens": (c.vocab_size, c.hidden_size),
        "lm_head": (c.vocab_size, c.hidden_size),
        "fc": (c.hidden_size, 2 * c.hidden_size),
        "pre_fc_norm_embedding": (c.hidden_size,), "pre_fc_norm_hidden": (c.hidden_size,),
    }
    return shapes[kind]
