"""Runs step plans on this rank's shard of the model. The same code on every rank.

The server has a fixed number of sequence slots for its whole life. `SlotState` holds every slot's
state in batched tensors allocated once, row r = slot r, sharded like the layers (this rank's heads):
the KV cache of each full-attention layer and the conv + recurrent state of each Gated DeltaNet layer.
transformers' own layers run the forward; what they see as `past_key_values` is a `CacheView` of some
rows of that state, so no forward allocates or copies a cache.

A step is (1) prefill chunks, each of one slot, run eagerly (their shapes vary), then (2) one decode
forward over the rows [0, b) holding every decoding slot, b rounded up to a captured batch size. On
CUDA that decode is a CUDA graph replay, all-reduces included: one launch instead of ~3,300 kernels
from Python, fewer still with the RMSNorms compiled (compile_norms). Rows that are not decoding this step compute too (shapes are fixed) but leave their state
as it was: GDN state writes are masked per row, and their KV write lands on a position that the row
itself overwrites before it ever attends to it.
"""
from __future__ import annotations

import os
import types

import torch
import torch.distributed as tdist
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .model import log
from .plan import Prefill, StepPlan

ATTENTION = "dsqv_static"


def static_cache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: SDPA for prefill, a GQA-packed matmul attention for decode.

    For one query token over a whole static cache, PyTorch's SDPA picks the memory-efficient kernel,
    which does not split the keys: 550 us per call over 9,472 positions on H200 (36% of a decode
    step, torch.profiler). Two batched matmuls read each key and value once instead. Scores and
    softmax in float32, as SDPA's kernels keep them.
    """
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, n_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, n_heads // kv_heads, dim)  # q head h reads kv head h // group
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # [b, kv_heads, group, len]
    if attention_mask is not None:  # [b, 1, 1, len], True = attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [b, kv_heads, group, dim]
    return out.reshape(b, n_heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION, static_cache_attention)


class SlotState:
    """Every slot's sequence state in batched tensors, allocated once; row r belongs to slot r."""

    def __init__(self, model, max_slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.language_model.layers):
            if hasattr(layer, "linear_attn"):
                gdn = layer.linear_attn  # head counts are this rank's (tp_policy.shard_gated_deltanet)
                self.conv[i] = torch.zeros(max_slots, gdn.conv1d.weight.shape[0], gdn.conv_kernel_size,
                                           dtype=dtype, device=device)
                # float32 like the recurrence kernels' own state (FLA's and transformers' reference)
                self.recurrent[i] = torch.zeros(max_slots, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim,
                                                dtype=torch.float32, device=device)
            else:
                attn = layer.self_attn
                shape = (max_slots, attn.k_proj.weight.shape[0] // attn.head_dim, max_len, attn.head_dim)
                self.kv[i] = (torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device))
        # Decode runs causal_conv1d_update, which shifts the conv state in place for every row: it
        # shifts this copy, and only the decoding rows are written back.
        any_conv = next(iter(self.conv.values()), None)
        self.conv_scratch = torch.zeros_like(any_conv) if any_conv is not None else None

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + list(self.conv.values()) + list(self.recurrent.values())
        return sum(t.numel() * t.element_size() for t in tensors)


class CacheView:
    """The `past_key_values` transformers' layers see: rows of SlotState.

    Prefill: one row, prompt tokens [start, start + n) (start > 0 continues a chunked prefill).
    Decode: rows [0, b), one token each, written at `positions`; with `active`, only those rows keep
    their new GDN state (None: every row decodes). Implements the part of transformers' Cache
    interface that Qwen3.5 layers call.
    """

    def __init__(self, state: SlotState, rows: slice, start: int = 0, positions: torch.Tensor | None = None,
                 active: torch.Tensor | None = None):
        self.state, self.rows, self.start, self.positions = state, rows, start, positions
        self.active = active
        if positions is not None:
            self.batch_index = torch.arange(rows.stop - rows.start, device=positions.device)

    # full-attention layers
    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = (t[self.rows] for t in self.state.kv[layer_idx])
        if self.positions is None:
            end = self.start + key.shape[2]
            keys[:, :, self.start:end] = key
            values[:, :, self.start:end] = value
            return keys[:, :, :end], values[:, :, :end]
        keys[self.batch_index, :, self.positions] = key[:, :, 0]
        values[self.batch_index, :, self.positions] = value[:, :, 0]
        return keys, values

    # Gated DeltaNet layers
    def is_recording_past(self, layer_idx) -> bool:
        return False

    def get_conv_state(self, layer_idx, state_idx=0):
        if self.active is not None:
            scratch = self.state.conv_scratch[self.rows]
            scratch.copy_(self.state.conv[layer_idx][self.rows])
            return scratch
        return self.state.conv[layer_idx][self.rows] if self.positions is not None or self.start > 0 else None

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.state.recurrent[layer_idx][self.rows] if self.positions is not None or self.start > 0 else None

    def update_conv_state(self, new, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        """Prefill: the window the causal conv needs (left context + new), keeping its last kernel columns."""
        conv = self.state.conv[layer_idx][self.rows]
        if self.start > 0:
            full = torch.cat([conv, new], dim=-1)
        else:  # a new sequence: zeros on the left are the conv's own causal padding
            full = torch.nn.functional.pad(new, (max(0, conv.shape[-1] - new.shape[-1]), 0))
        conv.copy_(full[..., -conv.shape[-1]:])
        return full

    def update_recurrent_state(self, new, layer_idx, state_idx=0, **kwargs):
        recurrent = self.state.recurrent[layer_idx][self.rows]
        if self.active is None:
            recurrent.copy_(new)
            return recurrent
        keep = self.active.view(-1, 1, 1, 1)
        torch.where(keep, new, recurrent, out=recurrent)
        conv = self.state.conv[layer_idx][self.rows]  # this layer's conv step is done by now
        torch.where(keep.view(-1, 1, 1), self.state.conv_scratch[self.rows], conv, out=conv)
        return recurrent


def compile_norms(model) -> None:
    """torch.compile the language model's RMSNorms: ~8 elementwise kernels each become one.

    A token passes 209 of them (2 per layer, q/k norms, the GDN output norm, the final one): about
    half of the ~3,300 kernels of a decode step. All instances of a class share one compiled graph
    (transformers' modules are inlined, their weights are inputs), with dynamic batch/sequence sizes,
    so compilation happens once per class and shape rank, not per layer or per prompt length.
    """
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm, Qwen3_5RMSNormGated

    # One compiled function per class: Module.compile() would compile the shared Module._call_impl, and
    # all classes and shapes together would exhaust dynamo's recompile limit (8 per code object).
    # Each class still sees a few variants (3D / 4D inputs, size-1 batch or sequence specialised).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = {}
    for module in model.model.language_model.modules():
        cls = type(module)
        if cls in (Qwen3_5RMSNorm, Qwen3_5RMSNormGated):
            if cls not in compiled:
                compiled[cls] = torch.compile(cls.forward, dynamic=True)
            module.forward = types.MethodType(compiled[cls], module)


class ModelRunner:
    def __init__(self, model, device: torch.device, max_slots: int = 1, max_len: int = 4096,
                 cuda_graphs: bool | None = None, fuse: bool | None = None):
        self.model = model
        self.device = device
        self.max_slots = max_slots
        self.max_len = max_len
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        model.config.text_config._attn_implementation = ATTENTION  # the language model's layers only
        if device.type == "cuda":
            # cuDNN's SDPA re-plans for every new KV length, ~18 ms of host time per call (measured on
            # H100); the flash / memory-efficient kernels that prefill uses need no planning.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if device.type == "cuda" if fuse is None else fuse:
            compile_norms(model)
        self.state = SlotState(model, max_slots, max_len, device, self.dtype)
        self.length = [0] * max_slots      # tokens in each slot's cache
        self.rope_delta = [0] * max_slots  # M-RoPE position minus text position (images shift it)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # chunked prefill: embeds, positions
        # Decode inputs at fixed addresses, for the graphs: token, cache position, M-RoPE position, active.
        self.step_in = torch.zeros((4, max_slots), dtype=torch.long, device=device)
        self.key_index = torch.arange(max_len, device=device)
        self.batch_sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_slots} | {max_slots})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs:
            try:
                self.capture()
            except Exception as e:  # serve eagerly rather than not at all; every rank takes the same path
                log(f"[rank {os.environ.get('RANK', '0')}] CUDA graph capture failed, decoding eagerly: {e!r}")
                self.graphs.clear()
                self.cuda_graphs = False

    # ---- decode ---------------------------------------------------------------------------------------
    def _decode_forward(self, b: int) -> torch.Tensor:
        """One token for rows [0, b): logits [b, 1, vocab]. Reads only step_in, so it can be captured."""
        ids, positions, mrope, active = self.step_in[:, :b]
        # b = 1 runs only when slot 0 decodes: no row to mask (144 fewer kernels per step at 64 layers)
        view = CacheView(self.state, slice(0, b), positions=positions, active=active.bool() if b > 1 else None)
        mask = (self.key_index[None, :] <= positions[:, None])[:, None, None, :]
        return self.model(input_ids=ids[:, None], position_ids=mrope[None, :, None].expand(3, b, 1),
                          past_key_values=view, use_cache=True, logits_to_keep=1,
                          attention_mask={"full_attention": mask, "linear_attention": None}).logits

    @torch.inference_mode()
    def capture(self) -> None:
        """One CUDA graph per decode batch size; all graphs share one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        self.step_in.zero_()  # warm-up and capture run with no row active: the state stays as it is
        for b in reversed(self.batch_sizes):  # largest first: the pool is sized once
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on the capture stream (allocator, NCCL, Triton autotune)
                for _ in range(2):
                    self._decode_forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_forward(b)
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize()
        log(f"[rank {os.environ.get('RANK', '0')}] captured decode CUDA graphs for batch sizes {self.batch_sizes}")

    @torch.inference_mode()
    def decode(self, tokens: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """One token for each (slot, token): next-token logits per slot ([vocab], float32)."""
        b = next(size for size in self.batch_sizes if size > max(slot for slot, _ in tokens))
        step = torch.zeros((4, b), dtype=torch.long)
        # Idle rows write where their own next token will go (a full slot: its last position; it is done)
        step[1, :] = torch.tensor(self.length[:b]).clamp(max=self.max_len - 1)
        for slot, token in tokens:
            if self.length[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
            step[0, slot], step[2, slot], step[3, slot] = token, self.length[slot] + self.rope_delta[slot], 1
        self.step_in[:, :b].copy_(step)
        if b in self.graphs:
            graph, logits = self.graphs[b]
            graph.replay()
        else:
            logits = self._decode_forward(b)
        for slot, _ in tokens:
            self.length[slot] += 1
        rows = logits[:, -1].float()  # one cast for the batch, not one kernel per slot
        return {slot: rows[slot] for slot, _ in tokens}

    # ---- prefill --------------------------------------------------------------------------------------
    def pixels(self, item: Prefill, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The prompt's image pixels on every rank: rank 0 has them (the engine ran the processor), the
        others receive them over the model's collective group, so every rank encodes the same pixels."""
        if not item.image_grid_thw:
            return None
        if pixel_values is not None:
            pixels = pixel_values.to(self.device, self.dtype)  # the vision tower casts to its dtype anyway
        else:
            pixels = torch.empty(item.pixels_shape, dtype=self.dtype, device=self.device)
        if self.world > 1:
            tdist.broadcast(pixels, src=0)
        return pixels

    @torch.inference_mode()
    def prefill(self, item: Prefill, pixel_values: torch.Tensor | None = None) -> torch.Tensor | None:
        """Prompt tokens [start, end) of one slot; the last token's logits once the prompt is complete."""
        n_prompt = len(item.input_ids)
        end = n_prompt if item.end is None else item.end
        if n_prompt >= self.max_len:
            raise ValueError(f"prompt of {n_prompt} tokens does not fit a slot of {self.max_len}")
        if item.start == 0:  # a new sequence: embeddings (images merged in) and positions for the whole prompt
            self.pending[item.slot] = self.prompt_inputs(item, self.pixels(item, pixel_values))
        elif item.slot not in self.pending or item.start != self.length[item.slot]:
            raise ValueError(f"slot {item.slot}: prefill chunk at {item.start} does not continue the prompt")
        embeds, positions = self.pending[item.slot]
        mask = None  # from the start of the cache: plain causal attention (SDPA's is_causal)
        if item.start > 0:
            rows = torch.arange(item.start, end, device=self.device)
            mask = (self.key_index[None, :end] <= rows[:, None])[None, None]
        out = self.model(inputs_embeds=embeds[:, item.start:end], position_ids=positions[:, :, item.start:end],
                         past_key_values=CacheView(self.state, slice(item.slot, item.slot + 1), start=item.start),
                         attention_mask={"full_attention": mask, "linear_attention": None},
                         use_cache=True, logits_to_keep=1)
        self.length[item.slot] = end
        if end < n_prompt:
            return None
        del self.pending[item.slot]
        return out.logits[0, -1].float()

    def prompt_inputs(self, item: Prefill, pixels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the vision tower's image embeddings merged in, and M-RoPE positions,
        the way Qwen3_5Model.forward builds them, for the whole prompt."""
        inner = self.model.model
        ids = torch.tensor([item.input_ids], device=self.device)
        embeds = inner.get_input_embeddings()(ids)
        grid = None
        if pixels is not None:
            grid = torch.tensor(item.image_grid_thw, device=self.device)
            image = torch.cat(inner.get_image_features(pixels, grid, return_dict=True).pooler_output, dim=0)
            image_mask, _ = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image)
            embeds = embeds.masked_scatter(image_mask, image.to(embeds.dtype))
        mm_types = (ids == self.config.image_token_id).int()
        positions, delta = inner.get_rope_index(ids, mm_types, image_grid_thw=grid)
        self.rope_delta[item.slot] = int(delta.view(-1)[0])
        self.length[item.slot] = 0
        return embeds, positions

    # ---- steps ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan: StepPlan, pixels: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Execute one plan; returns the next-token logits ([vocab], float32) of each slot that has one:
        decoded slots, and slots whose prompt is complete. `pixels` (rank 0 only): the image pixels of
        each slot starting a prefill with images."""
        logits = {}
        for item in plan.prefill:
            row = self.prefill(item, (pixels or {}).get(item.slot))
            if row is not None:
                logits[item.slot] = row
        if plan.decode:
            logits.update(self.decode(plan.decode))
        return logits

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
        return {"rank": rank, "ready": True, "device": str(self.device), "cuda_graphs": self.cuda_graphs, **mem}


def follower_loop(runner: ModelRunner, channel) -> None:
    """A follower rank: run every plan rank 0 broadcasts until told to stop."""
    while True:
        plan = channel.broadcast()
        if plan.stop:
            return
        if plan.heartbeat:
            channel.gather(runner.status())
            continue
        runner.run(plan)
