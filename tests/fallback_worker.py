"""One CPU rank for tests/test_agreed_fallbacks.py (started by tests/ranks.py under the deepspeed launcher).

CPU has no CUDA graphs, so a stand-in captures them (runner/graphs.capture replaced, as in
test_prefill_graphs): a capture runs the graph's function (its warm runs, then the run a capture records,
all-reduces included) and a replay runs it again. On rank 1 alone one graph of a set fails at the end of
its capture (where CUBLAS_STATUS_ALLOC_FAILED surfaces); rank 0 captures everything. For each set
(decode, prefill, mixed) the runner is built with graphs on, then runs three sequences that join and
leave; saved per set: which graphs this rank kept, and the greedy tokens.
"""
import json
import sys

import torch

from ds_qwen_vision.model import chat_inputs, init_distributed, load_model, load_processor
from ds_qwen_vision.runner import ModelRunner, graphs
from driver import ReplayedGraph, drive

# max_slots 3: decode graphs for batches 3, 2, 1, then prefill graphs for chunks of 64, 32, 16, then mixed
# graphs of the same sizes. Rank 1's failing capture, counted from 0: the second graph of each set.
FAIL_AT = {"decode": 1, "prefill": 4, "mixed": 7}


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    rank, world = init_distributed("cpu")
    model = load_model(spec["model"], world, "cpu", torch.float32, show_progress=False)
    processor = load_processor(spec["model"])
    x = [chat_inputs(processor, c["messages"], [open(p, "rb").read() for p in c["images"]]) for c in spec["cases"]]
    jobs = [(0, x[0]), (1, x[1]), (3, x[2])]  # the third joins while the others decode: a mixed step
    torch.cuda.graph_pool_handle = lambda: None
    torch.cuda.synchronize = lambda *a, **k: None
    result = {}
    for name, fail_at in FAIL_AT.items():
        calls = []

        def fake_capture(fn, pool, warm_runs=1):
            for _ in range(warm_runs):
                fn()
            out = fn()
            calls.append(fn)
            if rank == 1 and len(calls) - 1 == fail_at:
                raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED (injected by the test)")
            return ReplayedGraph(fn, out), out

        graphs.capture = fake_capture
        runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256, cuda_graphs=True,
                             prefill_graph_tokens=64, mixed_prefill=True)
        pg = runner.prefill_graphs
        result[name] = {
            "captures": len(calls),
            "decode": sorted(runner.graphs) if runner.cuda_graphs else None,
            "prefill": sorted(pg.graphs) if pg is not None else None,
            "mixed": sorted(pg.mixed_graphs) if pg is not None else None,
            "tokens": drive(runner, jobs, spec["new_tokens"], chunk=6),
            "shapes": sorted({c[0] for c in runner.shapes}),
        }
    torch.save(result, f"{spec['out']}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
