"""Runs step plans on this rank's shard of the model. The same code on every rank.

The server has a fixed number of sequence slots for its whole life. `SlotState` holds the state in tensors
allocated once, sharded like the layers (this rank's heads): the KV blocks of each full-attention layer,
which slots hold through their block tables (rank 0 hands out blocks in the plan: paged KV), and the conv
+ recurrent state of each Gated DeltaNet layer, row r = slot r.
transformers' own layers run the forward; what they see as `past_key_values` is a `CacheView` of some
rows of that state, so no forward allocates or copies a cache.

A step is (1) prefill chunks, each of one slot (a CUDA graph replay per chunk size, or eagerly), then (2)
one decode forward over the rows [0, b) holding every decoding slot, b rounded up to a captured batch
size. Where the step's last chunk is small enough (runner/prefill_graphs.py, MIXED_GRAPH_TOKENS), that
chunk and the decode rows run as one forward instead (`mixed`): the weights are read once for both. On
CUDA that decode is a CUDA graph replay, all-reduces included: one launch instead of ~3,300 kernels
from Python, fewer still with the RMSNorms compiled (compile_norms). Rows that are not decoding this step compute too (shapes are fixed) but leave their state
as it was: GDN state writes are masked per row, and their KV write lands on a position that the row
itself overwrites before it ever attends to it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..kernels import allreduce as peer_allreduce
from ..kernels import gdn as gdn_kernel
from ..kernels.decode_attention import ATTENTION
from ..kernels.layers import install_fused_forwards
from ..kernels.norms import compile_norms
from ..model import agree, log, to_device
from ..plan import FROM_DEVICE, Prefill, StepPlan
from ..tp_policy import tp_group
from . import graphs
from .image_cache import ImageEmbeddingCache
from .prefill_graphs import PREFILL_GRAPH_TOKENS, PrefillGraphs
from .slot_state import CacheView, SlotState
from .snapshots import SnapshotStore
from .warmup import decode_class, prefill_classes, vision_class


def prepare_model(model, device: torch.device, fuse: bool | None = None) -> None:
    """The forwards this runner runs, installed once (the memory planner's profile runs them before the
    runner exists): the paged attention, fused projections and compiled norms (CUDA), the GDN kernels."""
    if getattr(model, "_dsqv_prepared", False):
        return
    model.config.text_config._attn_implementation = ATTENTION  # the language model's layers only
    if device.type == "cuda":
        # cuDNN's SDPA re-plans for every new KV length, ~18 ms of host time per call (measured on
        # H100); the flash / memory-efficient kernels that prefill uses need no planning.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device.type == "cuda" if fuse is None else fuse:
        compile_norms(model)
        install_fused_forwards(model)  # kernels/layers.py: fused projections and elementwise chains
    gdn_kernel.install(model)  # decode (and verify) GDN layers: kernels/gdn.py; prefill: transformers'
    model._dsqv_prepared = True


@dataclass
class PendingPrompt:
    """A prompt being prefilled in chunks: what its chunks' inputs are made from."""
    ids: torch.Tensor                # [1, n] on the device
    positions: torch.Tensor          # [3, 1, n] M-RoPE positions on the device
    image: torch.Tensor | None       # [image tokens, hidden]: the prompt's image embeddings, in order
    image_row: torch.Tensor | None   # [n]: the image row each position takes (-1: a text token)


COMPILED_PREFILL_TOKENS = 2048


class ModelRunner:
    def __init__(self, model, device: torch.device, max_slots: int = 1, max_len: int = 4096,
                 cuda_graphs: bool | None = None, fuse: bool | None = None, allreduce=None,
                 speculative: dict | None = None, prefill_graph_tokens: int | None = None,
                 mixed_prefill: bool = False, num_blocks: int | None = None, block_size: int = 64,
                 kv_fp8: bool = False, state_dtype: torch.dtype = torch.float32):
        self.model = model
        self.device = device
        self.max_slots = max_slots
        self.max_len = max_len
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        prepare_model(model, device, fuse)
        spec = speculative or {}
        spec_method, spec_k = spec.get("method", "none"), spec.get("num_tokens", 0)
        # A verify writes T = k + 1 positions from a slot's length: k positions of slack past max_len.
        self.kv_len = max_len + (spec_k if spec_method != "none" else 0)
        # num_blocks: the planner's (runner/memory.py); None: as many as max_slots sequences of max_len need
        # kv_fp8 / state_dtype: memory.kv_cache_dtype / gdn_state_dtype (the exact cache by default)
        self.state = SlotState(model, max_slots, self.kv_len, device, self.dtype, num_blocks, block_size, kv_fp8,
                               state_dtype)
        self.length = [0] * max_slots      # tokens in each slot's cache
        self.rope_delta = [0] * max_slots  # M-RoPE position minus text position (images shift it)
        self.pending: dict[int, PendingPrompt] = {}  # chunked prefill: each prompt's ids, positions, images
        # Prefix reuse and image embeddings kept across requests; what they hold is the plan's say (rank 0).
        self.snapshots = SnapshotStore(self.state)
        vision = self.config.vision_config
        self.images = ImageEmbeddingCache(vision.out_hidden_size, vision.spatial_merge_size, self.dtype)
        # Decode inputs at fixed addresses, for the graphs: token, cache position, M-RoPE position, active.
        self.step_in = torch.zeros((4, max_slots), dtype=torch.long, device=device)
        # The token each slot feeds next when a plan says FROM_DEVICE: rank 0 samples into it and every
        # rank receives it over the model's group (feed), so no rank's host waits for a token.
        self.next_tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.shapes: set[tuple] = set()  # the shape classes this runner has met (runner/warmup.py)
        # An eager prefill chunk of at least this many tokens runs the compiled norms (_eager_prefill says why);
        # warm-up runs every eager class at its largest length, so they compile there
        self.compiled_prefill_tokens = COMPILED_PREFILL_TOKENS
        gdn = [layer.linear_attn for layer in model.model.language_model.layers if hasattr(layer, "linear_attn")]
        # FLA's q/k L2 norm runs over rows = tokens x key heads (runner/warmup.py)
        self.gdn_heads = (gdn[0].num_k_heads,) if gdn else ()
        self.ready = False           # set once warm-up is over: compilations after it are counted
        self.graphs_at_ready = 0
        self.compiles_after_ready: list[str] = []
        self.counting_compiles = device.type == "cuda" and self._count_triton_compiles()
        self.batch_sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_slots} | {max_slots})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.world > 1:  # config.AllReduceConfig; before capture: the graphs keep the all-reduce installed now
            peer_allreduce.install(allreduce, device, tp_group(self.world), self.world)
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Prefill chunks of up to this many tokens run from fixed buffers (runner/prefill_graphs.py), as
        # CUDA graph replays where graphs are on (at most PREFILL_GRAPH_TOKENS); None: that many on CUDA,
        # eager elsewhere.
        if prefill_graph_tokens is None:
            prefill_graph_tokens = PREFILL_GRAPH_TOKENS if self.cuda_graphs else 0
        limit = min(prefill_graph_tokens, PREFILL_GRAPH_TOKENS, max_len)
        # mixed_prefill: small chunks also run with the decode rows in one forward (limits.mixed_prefill);
        # with one slot no step has both
        mixed = mixed_prefill and spec_method == "none" and max_slots > 1
        self.prefill_graphs = PrefillGraphs(self, limit, mixed=mixed) if limit else None
        self.spec = None  # speculative decoding (runner/speculative.py)
        # the tokens each slot's verify of the last step checked (runner/speculative.VerifiedTokens on CUDA)
        self.verified: Mapping[int, list[int]] = {}
        if spec_method != "none":
            from .speculative import Speculation

            self.spec = Speculation(self, spec_method, spec_k, spec.get("rows"))
        # A capture that fails means eager forwards rather than no service, on every rank alike (`captured`):
        # a replay and an eager forward run other collectives.
        if self.cuda_graphs and not self.captured("decode", self.capture, self.spec and self.spec.capture):
            self.graphs.clear()
            if self.spec is not None:
                self.spec.graphs.clear()
            self.cuda_graphs = False
        if self.cuda_graphs and self.prefill_graphs is not None and \
                not self.captured("prefill", lambda: self.prefill_graphs.capture(self.pool)):
            self.prefill_graphs = None  # exact-length chunks, eagerly

    # ---- decode ---------------------------------------------------------------------------------------
    def decode_inputs(self, b: int):
        """Rows [0, b) of step_in as a decode forward takes them: token ids [b], M-RoPE positions [b], the
        rows' cache view and their attention mask (prefill_graphs.mixed_forward uses them too)."""
        ids, positions, mrope, active = self.step_in[:, :b]
        # b = 1 runs only when slot 0 decodes: no row to mask (144 fewer kernels per step at 64 layers)
        view = CacheView(self.state, slice(0, b), positions=positions, active=active.bool() if b > 1 else None)
        return ids, mrope, view, view.mask()

    def _decode_forward(self, b: int) -> torch.Tensor:
        """One token for rows [0, b): logits [b, 1, vocab]. Reads only step_in, so it can be captured."""
        ids, mrope, view, mask = self.decode_inputs(b)
        return self.model(input_ids=ids[:, None], position_ids=mrope[None, :, None].expand(3, b, 1),
                          past_key_values=view, use_cache=True, logits_to_keep=1,
                          attention_mask={"full_attention": mask, "linear_attention": None}).logits

    def captured(self, what: str, *captures) -> bool:
        """Run `captures` (callables; None skipped): whether they worked on every rank (model.agree).
        graphs.capture_all agrees graph by graph, so the ranks stop capturing at the same graph; this
        agrees on the rest of each capture (its set-up, its synchronize) and on the outcome."""
        error = None
        try:
            for capture in filter(None, captures):
                capture()
        except Exception as e:  # noqa: BLE001 -- this rank's vote is no
            error = e
        if agree(error is None, self.device):
            return True
        log(f"[rank {os.environ.get('RANK', '0')}] {what} CUDA graph capture failed, every rank runs those "
            f"forwards eagerly: {error!r}")
        return False

    @torch.inference_mode()
    def capture(self) -> None:
        """One CUDA graph per decode batch size; all graphs share one memory pool."""
        pool = self.pool = torch.cuda.graph_pool_handle()  # prefill graphs share it (prefill_graphs.py)
        self.step_in.zero_()  # warm-up and capture run with no row active: the state stays as it is
        # largest first: the pool is sized once
        self.graphs = graphs.capture_all({b: lambda b=b: self._decode_forward(b) for b in reversed(self.batch_sizes)},
                                         pool, self.device, warm_runs=2)
        torch.cuda.synchronize()
        log(f"[rank {os.environ.get('RANK', '0')}] captured decode CUDA graphs for batch sizes {self.batch_sizes}")

    @torch.inference_mode()
    def decode(self, tokens: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """One token for each (slot, token): next-token logits per slot ([vocab], float32)."""
        b = next(size for size in self.batch_sizes if size > max(slot for slot, _ in tokens))
        self.shapes.add(decode_class(b))
        self.stage_decode(tokens, b)
        if b in self.graphs:
            graph, logits = self.graphs[b]
            graph.replay()
        else:
            logits = self._decode_forward(b)
        for slot, _ in tokens:
            self.length[slot] += 1
        # one cast for the batch, not one kernel per slot; a copy also in float32, where .float() would
        # return the graph's own output, which the next replay in the step overwrites
        rows = logits[:, -1].to(torch.float32, copy=True)
        return {slot: rows[slot] for slot, _ in tokens}

    def stage_decode(self, tokens: list[tuple[int, int]], b: int) -> None:
        """The decode inputs of rows [0, b) into step_in: token, cache position, M-RoPE position, active."""
        step = torch.zeros((4, b), dtype=torch.long)
        # Idle rows write where their own next token will go (a full slot: its last position; it is done)
        step[1, :] = torch.tensor(self.length[:b]).clamp(max=self.max_len - 1)
        for slot, token in tokens:
            if self.length[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
            step[0, slot], step[2, slot], step[3, slot] = token, self.length[slot] + self.rope_delta[slot], 1
        if self.device.type == "cuda":  # pinned: an asynchronous copy, the host does not wait for the GPU
            step = step.pin_memory()
        self.step_in[:, :b].copy_(step, non_blocking=True)
        if any(token == FROM_DEVICE for _, token in tokens):
            ids = self.step_in[0, :b]
            ids.copy_(torch.where(ids == FROM_DEVICE, self.next_tokens[:b], ids))

    # ---- prefill --------------------------------------------------------------------------------------
    def pixels(self, item: Prefill, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The prompt's image pixels on every rank: rank 0 has them (the engine ran the processor), the
        others receive them over the model's collective group, so every rank encodes the same pixels."""
        if item.pixels_shape is None:  # no images, or none to encode (image cache, restored prefix)
            return None
        if pixel_values is not None:
            pixels = pixel_values.to(self.device, self.dtype)  # the vision tower casts to its dtype anyway
        else:
            pixels = torch.empty(item.pixels_shape, dtype=self.dtype, device=self.device)
        if self.world > 1:
            tdist.broadcast(pixels, src=0)
        return pixels

    @torch.inference_mode()
    def prefill(self, item: Prefill, pixel_values: torch.Tensor | None = None,
                decode: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Prompt tokens [start, end) of one slot: the last token's logits once the prompt is complete (else
        None), and with `decode` (slot, token) rows (see `mixed`) their logits, from the same forward."""
        n_prompt = len(item.input_ids)
        end = n_prompt if item.end is None else item.end
        if n_prompt >= self.max_len:
            raise ValueError(f"prompt of {n_prompt} tokens does not fit a slot of {self.max_len}")
        blocks = item.blocks
        if blocks is None and item.start == 0 and item.restore is None:  # a runner driven without an engine
            blocks = self.state.static_blocks(item.slot)
        if blocks is not None:  # a new sequence's (or snapshot job's) blocks, before anything writes
            if item.copy_blocks:
                self.state.copy_blocks(item.copy_blocks)
            self.state.set_blocks(item.slot, blocks)
        if item.start == 0 or item.restore is not None:  # a new sequence: embeddings + positions, whole prompt
            self.pending[item.slot] = self.prompt_inputs(item, self.pixels(item, pixel_values))
            if item.restore is not None:  # a reused prefix: its state instead of prefilling [0, start)
                self.length[item.slot] = self.snapshots.restore(item.restore, item.slot)
        elif item.slot not in self.pending or item.start != self.length[item.slot]:
            raise ValueError(f"slot {item.slot}: prefill chunk at {item.start} does not continue the prompt")
        # the chunk's embeddings alone: a whole prompt's would hold 10 KiB a token (27B) until its last chunk
        embeds = self.chunk_embeds(item.slot, item.start, end)
        positions = self.pending[item.slot].positions[:, :, item.start:end]
        decoded = {}
        if decode:  # with the decode rows, one forward (runner/prefill_graphs.py, mixed_forward)
            rows = self.max_slots
            self.shapes.add(("prefill-graph-mixed", self.prefill_graphs.mixed_bucket(end - item.start)))
            # the chunk's slot is a row too, inactive: its write at `start` is the chunk's to overwrite
            self.stage_decode(decode, rows)
            out = self.prefill_graphs.run(item.slot, item.start, embeds, positions, mixed=True)
            logits = out[:, :1]
            for slot, _ in decode:
                self.length[slot] += 1
            rows_out = out[0, 1:].to(torch.float32, copy=True)  # a copy: see decode
            decoded = {slot: rows_out[slot] for slot, _ in decode}
            self._after_prefill(item.slot, item.start, end, n_prompt)
        elif self.prefill_graphs is not None and \
                (pieces := self.prefill_graphs.split(end - item.start, self.compiled_prefill_tokens)) is not None:
            self.shapes |= self.chunk_classes(item.start, end - item.start)
            at = 0
            for n in pieces:  # one replay each, the slot's state carried from piece to piece
                start = item.start + at
                logits = self.prefill_graphs.run(item.slot, start, embeds[:, at:at + n], positions[:, :, at:at + n])
                self._after_prefill(item.slot, start, start + n, n_prompt)
                at += n
        else:
            self.shapes |= self.chunk_classes(item.start, end - item.start)
            logits = self._eager_prefill(item, end, embeds, positions)
            self._after_prefill(item.slot, item.start, end, n_prompt)
        self.length[item.slot] = end
        if item.save is not None:  # a position a later prompt may branch from (engine/prefix_cache.py)
            self.snapshots.save(item.save, item.slot, end)
        if item.snapshot_only:
            del self.pending[item.slot]
            return None, decoded
        if end < n_prompt:
            return None, decoded
        del self.pending[item.slot]
        # a copy in every dtype: a graph's output is overwritten by its next replay, maybe in this same step
        # (two prompts' last chunks of one size); .float() of float32 logits would return that output itself
        return logits[0, -1].to(torch.float32, copy=True), decoded

    def _after_prefill(self, slot: int, start: int, end: int, n_prompt: int) -> None:
        """The MTP head's KV over prompt tokens [start, end) of the slot, just run (runner/speculative.py)."""
        if self.spec is not None:
            self.spec.after_prefill(slot, start, end, n_prompt, lambda s, e: self.chunk_embeds(slot, s, e),
                                    self.pending[slot].positions)

    def mixed(self, plan: StepPlan) -> int | None:
        """The index of the prefill item that runs in one forward with the plan's decode rows: its last
        one, where its chunk has a mixed graph size (runner/prefill_graphs.py); None: separate forwards."""
        if not plan.decode or not plan.prefill or self.prefill_graphs is None:
            return None
        item = plan.prefill[-1]
        end = len(item.input_ids) if item.end is None else item.end
        return len(plan.prefill) - 1 if self.prefill_graphs.mixed_bucket(end - item.start) is not None else None

    def chunk_classes(self, start: int, n: int) -> set[tuple]:
        """The shape classes of a prefill chunk (runner/warmup.py): one per graph where a graph runs it."""
        pieces = self.prefill_graphs.split(n, self.compiled_prefill_tokens) if self.prefill_graphs is not None else None
        if pieces is not None:
            return {("prefill-graph", self.prefill_graphs.bucket(p)) for p in pieces}
        return prefill_classes(start, n, self.gdn_heads)

    def _eager_prefill(self, item: Prefill, end: int, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The chunk (embeds [1, n, hidden], positions [3, 1, n]) through the model eagerly, its own shapes:
        logits [1, 1, vocab]."""
        # A first chunk attends to its own keys (SDPA, causal); a continuing one reads the slot's blocks
        # (kernels/decode_attention.py: the decode kernel up to 8 tokens, else the chunk kernel).
        view = CacheView(self.state, slice(item.slot, item.slot + 1), start=item.start)
        mask = view.mask(end - item.start)
        # Compiled code (the RMSNorms, kernels/norms.py) runs eagerly in a short chunk: a compiled call's host
        # time (dynamo's guards, its wrapper) is hidden by a graph replay but paid 209 times by an eager
        # prefill. On one H200 (27B shapes, 2026-12-02) first logits for 512 tokens took 174.7 ms with the
        # compiled norms and 139.3 ms without, in the same run: the host was the bound. From
        # COMPILED_PREFILL_TOKENS on, the GPU's work outlasts that host time and the compiled norms' one kernel
        # each (not ~8, in float32 over the whole chunk) is what counts (docs/benchmarks.md, 2026-12-08).
        eager = end - item.start < self.compiled_prefill_tokens
        with torch.compiler.set_stance("force_eager" if eager else "default"):
            out = self.model(inputs_embeds=embeds, position_ids=positions,
                             past_key_values=view,
                             attention_mask={"full_attention": mask, "linear_attention": None},
                             use_cache=True, logits_to_keep=1)
        return out.logits

    def prompt_inputs(self, item: Prefill, pixels: torch.Tensor | None) -> PendingPrompt:
        """What the prompt's chunks are made of: its ids, the vision tower's image embeddings and which
        position takes which of them, and M-RoPE positions, the way Qwen3_5Model.forward builds them."""
        inner = self.model.model
        ids_host = torch.tensor([item.input_ids])
        image = image_row = None
        if item.image_grid_thw:
            image = self.image_embeddings(item, pixels)
            # image pad token i of the prompt takes image row i, in order (what masked_scatter does)
            is_image = ids_host[0] == self.config.image_token_id
            if int(is_image.sum()) != image.shape[0]:
                raise ValueError(f"slot {item.slot}: {int(is_image.sum())} image tokens, {image.shape[0]} image rows")
            image_row = to_device(torch.where(is_image, is_image.long().cumsum(0) - 1, -1), self.device)
        # M-RoPE positions on the host (they depend on the ids and grids only): reading the position delta
        # off the device would make the host wait for every step in flight.
        mm_types = (ids_host == self.config.image_token_id).int()
        grid_host = torch.tensor(item.image_grid_thw) if item.image_grid_thw else None
        positions, delta = inner.get_rope_index(ids_host, mm_types, image_grid_thw=grid_host)
        self.rope_delta[item.slot] = int(delta.view(-1)[0])
        self.length[item.slot] = 0
        return PendingPrompt(to_device(ids_host, self.device), to_device(positions, self.device), image, image_row)

    def chunk_embeds(self, slot: int, start: int, end: int) -> torch.Tensor:
        """Embeddings of prompt positions [start, end) of slot's pending prompt ([1, n, hidden]): the tokens',
        with the image embeddings at the image pad tokens (no host sync: a gather and a select)."""
        p = self.pending[slot]
        embeds = self.model.model.get_input_embeddings()(p.ids[:, start:end])
        if p.image is None:
            return embeds
        rows = p.image_row[start:end]
        image = p.image.index_select(0, rows.clamp(min=0)).to(embeds.dtype)
        return torch.where((rows >= 0)[None, :, None], image[None], embeds)

    def image_embeddings(self, item: Prefill, pixels: torch.Tensor | None) -> torch.Tensor:
        """Every image's embeddings, in prompt order ([image tokens, hidden]): the vision tower's for the
        images the plan says to encode (their pixels, in order, are `pixels`), the image cache's for the
        others; images inside a restored prefix are never read, so zeros stand in for them."""
        grids = item.image_grid_thw
        sources = item.image_source or ["encode"] * len(grids)
        keys = item.image_keys or [None] * len(grids)
        encode = [i for i, source in enumerate(sources) if source == "encode"]
        encoded = {}
        if encode:
            self.shapes.add(vision_class([grids[i] for i in encode]))
            grid = to_device(torch.tensor([grids[i] for i in encode]), self.device)
            features = self.model.model.get_image_features(pixels, grid, return_dict=True).pooler_output
            for i, embeds in zip(encode, features, strict=True):
                encoded[i] = embeds
                if keys[i] is not None:  # its own storage: a view would keep the whole batch's output alive
                    self.images.put(keys[i], embeds.clone())
        parts = []
        for i, source in enumerate(sources):
            if source == "cache":
                parts.append(self.images.get(keys[i]))
            elif source == "skip":
                parts.append(torch.zeros(self.images.tokens(grids[i]), self.images.hidden, dtype=self.dtype,
                                         device=self.device))
            else:
                parts.append(encoded[i])
        return torch.cat(parts, dim=0)

    # ---- steps ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan: StepPlan, pixels: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Execute one plan; returns the next-token logits ([vocab], float32) of each slot that has one:
        decoded slots, and slots whose prompt is complete. `pixels` (rank 0 only): the image pixels of
        each slot starting a prefill with images."""
        if plan.reset:  # the end of warm-up (runner/warmup.py), on every rank
            self.reset()
            self.ready = True
            self.graphs_at_ready = _dynamo_graphs()
            return {}
        logits = {}
        if plan.accept:  # the previous step's verified tokens that were accepted: before anything else
            self.spec.accept(plan.accept)
        for slot in plan.release:  # ended sequences: their blocks are someone else's from now on
            self.state.table[slot].zero_()
        for snapshot_id in plan.evict_snapshots:  # rank 0 never evicts what this plan restores or saves
            self.snapshots.evict(snapshot_id)
        for key in plan.evict_images:
            self.images.evict(key)
        fused = self.mixed(plan)  # the prefill item that carries the decode rows, if any
        for i, item in enumerate(plan.prefill):
            row, decoded = self.prefill(item, (pixels or {}).get(item.slot), plan.decode if i == fused else None)
            if row is not None:
                logits[item.slot] = row
            logits.update(decoded)
        if plan.decode and fused is None:
            logits.update(self.decode(plan.decode))
        if plan.verify:  # per slot logits [T, vocab]; the tokens verified in self.verified
            rows, self.verified = self.spec.verify(plan.verify)
            logits.update(rows)
        return logits

    @torch.inference_mode()
    def feed(self, slots: list[int], picks: torch.Tensor | None) -> None:
        """The next token of each of `slots` (those this step gave logits to, in that order) into
        next_tokens, on every rank: rank 0 passes its picks (a device tensor, [len(slots)]), the others
        None and receive rank 0's whole next_tokens over the model's group. Called by every rank after
        every step that gave logits (both know which from the plan); no host sync."""
        if picks is not None:
            index = torch.tensor(slots)
            if self.device.type == "cuda":
                index = index.pin_memory()
            self.next_tokens.index_copy_(0, index.to(self.device, non_blocking=True), picks.to(torch.long))
        if self.world > 1:
            tdist.broadcast(self.next_tokens, src=0)

    @torch.inference_mode()
    def reset(self) -> None:
        """Every slot as at start: zero GDN state, no blocks, no length, nothing pending."""
        # KV blocks keep what they hold: no query reads a position its own sequence has not written (zeroing
        # would also make the OS hand a CPU rank every page of the pool)
        state = self.state
        for t in (state.table, state.conv_all, state.rec_all, self.next_tokens, self.step_in):
            t.zero_()
        for t in (state.conv_steps, state.rec_steps):
            if t is not None:
                t.zero_()
        self.length = [0] * self.max_slots
        self.rope_delta = [0] * self.max_slots
        self.pending.clear()

    def _count_triton_compiles(self) -> bool:
        """Record every Triton kernel variant this process loads or compiles after ready: warm-up meant
        there would be none (its cache hook runs on each in-memory miss; returning None compiles)."""
        try:
            from triton import knobs
        except ImportError:  # an older Triton: nothing counted
            return False
        previous = knobs.runtime.jit_cache_hook

        def hook(*args, **kwargs):
            if self.ready:
                self.compiles_after_ready.append(str(kwargs.get("repr", "?"))[:200])
            return previous(*args, **kwargs) if previous is not None else None

        knobs.runtime.jit_cache_hook = hook
        return True

    def status(self) -> dict:
        """This rank's health report: ready, and device memory in use."""
        rank = int(os.environ.get("RANK", "0"))
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            mem = {"allocated_bytes": torch.cuda.memory_allocated(self.device),
                   "peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                   "device_free_bytes": free, "device_total_bytes": total}
        else:
            with open("/proc/self/statm") as f:
                mem = {"rss_bytes": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
        return {"rank": rank, "ready": True, "device": str(self.device), "cuda_graphs": self.cuda_graphs,
                "compiles_after_ready": len(self.compiles_after_ready) if self.counting_compiles else None,
                "graphs_compiled_after_ready": _dynamo_graphs() - self.graphs_at_ready if self.ready else 0,
                "first_compiles_after_ready": self.compiles_after_ready[:3], **mem}


def _dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (the compiled norms)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def follower_loop(runner: ModelRunner, channel) -> None:
    """A follower rank: run every plan rank 0 broadcasts until told to stop."""
    while True:
        plan = channel.broadcast()
        if plan.stop:
            return
        if plan.heartbeat:
            channel.gather(runner.status())
            continue
        logits = runner.run(plan)
        # rank 0's sampled tokens, for the next step (unless rank 0 holds them: the next plan carries them)
        if logits and not plan.hold:
            runner.feed(list(logits), None)
