"""Offline greedy generation on the tensor-parallel model, without the server.

    deepspeed --num_gpus N --module ds_qwen_vision.generate --model DIR --prompt TEXT \
        [--image FILE ...] [--max-new-tokens N] [--device cpu|cuda] [--dtype float32|bfloat16]

Applies the checkpoint's chat template to one user message (images first, then the text), decodes
greedily with transformers' own `generate` on every rank in lockstep (the logits are all-reduced, so
every rank picks the same token), and prints only the completion on rank 0's stdout (the deepspeed
launcher itself adds its own "[date] [INFO] ..." lines to stdout around the ranks' output).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from .model import DTYPES, chat_inputs, init_distributed, load_model, load_processor, log


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_qwen_vision.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-thinking", action="store_true", help="pass enable_thinking=False to the chat template")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by older launchers
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Anything the libraries print while loading (DeepSpeed's op builder prints to stdout) goes to
    # stderr: this process's stdout carries the completion only.
    with contextlib.redirect_stdout(sys.stderr):
        completion, rank = run(args)
    if rank == 0:
        print(completion, flush=True)


def run(args) -> tuple[str, int]:
    images = []
    for path in args.image:  # read before joining the group, so a bad path fails every rank alike
        with open(path, "rb") as f:
            images.append(f.read())
    rank, world = init_distributed(args.device)
    t0 = time.perf_counter()
    model = load_model(args.model, world, args.device, DTYPES[args.dtype])
    processor = load_processor(args.model)
    log(f"[rank {rank}] loaded {args.model} at tp={world} on {args.device}/{args.dtype} "
        f"in {time.perf_counter() - t0:.1f}s")

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    kwargs = {"enable_thinking": False} if args.no_thinking else None
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else "cpu"
    inputs = chat_inputs(processor, [{"role": "user", "content": content}], images, kwargs, device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new_tokens, skip_special_tokens=True), rank


if __name__ == "__main__":
    main()
