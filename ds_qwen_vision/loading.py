"""Shard-aware loading: a rank never materialises weights it does not keep.

The model is built on the meta device, sharded there (tp_policy.apply_tensor_parallel: DeepSpeed cuts
meta tensors for free and then allocates only this rank's shards, uninitialised, on the target device),
and filled from the checkpoint's safetensors files: for each weight this rank reads only the rows or
columns SHARD_TABLE gives it (per segment for the fused GDN tensors), straight into the target device
and dtype. One file is open at a time, so the pages of the memory-mapped file that a rank touches
never exceed one file's worth.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .tp_policy import gdn_segments, is_language_model, rule_for, shard_ranges

# Weights in real Qwen3.6 checkpoints that transformers' model does not use (the multi-token-prediction
# head for speculative decoding); transformers skips them too (_keys_to_ignore_on_load_unexpected).
UNUSED_KEYS = re.compile(r"^mtp\.")
# With tied embeddings (the smaller Qwen3.5/3.6 models) the checkpoint stores the embedding only.
TIED = {"lm_head.weight": "model.language_model.embed_tokens.weight"}


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def build_on_meta(config, dtype: torch.dtype):
    """The model's skeleton with no storage, in the target dtype."""
    from transformers import Qwen3_5ForConditionalGeneration

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Qwen3_5ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_buffers(model) -> None:
    """Recompute the non-persistent buffers (rotary inverse frequencies) that meta construction left empty.

    They are derived from the config, never stored in checkpoints; transformers' own _init_weights
    computes them, so call it on exactly those modules.
    """
    done = set()
    for name, module in model.named_modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            model._init_weights(module)
            done.update(f"{name}.{b}" for b, _ in module.named_buffers(recurse=False))
    missing = [n for n, b in model.named_buffers() if n not in done and b is not None]
    if missing:
        raise RuntimeError(f"buffers not initialised after meta construction: {missing}")


@torch.no_grad()
def load_shards(model, model_dir: str | Path, tp: int, rank: int, show_progress: bool = True) -> None:
    """Fill every parameter of a sharded, materialised model with this rank's slice of the checkpoint."""
    params = dict(model.named_parameters())
    text_config = model.config.text_config
    segments = gdn_segments(text_config)
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)
    sources = {name: name for name in params}
    if tied:
        sources.update({k: v for k, v in TIED.items() if k in params})
    wanted: dict[str, list[str]] = {}  # checkpoint key -> parameters filled from it
    for name, key in sources.items():
        wanted.setdefault(key, []).append(name)

    loaded, problems = set(), []
    files = checkpoint_files(model_dir)
    total = sum(len(v) for v in wanted.values())
    bar = tqdm(total=total, desc=f"loading shards (tp={tp})", unit="tensor", disable=not show_progress,
               file=None)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in wanted:
                    if not UNUSED_KEYS.match(key):
                        problems.append(f"unexpected tensor {key} in {path.name}")
                    continue
                full_shape = tuple(f.get_slice(key).get_shape())
                for name in wanted[key]:
                    param = params[name]
                    rule = rule_for(name) if is_language_model(name) else None
                    try:
                        value = read_shard(f, key, full_shape, rule, tp, rank, segments)
                    except ValueError as e:
                        problems.append(f"{key}: {e}")
                        continue
                    if tuple(value.shape) != tuple(param.shape):
                        problems.append(f"tensor {key} has shape {list(full_shape)}; this model expects "
                                        f"{_full_expected(param.shape, rule, tp)}")
                        continue
                    param.copy_(value, non_blocking=False)
                    loaded.add(name)
                    bar.update(1)
    bar.close()
    missing = sorted(set(params) - loaded)
    if missing:
        problems.append(f"missing tensors: {', '.join(sources[n] for n in missing)}")
    if problems:
        raise CheckpointError(f"{model_dir} does not match its config:\n  " + "\n  ".join(problems))


def read_shard(f, key: str, full_shape: tuple[int, ...], rule, tp: int, rank: int, segments) -> torch.Tensor:
    """Read this rank's part of one tensor: only those bytes leave the file."""
    sl = f.get_slice(key)
    if rule is None or rule.dim is None:
        return sl[:]
    dim = rule.dim
    if dim >= len(full_shape):
        raise ValueError(f"has {len(full_shape)} dimensions; its shard rule cuts dimension {dim}")
    size = full_shape[dim]
    segs = segments if rule.segmented else None
    if (segs and sum(segs) != size) or size % tp:
        raise ValueError(f"dimension {dim} of size {size} does not split into {tp} shards"
                         + (f" of segments {list(segs)}" if segs else ""))
    pieces = []
    for a, b in shard_ranges(size, tp, rank, segs):
        index = (slice(None),) * dim + (slice(a, b),)
        pieces.append(sl[index])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _full_expected(shard_shape, rule, tp) -> list[int]:
    shape = list(shard_shape)
    if rule is not None and rule.dim is not None:
        shape[rule.dim] *= tp
    return shape
