"""What the inexact cache options cost: FP8 KV (memory.kv_cache_dtype "fp8_e4m3") and a bf16 Gated DeltaNet state
(memory.gdn_state_dtype "bfloat16"), each and both, against the exact default, on the same model in one run.

    # GPU: the 27B's widths, 32 of 64 layers (the memory twin of issue 24), random bf16 weights made on the device
    python3 benchmarks/bench_cache_options.py --out benchmarks/results/DATE-CARD-cache-options.json
    # CPU (a smoke run; tests/test_cache_options.py holds the bounds CI checks)
    python3 benchmarks/bench_cache_options.py --preset tiny --layers 4 --device cpu --prompt 96 --new 32

Method: one prompt of random ordinary tokens is prefilled in each runner (in chunks, as served); then the exact
runner decodes greedily and every runner is fed the same tokens (teacher forcing), so each step compares like
with like. Per step: the log-probability each runner gives the exact runner's token (its difference from the
exact one's: mean and max), whether the option's own greedy pick agrees, and the relative error of every
full-attention and GDN layer's output against the exact runner's (forward hooks; the runners run eager, so the
hooks see every layer). A layer's error includes what the layers before it passed on. Random weights: the real
model's cost is not measured by this.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OPTIONS = {"exact": (False, torch.float32), "fp8_kv": (True, torch.float32), "bf16_state": (False, torch.bfloat16),
           "fp8_kv+bf16_state": (True, torch.bfloat16)}


@torch.no_grad()
def run(args) -> dict:
    from bench_27b import randomize
    from ds_qwen_vision.checkpoint import PRESETS, make_config
    from ds_qwen_vision.model import build_sharded, init_distributed
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    init_distributed(args.device)
    cuda = args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = copy.deepcopy(PRESETS[args.preset])
    spec["text"]["num_hidden_layers"] = args.layers
    PRESETS["bench-cache-options"] = spec
    model = build_sharded(make_config("bench-cache-options", mtp=False), 1, dtype)
    randomize(model, seed=0)
    max_len = args.prompt + args.new + 8
    runners = {name: ModelRunner(model, device, max_slots=1, max_len=max_len, cuda_graphs=False,
                                 prefill_graph_tokens=0, kv_fp8=fp8, state_dtype=state)
               for name, (fp8, state) in OPTIONS.items()}
    captured: list[tuple[str, torch.Tensor]] = []
    layers = model.model.language_model.layers

    def hook(name):
        def fn(module, inputs, output):
            captured.append((name, (output[0] if isinstance(output, tuple) else output).float()))
        return fn

    for i, layer in enumerate(layers):
        kind = "attention" if hasattr(layer, "self_attn") else "gdn"
        (layer.self_attn if kind == "attention" else layer.linear_attn).register_forward_hook(hook(f"{i}:{kind}"))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 1200, (args.prompt,), generator=g).tolist()
    logits = {}
    for name, runner in runners.items():
        for start in range(0, args.prompt, args.chunk):  # logits come with the last chunk
            out = runner.run(StepPlan(prefill=[Prefill(0, prompt, start=start, end=min(args.prompt, start + args.chunk))]))
        logits[name] = out[0]
    per = {name: {"dlogprob": [], "agree": []} for name in OPTIONS if name != "exact"}
    layer_err = {name: {} for name in per}
    t0 = time.perf_counter()
    for _ in range(args.new):
        exact_lp = torch.log_softmax(logits["exact"].float(), -1)
        token = int(exact_lp.argmax())
        for name in per:
            lp = torch.log_softmax(logits[name].float(), -1)
            per[name]["dlogprob"].append(abs(float(lp[token] - exact_lp[token])))
            per[name]["agree"].append(int(lp.argmax()) == token)
        outs = {}
        for name, runner in runners.items():
            captured.clear()
            logits[name] = runner.run(StepPlan(decode=[(0, token)]))[0]
            outs[name] = list(captured)
        for name in per:
            for (layer, ref), (_, got) in zip(outs["exact"], outs[name]):
                err = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
                layer_err[name].setdefault(layer, []).append(err)
    result = {"label": f"random {str(dtype).split('.')[-1]} weights ({args.preset} widths, {args.layers} layers, "
                       f"tp=1): the real model's cost is not measured by this",
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "prompt_tokens": args.prompt, "new_tokens": args.new, "seconds": time.perf_counter() - t0,
              "kv_bytes_per_token": {name: r.state.kv_bytes_per_block() / r.state.block_size
                                     for name, r in runners.items()},
              "state_bytes_per_sequence": {name: (r.state.conv_all[:, 0].nbytes + r.state.rec_all[:, 0].nbytes)
                                           for name, r in runners.items()},
              "options": {}}
    for name, d in per.items():
        errs = layer_err[name]
        kinds = {kind: [statistics.mean(v) for k, v in errs.items() if k.endswith(kind)] for kind in ("attention", "gdn")}
        result["options"][name] = {
            "dlogprob_mean": statistics.mean(d["dlogprob"]), "dlogprob_max": max(d["dlogprob"]),
            "greedy_agreement": sum(d["agree"]) / len(d["agree"]),
            "layer_rel_err_mean": {k: statistics.mean(v) for k, v in kinds.items() if v},
            "layer_rel_err_max": {k: max(max(v) for key, v in errs.items() if key.endswith(k)) for k in kinds
                                  if kinds[k]},
            "first_layers_rel_err": {k: statistics.mean(v) for k, v in list(errs.items())[:4]},
            "last_layer_rel_err": statistics.mean(list(errs.values())[-1])}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="27b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new", type=int, default=256, help="greedy tokens compared")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--out", type=Path)
    p.add_argument("--command", default="")
    args = p.parse_args()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": args.command or " ".join(sys.argv)} | run(args)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
