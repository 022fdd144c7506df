"""How the runner captures each of its CUDA graphs (decode, prefill chunks, mixed steps, speculative verify)."""
from __future__ import annotations

import torch

from ..model import agree


def capture(fn, pool, warm_runs: int = 1):
    """`fn()` (a forward that reads only fixed buffers) as a CUDA graph in memory pool `pool`, after
    `warm_runs` eager runs on the capture stream, so that what must not happen inside a capture happens
    before it (cuBLAS workspaces, the allocator's blocks, Triton's autotuning, NCCL's setup). Returns (the
    graph, what `fn` returned inside the capture): output tensors that every replay refills in place."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm_runs):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CaptureFailed(RuntimeError):
    """A graph did not capture on some rank; raised on every rank, at the same graph."""


def capture_all(fns: dict, pool, device: torch.device, warm_runs: int = 1) -> dict:
    """{key: capture(fn)} for each (key, fn) of `fns`, in order, agreed graph by graph by every rank.

    A capture can fail on one rank alone (CUBLAS_STATUS_ALLOC_FAILED under memory pressure). Each graph's
    warm runs are collectives: a rank that stopped at its failure while its peers went on to the next
    graph would leave them waiting in an all-reduce. So after each graph the ranks agree (model.agree)
    whether all of them have it, and all raise CaptureFailed at the same graph: one fallback for all."""
    out, error = {}, None
    for key, fn in fns.items():
        try:
            out[key] = capture(fn, pool, warm_runs)
        except Exception as e:  # noqa: BLE001 -- any failure: this rank's vote is no
            error = e
        if not agree(error is None, device):
            raise CaptureFailed(f"graph {key}: {error!r}" if error else f"graph {key} failed on another rank") \
                from error
    return out
