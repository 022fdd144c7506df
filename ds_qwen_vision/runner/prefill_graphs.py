"""Prefill chunks as CUDA graph replays: one graph per chunk size (bucket), for every slot and start.

Why: an eager prefill forward is bound by host time. On one H200 (27B shapes, tp=1, 2026-12-02) a
64-token chunk took 124 ms and a 2048-token one 235 ms: ~110 ms of Python, dispatch and FLA's host-side
setup whatever the length, against ~13 ms to read the weights once. A replay launches the same kernels
in microseconds of host time.

How: a chunk of n tokens runs in the smallest bucket T >= n (16, 32, .., 256, then multiples of 256
up to PREFILL_GRAPH_TOKENS); a longer one as pieces of the largest bucket's size and the rest, one replay
each (`split`), below model_runner.COMPILED_PREFILL_TOKENS, and eagerly from there. Its inputs are copied into buffers at fixed addresses:
the embeddings (image embeddings already merged), M-RoPE positions, the cache positions it writes, the
slot (a tensor, so the graph does not depend on it), the conv window to keep and the index of the last
real token. Positions n..T-1 are padding: zero embeddings; their KV lands past the prompt's end, where
the slot writes again before it ever attends to it (as an idle decode row's does); in the Gated
DeltaNet layers their beta and decay are zero, so the state is as after the n real tokens
(kernels/gdn.py `gdn_chunk`). Full attention reads the slot's KV blocks through its block table, each
query up to its own position, so one graph serves a first chunk and a continuing one alike
(kernels/chunk_attention.py reads only the key tiles below the block's last query).

Chunks of up to MIXED_GRAPH_TOKENS also have a mixed graph (`mixed_forward`): the chunk followed by one
token for every slot as a decode row, so that a step which prefills while streams decode is one forward.

Without CUDA (tests) or for a size with no graph, `forward` runs the same function eagerly: the path a
graph captures is the path the CPU tests check against the eager prefill (tests/test_prefill_graphs.py).
"""
from __future__ import annotations

import os

import torch

from ..model import log
from ..kernels.decode_attention import MixedMask
from . import graphs
from .slot_state import MixedView, PrefillView


# The largest graph; a longer chunk runs as pieces (`split`) or eagerly. Measured on one H200 (27B shapes,
# tp=1, cache 9,472 positions, 2026-12-02): 512 text tokens 84 ms as a graph against 138 eagerly, but a
# 1,290-token image prompt 255 against 213: a graph's attention reads the slot's whole cache (masked), and
# its chunk is padded to 1,536; at that size those cost more than the ~110 ms of host time a replay saves
# (the eager path attends with SDPA's flash kernel over the chunk's own keys). The limit sits below the
# size measured to lose; 1024 itself is not measured on its own. Since then kernels/chunk_attention.py reads
# only the keys below the chunk's end (a 512-token chunk's 16 attention calls: 87 us each against SDPA's 836),
# which removes the first of those two costs; a higher limit is not re-measured.
PREFILL_GRAPH_TOKENS = 1024


# Chunks of at most this many tokens also have a mixed graph (`mixed`): the chunk and one token for every
# decode row in one forward, so that a step which prefills while streams decode reads the weights once
# (vLLM's chunked prefill does the same). A gap-bound prefill budget (limits.max_gap_steps) is one of these
# sizes: on one H200 (27B, tp=1, 2026-12-02) a 64-token chunk took 30.6 ms beside a 19.8 ms decode step,
# and the bound of 3 decode steps left room for no larger chunk when the two ran as separate forwards.
MIXED_GRAPH_TOKENS = 256


def _stance(graphed: bool):
    """A graph's forward runs the compiled norms (kernels/norms.py: one kernel each instead of ~8): a replay
    pays none of their host time, which is why an eager chunk below model_runner.COMPILED_PREFILL_TOKENS runs
    them eagerly (model_runner.ModelRunner._eager_prefill says why); so does this forward without a graph. The
    warm runs before each capture compile them (graphs.capture), at start-up."""
    return torch.compiler.set_stance("default" if graphed else "force_eager")


def buckets(max_tokens: int) -> list[int]:
    """Chunk sizes with a graph: powers of two from 16 below 256, then every multiple of 256 up to the
    first one >= max_tokens: padding wastes at most 255 tokens of compute (~20 ms on the 27B at tp=1), and
    each graph costs start-up time (~1.5 s for the 27B)."""
    small = [16, 32, 64, 128]
    if max_tokens <= 128:
        return [t for t in small if t < max_tokens] + [next(t for t in small if t >= max_tokens)]
    return small + list(range(256, -(-max_tokens // 256) * 256 + 1, 256))


class PrefillGraphs:
    def __init__(self, runner, max_tokens: int, mixed: bool = True):
        self.runner = runner
        self.buckets = buckets(max_tokens)
        top = self.buckets[-1]
        device, config = runner.device, runner.config.text_config
        self.embeds = torch.zeros((1, top, config.hidden_size), dtype=runner.dtype, device=device)
        self.positions = torch.zeros((3, 1, top), dtype=torch.long, device=device)
        k = runner.state.conv_shape[1]
        # one long buffer, one host-to-device copy: cache positions [top] | conv window [k] | slot | last
        self.index = torch.zeros(top + k + 2, dtype=torch.long, device=device)
        self.k = k
        self.arange = torch.arange(top, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None]] = {}
        # Mixed chunk sizes (MIXED_GRAPH_TOKENS); none with speculative decoding, whose steps verify drafts.
        self.mixed = [t for t in self.buckets if t <= MIXED_GRAPH_TOKENS] if mixed else []
        self.mixed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, n: int) -> int | None:
        return next((t for t in self.buckets if t >= n), None)

    def split(self, n: int, eager_from: int) -> list[int] | None:
        """How a chunk of n tokens runs as graph replays: [n] where one graph takes it; a chunk longer than the
        largest graph but shorter than `eager_from` tokens as pieces of the largest graph's size and the rest
        (an eager forward that size is bound by its host time: a 1,105-token image prompt's first token took
        401 ms on one H100 against 188 ms for a 1,024-token text one through a graph, 2026-12-08); None: the
        chunk runs eagerly (from `eager_from` tokens its GPU time hides the host's)."""
        if self.bucket(n) is not None:
            return [n]
        top = self.buckets[-1]
        if n >= eager_from:
            return None
        return [top] * (n // top) + ([n % top] if n % top else [])

    def mixed_bucket(self, n: int) -> int | None:
        return next((t for t in self.mixed if t >= n), None)

    def _chunk(self, t: int):
        """The chunk in the buffers' first t positions: its cache view, its attention mask (the slot's blocks,
        each query up to its position) and the index of its last real token ([1])."""
        runner, top = self.runner, self.buckets[-1]
        cache_pos, conv_index = self.index[:t], self.index[top:top + self.k]
        slot, last = self.index[top + self.k:top + self.k + 1], self.index[top + self.k + 1:]
        view = PrefillView(runner.state, slot, cache_pos, (self.arange[:t] <= last).float(), conv_index)
        return view, view.mask(), last

    def mixed_forward(self, t: int, graphed: bool = False) -> torch.Tensor:
        """The chunk in the buffers' first t positions followed by one token for every slot as a decode row
        (the runner's step_in, as its decode graphs read it; rows not decoding are inactive): logits
        [1, 1 + slots, vocab], the chunk's last real token first. Reads only buffers, so it can be captured.
        `graphed`: for a graph (its warm runs and capture), so with the compiled norms (`_stance`)."""
        runner, rows = self.runner, self.runner.max_slots
        chunk, chunk_mask, last = self._chunk(t)
        ids, mrope, decode, decode_mask = runner.decode_inputs(rows)
        mask = MixedMask(chunk_mask, decode_mask, t)
        embeds = torch.cat([self.embeds[:, :t], runner.model.get_input_embeddings()(ids)[None]], dim=1)
        position_ids = torch.cat([self.positions[:, :, :t], mrope.view(1, 1, rows).expand(3, 1, rows)], dim=2)
        keep = torch.cat([last, t + torch.arange(rows, device=last.device)])
        with _stance(graphed):
            return runner.model(inputs_embeds=embeds, position_ids=position_ids, past_key_values=MixedView(chunk, decode, t),
                                attention_mask={"full_attention": mask, "linear_attention": None},
                                use_cache=True, logits_to_keep=keep).logits

    def forward(self, t: int, graphed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk in the buffers' first t positions: the last real token's logits [1, 1, vocab] and, with
        an MTP head, the final norm's output [1, t, hidden]. Reads only the buffers, so it can be captured.
        `graphed`: for a graph (its warm runs and capture), so with the compiled norms (`_stance`)."""
        runner = self.runner
        view, mask, last = self._chunk(t)
        with _stance(graphed):
            logits = runner.model(inputs_embeds=self.embeds[:, :t], position_ids=self.positions[:, :, :t],
                                  past_key_values=view, attention_mask={"full_attention": mask, "linear_attention": None},
                                  use_cache=True, logits_to_keep=last).logits
        return logits, runner.spec.hidden if runner.spec is not None else None

    def run(self, slot: int, start: int, embeds: torch.Tensor, positions: torch.Tensor,
            mixed: bool = False) -> torch.Tensor:
        """Prompt tokens [start, start + n) of `slot` (embeds [1, n, hidden], positions [3, 1, n]): the last
        one's logits [1, 1, vocab]; the slot's KV and GDN state as after an eager prefill of the chunk.
        `mixed`: with the decode rows the runner staged in step_in (mixed_forward): [1, 1 + slots, vocab]."""
        runner, top = self.runner, self.buckets[-1]
        n = embeds.shape[1]
        t = self.mixed_bucket(n) if mixed else self.bucket(n)
        if start == 0:  # a new sequence starts from zero state (the eager path ignores what the row held)
            runner.state.conv_all[:, slot].zero_()
            runner.state.rec_all[:, slot].zero_()
        self.embeds[:, :n].copy_(embeds)
        self.embeds[:, n:t].zero_()
        self.positions[:, :, :n].copy_(positions)
        self.positions[:, :, n:t].zero_()
        host = torch.zeros(top + self.k + 2, dtype=torch.long)
        host[:t] = torch.arange(start, start + t).clamp(max=runner.kv_len - 1)
        host[top:top + self.k] = torch.arange(n, n + self.k)  # columns of [state (k) | chunk]
        host[top + self.k], host[top + self.k + 1] = slot, n - 1
        if runner.device.type == "cuda":
            host = host.pin_memory()
        self.index.copy_(host, non_blocking=True)
        if mixed:  # no MTP head here (speculative steps never mix)
            if t in self.mixed_graphs:
                graph, logits = self.mixed_graphs[t]
                graph.replay()
                return logits
            return self.mixed_forward(t)
        if t in self.graphs:
            graph, logits, hidden = self.graphs[t]
            graph.replay()
        else:
            logits, hidden = self.forward(t)
        if runner.spec is not None:  # the MTP head reads the real tokens' hidden states (after_prefill)
            runner.spec.hidden = hidden[:, :n]
        return logits

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """One graph per bucket, largest first (the pool is sized once), into the decode graphs' pool: a
        step runs them one after another, and each one's outputs are read before the next runs."""
        runner = self.runner
        self.index.zero_()  # slot 0 from position 0, one real token; warm-up's reset zeroes what this writes
        captured = graphs.capture_all({t: lambda t=t: self.forward(t, graphed=True) for t in reversed(self.buckets)},
                                      pool, runner.device)
        self.graphs = {t: (graph, logits, hidden) for t, (graph, (logits, hidden)) in captured.items()}
        runner.step_in.zero_()  # the mixed graphs' decode rows: none active, so no row's state moves
        try:
            self.mixed_graphs = graphs.capture_all(
                {t: lambda t=t: self.mixed_forward(t, graphed=True) for t in reversed(self.mixed)}, pool, runner.device)
        except graphs.CaptureFailed as e:  # raised on every rank alike: separate forwards on every rank
            log(f"[rank {os.environ.get('RANK', '0')}] mixed prefill CUDA graph capture failed, prefill and "
                f"decode run as separate forwards: {e}")
            self.mixed, self.mixed_graphs = [], {}
        torch.cuda.synchronize()
        runner.state.conv_all[:, 0].zero_()
        runner.state.rec_all[:, 0].zero_()
        log(f"[rank {os.environ.get('RANK', '0')}] captured prefill CUDA graphs for chunks of {self.buckets} tokens"
            + (f", and with the decode rows for chunks of {self.mixed}" if self.mixed else ""))
