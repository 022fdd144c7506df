"""The per-token cost of constrained decoding (engine/grammar.py): filling the xgrammar bitmasks on the
host and applying them to the logits, per step, for a batch of constrained rows -- against the same
step without a grammar (the baseline: pick the tokens of unmasked logits), measured in the same run.

    python benchmarks/grammar_masks.py                       # the demo checkpoint's tokenizer (1,306 tokens)
    python benchmarks/grammar_masks.py --model /models/Qwen3.6-27B --device cuda --out benchmarks/results/X.json

`fill` is the host's part (xgrammar's matchers, every constrained row); `apply` is the device's: the
additive mask `Output.token_mask` hands the sampler (zeros, then xgrammar's kernel sets the disallowed
tokens to -inf) and its addition to the logits. The rows are driven by random logits under their masks (a random model, so the text itself means
nothing); every step's mask depends on the token picked before it, as in serving. Costs depend on the
grammar's state (inside a free string a mask is cheap, at a JSON key it is not): the figures are means
over whole constrained outputs, restarted when one ends.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoTokenizer

from ds_qwen_vision.engine.grammar import Grammars

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 32},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
    "required": ["query"]}}},
         {"type": "function", "function": {"name": "book", "parameters": SCHEMA}}]
REQUESTS = {
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
    "tool_required": {"tools": TOOLS, "tool_choice": "required"},
}


def run(grammars: Grammars, request: dict, batch: int, steps: int, vocab: int, device: str, stop: set[int]):
    compiled = grammars.compile(request, thinking=False)
    matchers = [grammars.matcher(compiled) for _ in range(batch)]
    gen = torch.Generator(device=device).manual_seed(0)
    fill_ms, apply_ms, base_ms = [], [], []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen, device=device) * 4
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        torch.argmax(logits.clone(), -1).tolist()  # baseline: the step's pick without a grammar
        t1 = time.perf_counter()
        bits = grammars.fill(matchers)
        t2 = time.perf_counter()
        # what Output.token_mask hands the sampler (which adds it to the logits)
        mask = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        grammars.apply(mask, bits)
        logits = logits + mask
        sync()
        t3 = time.perf_counter()
        picks = torch.argmax(logits, -1).tolist()
        base_ms.append((t1 - t0) * 1e3)
        fill_ms.append((t2 - t1) * 1e3)
        apply_ms.append((t3 - t2) * 1e3)
        for i, (m, token) in enumerate(zip(matchers, picks)):
            assert m.accept_token(token)
            if token in stop or m.is_terminated():
                matchers[i] = grammars.matcher(compiled)  # a new output in this row
    return {"fill_ms": statistics.mean(fill_ms), "fill_p90_ms": sorted(fill_ms)[int(0.9 * len(fill_ms))],
            "apply_ms": statistics.mean(apply_ms), "baseline_pick_ms": statistics.mean(base_ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the demo checkpoint)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from ds_qwen_vision.checkpoint import build_checkpoint, demo_dir
        model = str(demo_dir())
        if not os.path.exists(os.path.join(model, "config.json")):
            build_checkpoint(model, preset="tiny", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = json.load(open(os.path.join(model, "config.json")))
    vocab = config.get("text_config", config)["vocab_size"]
    gen = json.load(open(os.path.join(model, "generation_config.json")))
    eos = gen.get("eos_token_id")
    stop = set(eos if isinstance(eos, list) else [eos])
    t = time.perf_counter()
    grammars = Grammars(tokenizer, vocab, stop, threads=args.threads)
    setup_s = time.perf_counter() - t
    rows = []
    for what, request in REQUESTS.items():
        t = time.perf_counter()
        grammars.compile(request, thinking=False)
        compile_ms = (time.perf_counter() - t) * 1e3
        for batch in args.batch:
            r = run(grammars, request, batch, args.steps, vocab, args.device, stop)
            mask_ms = r["fill_ms"] + r["apply_ms"]
            # decode_ms_per_token / floor_ms (the house's keys): the pick step per token with the grammar's
            # mask, and without it (the baseline) -- not the model's decode step, which this does not run.
            rows.append({"run": f"ours:{what}", "batch": batch, "compile_ms": compile_ms,
                         "mask_ms_per_step": mask_ms, "mask_ms_per_token": mask_ms / batch,
                         "decode_ms_per_token": (mask_ms + r["baseline_pick_ms"]) / batch,
                         "floor_ms": r["baseline_pick_ms"] / batch, **r})
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "card": args.device if args.device != "cuda" else
              torch.cuda.get_device_name(), "host": platform.processor() or platform.machine(),
              "command": "python benchmarks/grammar_masks.py " + " ".join(
                  f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if v is not None and k != "out"),
              "tp": 1, "tokenizer_tokens": len(tokenizer), "vocab_size": vocab, "setup_s": setup_s,
              "threads": args.threads, "note": "random logits under the masks: content-dependent, labelled so",
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
