"""Shard-aware loading: a rank never materialises weights it does not keep.

The model is built on the meta device, sharded there (tp_policy.apply_tensor_parallel: DeepSpeed cuts
meta tensors for free and then allocates only this rank's shards, uninitialised, on the target device),
and filled from the checkpoint's safetensors files: for each weight this rank reads only the rows or
columns SHARD_TABLE gives it (per segment for the fused GDN tensors), straight into the target device
and dtype.

The reads bypass mmap on purpose: pages of a memory-mapped file that a rank touches count towards its
resident memory until the file is closed (a real checkpoint file is ~5 GB), whereas positioned reads
(`os.preadv`) land directly in the parameter's memory (CPU) or in a small staging buffer (GPU, or when
the file's dtype differs). Host memory then grows by the shard and one staging buffer, nothing more.
The safetensors format is a JSON header of names, dtypes, shapes and byte offsets followed by raw
row-major data, which is what makes exact byte ranges easy to read.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch
from tqdm import tqdm

from .fp8 import FP8, scale_cut, scale_shape
from .tp_policy import full_weight_shape, gdn_segments, is_language_model, rule_for, shard_ranges

# The multi-token-prediction head of real Qwen3.6 checkpoints: loaded into `model.mtp` (ds_qwen_vision/mtp.py)
# when speculative decoding uses it, skipped otherwise (as transformers does: _keys_to_ignore_on_load_unexpected).
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


def has_mtp_weights(model_dir: str | Path) -> bool:
    """Whether the checkpoint holds the MTP head's weights (mtp.fc.weight and its layer)."""
    keys = set()
    for path in checkpoint_files(model_dir):
        f = SafetensorsFile(path)
        keys.update(f.tensors)
        f.close()
    return "mtp.fc.weight" in keys and any(k.startswith("mtp.layers.0.") for k in keys)


def build_on_meta(config, dtype: torch.dtype, mtp: bool = False):
    """The model's skeleton with no storage, in the target dtype; with mtp, its MTP head as `model.mtp`."""
    from transformers import Qwen3_5ForConditionalGeneration

    from .mtp import Qwen3_5MTP

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Qwen3_5ForConditionalGeneration(config)
            if mtp:
                model.mtp = Qwen3_5MTP(config.text_config)
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


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
STAGING_BYTES = 8 << 20  # one staging buffer per read: the only host memory loading adds beyond the shard


class SafetensorsFile:
    """Positioned reads of byte ranges of the tensors in one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        header = json.loads(os.pread(self.fd, header_len, 8))
        header.pop("__metadata__", None)
        self.base = 8 + header_len
        self.tensors = header

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def read_into(self, key: str, out: torch.Tensor, dim: int | None, ranges) -> None:
        """out <- the tensor's `ranges` along `dim`, concatenated in order (dim None: the whole tensor)."""
        info = self.tensors[key]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        start = self.base + info["data_offsets"][0]
        if dim is None:
            dim, ranges = 0, [(0, shape[0] if shape else 1)]
            shape = shape or (1,)
            out = out.view(shape)
        outer = 1
        for n in shape[:dim]:
            outer *= n
        inner = dtype.itemsize
        for n in shape[dim + 1:]:
            inner *= n
        row = shape[dim] * inner  # bytes of one index of the dims before `dim`
        view = out.reshape(outer, -1)  # [outer, kept * inner / itemsize]; a view, out is contiguous
        col = 0
        for a, b in ranges:
            width = (b - a) * inner // dtype.itemsize
            self._read_block(start, outer, row, a * inner, (b - a) * inner, dtype, view[:, col:col + width])
            col += width

    def _read_block(self, start, outer, row, offset, length, dtype, dest) -> None:
        """dest[i] <- bytes [start + i*row + offset, +length) for every i, through staging or directly."""
        direct = dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous()
        if direct and outer == 1:
            _pread_into(self.fd, dest.view(-1).view(torch.uint8), start + offset)
            return
        # Several rows (or a conversion): stage up to STAGING_BYTES of whole file rows at a time.
        rows_per = max(1, STAGING_BYTES // row) if outer > 1 else 1
        if outer == 1:  # one long run that needs converting or moving: split it
            chunk = max(dtype.itemsize, STAGING_BYTES // dtype.itemsize * dtype.itemsize)
            flat = dest.view(-1)
            for pos in range(0, length, chunk):
                n = min(chunk, length - pos)
                buf = torch.empty(n, dtype=torch.uint8)
                _pread_into(self.fd, buf, start + offset + pos)
                flat[pos // dtype.itemsize:(pos + n) // dtype.itemsize].copy_(buf.view(dtype))
            return
        for i in range(0, outer, rows_per):
            n = min(rows_per, outer - i)
            buf = torch.empty(n * row, dtype=torch.uint8)
            _pread_into(self.fd, buf, start + i * row)
            block = buf.view(n, row)[:, offset:offset + length]
            dest[i:i + n].copy_(block.contiguous().view(dtype).view(n, -1))


def _pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    mv = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file at byte {offset + done}")
        done += n


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
    bar = tqdm(total=len(params), desc=f"loading shards (tp={tp})", unit="tensor", disable=not show_progress)
    for path in checkpoint_files(model_dir):
        f = SafetensorsFile(path)
        try:
            for key in f.tensors:
                if key not in wanted:
                    if not UNUSED_KEYS.match(key):
                        problems.append(f"unexpected tensor {key} in {path.name}")
                    continue
                full_shape = f.shape(key)
                stored_fp8 = f.tensors[key]["dtype"].startswith("F8")
                for name in wanted[key]:
                    param = params[name]
                    if stored_fp8 != (param.dtype == FP8):  # never cast an FP8 weight without its scale
                        problems.append(f"tensor {key} is stored as {f.tensors[key]['dtype']}, but this model "
                                        f"(its quantization_config) expects {param.dtype}")
                        continue
                    if name.endswith(".weight_scale_inv"):  # an FP8 weight's block scales (fp8.py)
                        block = model.get_submodule(name.rsplit(".", 1)[0]).fp8_block
                        weight_name = name.removesuffix("_scale_inv")
                        expected = list(scale_shape(full_weight_shape(model, weight_name), block))
                        if list(full_shape) != expected:
                            problems.append(f"tensor {key} has shape {list(full_shape)}; this model expects "
                                            f"{expected} (blocks of {list(block)})")
                            continue
                        f.read_into(key, param.data, *scale_cut(model, weight_name, tp, rank, block))
                        loaded.add(name)
                        bar.update(1)
                        continue
                    rule = rule_for(name) if is_language_model(name) else None
                    dim = rule.dim if rule is not None else None
                    expected = list(param.shape)
                    if dim is not None and dim < len(expected):
                        expected[dim] *= tp
                    if list(full_shape) != expected:
                        problems.append(f"tensor {key} has shape {list(full_shape)}; this model expects {expected}")
                        continue
                    ranges = None
                    if dim is not None:
                        ranges = shard_ranges(full_shape[dim], tp, rank, segments if rule.segmented else None)
                    f.read_into(key, param.data, dim, ranges)
                    loaded.add(name)
                    bar.update(1)
        finally:
            f.close()
    bar.close()
    missing = sorted(set(params) - loaded)
    if missing:
        problems.append(f"missing tensors: {', '.join(sources[n] for n in missing)}")
    if problems:
        raise CheckpointError(f"{model_dir} does not match its config:\n  " + "\n  ".join(problems))
