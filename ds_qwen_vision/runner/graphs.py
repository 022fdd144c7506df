"""How the runner captures each of its CUDA graphs (decode, prefill chunks, mixed steps, speculative verify)."""
from __future__ import annotations

import torch


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
