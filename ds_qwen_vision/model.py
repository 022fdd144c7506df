"""The model on this rank: distributed setup, loading + sharding, and turning a chat into model inputs.

Every rank runs the same code on the same inputs: the processor and chat template come from the
checkpoint, the vision tower is whole on every rank, and only the language model is sharded
(see tp_policy.SHARD_TABLE).
"""
from __future__ import annotations

import functools
import io
import logging
import os
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(*args) -> None:
    """Logs go to stderr so stdout carries only results (the generate command prints the completion)."""
    print(*args, file=sys.stderr, flush=True)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device's queue: a copy from pageable memory waits
    for the stream first (CUDA's rule) -- for the whole step just launched, which then delays the previous
    step's tokens by a step -- while a copy from pinned memory is queued behind it."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def init_distributed(device: str) -> tuple[int, int]:
    """Join the launcher's process group; returns (rank, world_size).

    On CUDA each rank takes the GPU of its LOCAL_RANK before any CUDA work. On CPU DeepSpeed picks
    its CPU accelerator and uses the JIT-built shared-memory all-reduce.
    """
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.utils.logging import logger as ds_logger

    for handler in ds_logger.handlers:  # DeepSpeed logs to stdout; our stdout carries results only
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but no CUDA device is visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # run without the launcher: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The ranks of a host share its cores (launch.sh exports the same share): each rank's OpenMP pool
        # would otherwise take them all, and the ranks fight for them (64 tokens of the generate command on the
        # demo at tp=2, 2 busy cores: 60 s with 2 threads a rank, 9-14 s with 1; 2026-12-07).
        local = int(os.environ.get("LOCAL_SIZE", "1"))
        torch.set_num_threads(max(1, -(-len(os.sched_getaffinity(0)) // local)))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else None, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    # DeepSpeed's CPU all-reduce gives each rank a shared-memory buffer (/dev/shm, 69 MB), which every rank maps
    # while joining, and never unlinks it. Once all have mapped all (the barrier) the names serve no one: unlinked
    # now, the memory goes with the last process that maps it, however the processes end (kill -9 too).
    # Every rank has one or none (it is the CPU ranks' op, for ranks of one host), so all or none wait here.
    shm = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
           f"{os.environ.get('MASTER_PORT', '')}_{rank}")  # DeepSpeed's name (csrc/cpu/comm/shm.cpp)
    if os.path.exists(shm):
        if world > 1:
            dist.barrier()
        os.unlink(shm)
    return rank, world


def ranks_min(value: int, device: torch.device | str = "cpu", group=None) -> int:
    """The smallest of every rank's `value` in `group` (`value` itself without a group): what the ranks
    size or choose alike -- the memory planner's budgets, a fallback (`agree`). `device`: where the group's
    backend takes tensors (CUDA for NCCL)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN, group=group)
    return int(t.item())


def agree(ok: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """Whether `ok` holds on every rank of `group` (a MIN of a flag over the ranks).

    Every per-rank choice that changes a step's collectives goes through here before it is used -- a CUDA
    graph captured or not, the peer all-reduce: a rank replaying a padded prefill graph while its peer runs
    exact-length chunks eagerly all-reduces other sizes, and both hang."""
    return ranks_min(int(ok), device, group) == 1


class _KernelAdvice(logging.Filter):
    """transformers' advice to install flash-linear-attention / causal-conv1d, logged once per function and process
    when a Gated DeltaNet layer runs its PyTorch fallback: four lines per rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is falling back to its reference PyTorch implementation" not in record.getMessage()


def quiet_kernel_advice(device: str, rank: int) -> None:
    """Drop that advice where it cannot apply (CPU ranks: those kernels need a GPU) and on ranks other than 0, which
    would repeat rank 0's."""
    if device == "cpu" or rank != 0:
        logging.getLogger("transformers.integrations.hub_kernels").addFilter(_KernelAdvice())


def build_sharded(config, tp: int, dtype: torch.dtype, mtp: bool = False):
    """This rank's shard of the model, allocated on the device but not yet filled (buffers are)."""
    from .fp8 import Fp8Format, convert as convert_fp8
    from .loading import build_on_meta, init_buffers
    from .tp_policy import apply_tensor_parallel

    if config.model_type != "qwen3_5":
        raise SystemExit(f"model_type {config.model_type!r}: ds-qwen-vision serves qwen3_5 "
                         f"(Qwen3_5ForConditionalGeneration) checkpoints")
    model = apply_tensor_parallel(build_on_meta(config, dtype, mtp), tp, dtype).module
    fmt = Fp8Format.from_config(config)
    if fmt is not None:  # Qwen's FP8 checkpoints: those linears' shards become FP8 (fp8.py)
        convert_fp8(model, fmt, tp)
    init_buffers(model)
    return model


def load_model(model_dir: str, tp: int, device: str, dtype: torch.dtype, show_progress: bool = True,
               mtp: bool = False):
    """This rank's shard of a Qwen3_5ForConditionalGeneration checkpoint, ready to run.

    Built on the meta device, sharded (tp_policy), then filled with only this rank's slices of the
    checkpoint (loading.py). Returns the transformers model: its forward and generate are transformers' own.
    With mtp, also the checkpoint's MTP head (`model.mtp`, for speculative decoding).
    """
    from deepspeed import comm as dist
    from transformers import AutoConfig, GenerationConfig

    from .loading import load_shards
    from .tp_policy import check_divisible

    config = AutoConfig.from_pretrained(model_dir)
    check_divisible(config.text_config, tp)
    model = build_sharded(config, tp, dtype, mtp)
    if (Path(model_dir) / "generation_config.json").exists():  # eos ids etc., as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    rank = dist.get_rank() if tp > 1 else 0
    load_shards(model, model_dir, tp, rank, show_progress=show_progress and rank == 0)
    quiet_kernel_advice(device, rank)
    return model


def load_processor(model_dir: str):
    """The checkpoint's own processor: tokenizer + chat template + image processor.

    transformers maps qwen3_5 to Qwen3VLProcessor, whose video processor exists only with torchvision
    (present on the GPU image; absent beside the CPU torch build). Without it, the same processor class
    is loaded with its image processor and tokenizer alone: the same prompts, pixel_values and
    image_grid_thw from the same files; only video input is unavailable (we serve images).
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(model_dir)
    return _image_only_processor_class().from_pretrained(model_dir)


@functools.lru_cache(maxsize=1)
def _image_only_processor_class():
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without its (torchvision-only) video processor."""

        # ProcessorMixin derives the sub-processors to load from this list; Qwen3VLProcessor.__init__
        # passes video_processor=None, which ProcessorMixin zips away against these two names.
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyQwen3VLProcessor


def open_image(data: bytes):
    """Decode image bytes as Qwen's own preprocessing sees them: EXIF orientation applied, RGB, and an
    image with transparency (an alpha channel, or a palette / colour key marked transparent) composited
    over white, as qwen-vl-utils and vLLM do -- a bare convert("RGB") would show the colours hidden
    under transparent pixels instead."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def chat_inputs(processor, messages: list[dict], images: list[bytes], chat_template_kwargs: dict | None = None,
                device: str | torch.device = "cpu") -> dict:
    """Chat messages (+ the images their image parts refer to, in order) → model inputs.

    `messages` use transformers' multimodal chat format: content is a string or a list of
    {"type": "text", "text": ...} / {"type": "image"} parts. The prompt text comes from the
    checkpoint's chat template, the pixels and the image-token expansion from its processor.
    """
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))
    pil = [open_image(b) for b in images]
    inputs = processor(text=[text], images=pil or None, return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items()}
