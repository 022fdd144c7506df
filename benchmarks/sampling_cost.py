"""The batched sampler's cost per engine step on the logits' device, against its baselines in the same run.

    python benchmarks/sampling_cost.py [--device cuda] [--out benchmarks/results/DATE-CARD-tp1-sampling.json]

For R rows of the real vocabulary (248,320 logits, bf16 as the model writes them) it times one step of
each configuration, with CUDA events after a warm-up (or the wall clock on CPU):

- ``argmax``: one argmax over the rows -- the floor (what greedy decoding needs at least);
- ``per-row (before)``: the sampler this project had before (one call per sampled row, float64, a sort
  per row for top-p), each row's token written into the step's picks -- the baseline;
- ``batched``: engine.sampling.sample for all rows at once, for greedy rows, Qwen3.6's defaults
  (temperature 0.6, top_p 0.95, top_k 20), the same plus presence/frequency/repetition penalties, and the
  same plus logprobs with top_logprobs=20.

Rows of the results JSON: ``run``, ``rows``, ``decode_ms_per_token`` (the sampler's time per step), ``floor_ms``
(argmax's time for the same rows). Nothing here depends on model weights (random logits).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.engine.sampling import PenaltyState, RowParams, Sampling, sample  # noqa: E402

VOCAB = 248_320


def before(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The previous per-row sampler (engine/sampling.py before the batched one), as the baseline."""
    logits = logits.double()
    logits = (logits - logits.max()) / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > s.top_p, 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


def timed(fn, device: torch.device, reps: int = 50) -> float:
    """Median milliseconds of fn() (device time, synchronised)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="1,4,16,32")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device(args.device)
    qwen = dict(temperature=0.6, top_p=0.95, top_k=20)
    configs = {
        "greedy": Sampling(1, temperature=0),
        "qwen3.6 defaults": Sampling(1, **qwen),
        "defaults + penalties": Sampling(1, **qwen, presence_penalty=1.5, frequency_penalty=0.5,
                                         repetition_penalty=1.1),
        "defaults + top_logprobs=20": Sampling(1, **qwen, logprobs=True, top_logprobs=20),
    }
    results = []
    for r in [int(x) for x in args.rows.split(",")]:
        logits = torch.randn(r, VOCAB, device=device).to(torch.bfloat16)
        floor = timed(lambda: logits.argmax(-1), device)
        generators = [torch.Generator(device=device).manual_seed(i) for i in range(r)]
        s = configs["qwen3.6 defaults"]

        def per_row():
            picks = logits.argmax(-1)
            for i in range(r):
                picks[i] = before(logits[i], s, generators[i])
            return picks

        results.append({"run": "per-row (before), qwen3.6 defaults", "rows": r,
                        "decode_ms_per_token": timed(per_row, device), "floor_ms": floor})
        state = PenaltyState(r)
        for i in range(r):
            state.start(i, list(range(100 * i, 100 * i + 500)), VOCAB, device)
        slots = torch.arange(r, device=device)
        for name, s in configs.items():
            params = RowParams.build([s] * r, generators, VOCAB, device)

            def batched():
                counts, prompt = state.rows(slots) if params.use_penalties else (None, None)
                picked = sample(logits, params, counts, prompt)
                if counts is not None:
                    state.record(slots, picked.tokens)
                return picked

            results.append({"run": f"batched, {name}", "rows": r, "decode_ms_per_token": timed(batched, device),
                            "floor_ms": floor})
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for row in results:
        print(f"{row['rows']:>3} rows  {row['run']:<40} {row['decode_ms_per_token']:8.3f} ms "
              f"(argmax floor {row['floor_ms']:.3f} ms)")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "card": card, "tp": 1,
            "command": " ".join(["python"] + sys.argv), "vocab": VOCAB, "logits_dtype": "bfloat16",
            "note": "random logits: nothing depends on model weights", "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
