"""Rank 0's host work per generated token, outside the GPU: detokenization and sampling.

    python benchmarks/host_costs.py        # CPU only; uses the demo checkpoint's tokenizer

Detokenization: TextStream (a window of recent ids per token) against re-decoding the whole output on
every token (what it did before), over 2,048 tokens. Sampling: engine.sample on host logits of the
real vocabulary size (248,320): the cost the engine paid per sampled row per token before sampling moved
to the logits' device.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.checkpoint import build_checkpoint, demo_dir  # noqa: E402
from ds_qwen_vision.engine import RowParams, Sampling, sample  # noqa: E402
from ds_qwen_vision.model import load_processor  # noqa: E402
from ds_qwen_vision.engine.textstream import TextStream  # noqa: E402


def main() -> None:
    path = demo_dir()
    if not (path / "config.json").exists():
        build_checkpoint(path, preset="tiny", seed=0)
    tok = load_processor(str(path)).tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog, 世界 🙂. " * 200, add_special_tokens=False)[:2048]
    t = time.perf_counter()
    stream = TextStream(tok, ["zzz"], False)
    for i in ids:
        stream.add(i)
    incremental = time.perf_counter() - t
    t = time.perf_counter()
    for n in range(1, len(ids) + 1):
        tok.decode(ids[:n], skip_special_tokens=True)
    whole = time.perf_counter() - t
    print(f"detokenize {len(ids)} tokens one at a time: incremental {1e3 * incremental:.0f} ms, "
          f"re-decoding the whole output {1e3 * whole:.0f} ms")
    logits = torch.randn(1, 248_320)
    for s in (Sampling(1, 1.0), Sampling(1, 0.7, top_p=0.9), Sampling(1, 0.7, top_k=50)):
        rows = RowParams.build([s], [torch.Generator().manual_seed(0)], logits.shape[-1], logits.device)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            sample(logits, rows)
            times.append(time.perf_counter() - t)
        print(f"sample on the host, temperature {s.temperature} top_p {s.top_p} top_k {s.top_k}: "
              f"{1e3 * statistics.median(times):.1f} ms per row")


if __name__ == "__main__":
    main()
