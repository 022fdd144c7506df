"""Rank 0's host work per generated token, outside the GPU: detokenization, sampling, a verify's inputs.

    python benchmarks/host_costs.py        # CPU only; uses the demo checkpoint's tokenizer

Detokenization: TextStream (a window of recent ids per token) against re-decoding the whole output on
every token (what it did before), over 2,048 tokens. Sampling: engine.sample on host logits of the
real vocabulary size (248,320): the cost the engine paid per sampled row per token before sampling moved
to the logits' device. A 16-row MTP verify step's inputs (runner/speculative.py `_inputs` and
`_mtp_prepare`, made while the GPU waits: the step is held) against the per-row tensors they were built
from before (`per_row_inputs` below, the same values), on the tiny checkpoint's runner (every rank does it).
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


def per_row_inputs(spec, items, b):
    """How Speculation.verify and _mtp_prepare built a verify's inputs before 2026-12-08: a tensor per row."""
    runner, t = spec.runner, spec.t
    step = torch.zeros((3, b, t), dtype=torch.long)
    length = torch.tensor(runner.length[:b])
    step[1] = (length[:, None] + torch.arange(t)).clamp(max=runner.kv_len - 1)
    step[2] = step[1] + torch.tensor(runner.rope_delta[:b])[:, None]
    for slot, tokens in items:
        step[0, slot] = torch.tensor(tokens + [tokens[-1]] * (t - len(tokens)))
    spec.verify_in[:, :b].copy_(step)
    ids, pos = torch.zeros((b, t), dtype=torch.long), torch.zeros((b, t), dtype=torch.long)
    last = torch.zeros(b, dtype=torch.long)
    rows = [slot for slot, _ in items]
    for r in range(b):
        if r in rows:
            n = spec.pend_n[r]
            ids[r, :n] = torch.tensor(spec.pend_tokens[r] + [int(step[0, r, 0])])
            pos[r] = runner.length[r] - n + torch.arange(t)
            last[r] = n - 1
        else:
            pos[r] = runner.length[r] + torch.arange(t)
    spec.mtp_in[:, :b].copy_(torch.stack([ids, pos.clamp(max=runner.kv_len - 1)]))
    spec.mtp_last[:b].copy_(last)
    spec.mtp_delta[:b].copy_(torch.tensor(runner.rope_delta[:b]))


def verify_inputs(path) -> None:
    from ds_qwen_vision.model import load_model
    from ds_qwen_vision.runner import ModelRunner

    model = load_model(str(path), 1, "cpu", torch.float32, show_progress=False, mtp=True)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=16, max_len=512,
                         speculative={"method": "mtp", "num_tokens": 3})
    spec = runner.spec
    for s in range(16):  # rows in every state: 0..3 drafts accepted last time
        runner.length[s] = 100 + 7 * s
        spec.pend_n[s], spec.pend_tokens[s] = 1 + s % 4, [5] * (s % 4)
    items = [(s, [10 + s]) for s in range(16)]

    def now():
        spec._mtp_prepare(16, [s for s, _ in items], spec._inputs(items, 16))

    def before():
        per_row_inputs(spec, items, 16)

    out = {}
    for name, fn in (("before", before), ("now", now)):
        fn()
        out[name] = [x.clone() for x in (spec.verify_in, spec.mtp_in, spec.mtp_last, spec.mtp_delta)]
        times = []
        for _ in range(300):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name + "_us"] = 1e6 * statistics.median(times[50:])
    same = all(torch.equal(a, b) for a, b in zip(out["before"], out["now"]))
    print(f"a 16-row MTP verify's inputs: {out['now_us']:.0f} us, per-row tensors as before {out['before_us']:.0f} us "
          f"(same values: {same})")


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
    verify_inputs(path)


if __name__ == "__main__":
    main()
