"""GPU correctness: tp=N bf16 greedy output against single-GPU transformers bf16, on a mid-size random model.

    python benchmarks/gpu_check.py build --dir D                     # the checkpoint (CPU, ~10 s)
    python benchmarks/gpu_check.py ref --dir D --out OUT/ref.pt     # transformers, one GPU
    deepspeed --num_gpus 2 benchmarks/gpu_check.py tp --dir D --out OUT/tp2.pt
    python benchmarks/gpu_check.py compare OUT/ref.pt OUT/tp2.pt
    # the serving path: both prompts at once through ModelRunner (16-token prefill chunks, batched
    # CUDA-graph decode with idle rows, compiled norms, pixels broadcast from rank 0)
    deepspeed --num_gpus 2 benchmarks/gpu_check.py runner --dir D --out OUT/runner.pt
    python benchmarks/gpu_check.py compare OUT/ref.pt OUT/runner.pt
    # the same with the decode all-reduces over peer memory (--allreduce one_shot|two_shot)
    # Qwen's block-wise FP8 format (fp8.py): `build --fp8` also writes D-fp8 (D quantized, blocks of 128) and
    # D-fp8-ref (its weights dequantized here, bf16, no quantization_config) for `ref`; `runner --dir D-fp8`

Passes when the 32 greedy tokens are identical, or where they first differ each side's token is
within the other's top-5 (bf16 sums in another order may flip a near-tie).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.model import chat_inputs, load_processor  # noqa: E402

NEW_TOKENS = 32


def cases(long: bool = False) -> list[tuple[list[dict], list[bytes]]]:
    """Two short prompts (text; image + text); `long` adds two text prompts of ~1,500 and ~2,600 tokens, which
    the runner takes in LONG_CHUNK-token chunks: one as graph pieces (1,024 + the rest), the other as one eager
    chunk of 2,048 (compiled norms) and a graphed rest (runner/prefill_graphs.split)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (200, 300, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "PNG")
    out = [([{"role": "user", "content": "Write a short poem about tensor parallelism."}], []),
           ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}],
            [buf.getvalue()])]
    if long:
        words = [f"w{int(i)}" for i in torch.randint(0, 5000, (2600,), generator=g)]
        out += [([{"role": "user", "content": " ".join(words[:n]) + " Summarize."}], []) for n in (310, 540)]
    return out


LONG_CHUNK = 2048


def generate(model, processor, device, long: bool = False) -> list[dict]:
    out = []
    for messages, images in cases(long):
        inputs = chat_inputs(processor, messages, images, device=device)
        with torch.inference_mode():
            g = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
        tokens = g.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        top5 = [s[0].float().topk(5).indices.tolist() for s in g.scores]
        out.append({"tokens": tokens, "top5": top5})
    return out


def serve(model, processor, device, rank: int, peer_memory: str = "off", mixed_prefill: bool = False,
          long: bool = False) -> list[dict]:
    """The cases together through the runner: the short ones in slots 1 and 2 of 4 (rows 0 and 3 idle in the
    batch) in 16-token chunks; with `long`, 6 slots and the long ones in LONG_CHUNK-token chunks."""
    from ds_qwen_vision.config import AllReduceConfig
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    runner = ModelRunner(model, device, max_slots=6 if long else 4, max_len=4096 if long else 1024,
                         allreduce=AllReduceConfig(peer_memory=peer_memory), mixed_prefill=mixed_prefill)
    jobs = {slot: chat_inputs(processor, messages, images) for slot, (messages, images) in enumerate(cases(long), 1)}
    done = dict.fromkeys(jobs, 0)
    out = {slot: {"tokens": [], "top5": []} for slot in jobs}
    while any(len(o["tokens"]) < NEW_TOKENS for o in out.values()):
        plan, pixels = StepPlan(), {}
        for slot, x in jobs.items():
            ids = x["input_ids"][0].tolist()
            if done[slot] < len(ids):
                end = min(len(ids), done[slot] + (LONG_CHUNK if slot > 2 else 16))
                if done[slot] == 0 and "pixel_values" in x:
                    plan.prefill.append(Prefill(slot, ids, x["image_grid_thw"].tolist(),
                                                tuple(x["pixel_values"].shape), 0, end))
                    pixels[slot] = x["pixel_values"] if rank == 0 else None
                else:
                    plan.prefill.append(Prefill(slot, ids, start=done[slot], end=end))
                done[slot] = end
            elif len(out[slot]["tokens"]) < NEW_TOKENS:
                plan.decode.append((slot, out[slot]["tokens"][-1]))
        for slot, row in runner.run(plan, pixels).items():
            out[slot]["tokens"].append(int(row.argmax()))
            out[slot]["top5"].append(row.topk(5).indices.tolist())
    return [out[slot] for slot in jobs]


def build_fp8(src: Path) -> Path:
    """src quantized block-wise (checkpoint.quantize_fp8_checkpoint, 128 x 128) as SRC-fp8, and SRC-fp8-ref: the
    same weights dequantized block by block (each e4m3 value x its block's scale in float32, then bf16)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from ds_qwen_vision.checkpoint import quantize_fp8_checkpoint

    fp8 = quantize_fp8_checkpoint(src, src.with_name(src.name + "-fp8"))
    ref = src.with_name(src.name + "-fp8-ref")
    shutil.rmtree(ref, ignore_errors=True)
    shutil.copytree(fp8, ref, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    cfg = json.loads((ref / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    (ref / "config.json").write_text(json.dumps(cfg))
    state = {}
    for f in fp8.glob("*.safetensors"):
        state.update(load_file(f))
    out = {}
    for key, t in state.items():
        scale = state.get(key.removesuffix(".weight") + ".weight_scale_inv")
        if key.endswith("_scale_inv"):
            continue
        if scale is not None:
            full = scale.repeat_interleave(block[0], 0)[:t.shape[0]].repeat_interleave(block[1], 1)[:, :t.shape[1]]
            t = t.float() * full
        out[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
    save_file(out, ref / "model.safetensors", metadata={"format": "pt"})
    return fp8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["build", "ref", "tp", "runner", "compare"])
    p.add_argument("files", nargs="*")
    p.add_argument("--dir", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--allreduce", choices=["off", "one_shot", "two_shot"], default="off",
                   help="runner: allreduce.peer_memory (kernels/allreduce.py)")
    p.add_argument("--mixed-prefill", action="store_true",
                   help="runner: the text prompt's decode rides in the image prompt's 16-token chunks' forwards")
    p.add_argument("--fp8", action="store_true", help="build: the FP8 copy and its dequantized reference too")
    p.add_argument("--long", action="store_true", help="ref/tp/runner: two long prompts too (cases)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "build":
        from ds_qwen_vision.checkpoint import build_checkpoint
        print(build_checkpoint(a.dir, preset="loadtest", seed=0, dtype=torch.bfloat16))
        if a.fp8:
            print(build_fp8(a.dir))
    elif a.role == "ref":
        from transformers import Qwen3_5ForConditionalGeneration
        model = Qwen3_5ForConditionalGeneration.from_pretrained(a.dir, dtype=torch.bfloat16).cuda().eval()
        torch.save(generate(model, load_processor(a.dir), "cuda", a.long), a.out)
    elif a.role == "tp":
        from ds_qwen_vision.model import init_distributed, load_model
        rank, world = init_distributed("cuda")
        model = load_model(str(a.dir), world, "cuda", torch.bfloat16)
        result = generate(model, load_processor(a.dir), torch.device("cuda", torch.cuda.current_device()), a.long)
        if rank == 0:
            torch.save(result, a.out)
    elif a.role == "runner":
        from ds_qwen_vision.model import init_distributed, load_model
        rank, world = init_distributed("cuda")
        model = load_model(str(a.dir), world, "cuda", torch.bfloat16)
        result = serve(model, load_processor(a.dir), torch.device("cuda", torch.cuda.current_device()), rank,
                       a.allreduce, a.mixed_prefill, a.long)
        if rank == 0:
            torch.save(result, a.out)
    else:
        ref, tp = (torch.load(f) for f in a.files)
        ok = True
        for i, (r, t) in enumerate(zip(ref, tp)):
            diff = next((j for j, (x, y) in enumerate(zip(r["tokens"], t["tokens"])) if x != y), None)
            if diff is None:
                print(f"case {i}: {NEW_TOKENS} greedy tokens identical")
                continue
            near = r["tokens"][diff] in t["top5"][diff] and t["tokens"][diff] in r["top5"][diff]
            ok &= near
            print(f"case {i}: first difference at token {diff}: ref {r['tokens'][diff]} vs tp {t['tokens'][diff]}; "
                  f"{'each within the other top-5' if near else 'NOT within top-5'}")
        print("PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
