"""Runs step plans on this rank's shard of the model. The same code on every rank.

The server has a fixed number of sequence slots for its whole life. Each slot owns a transformers
StaticCache (KV for the full-attention layers, conv + recurrent state for the Gated DeltaNet layers,
allocated once with this rank's head counts, i.e. sharded like the layers) and, on CUDA, a captured
CUDA graph of one decode step over that cache, all-reduces included. A decode step then costs one
graph replay instead of ~3,300 kernel launches from Python. Prefill runs eagerly (its shapes vary).
Forward passes are transformers' own, with M-RoPE positions from the model's get_rope_index.
"""
from __future__ import annotations

import os

import torch
from transformers import StaticCache

from .model import log, open_image
from .plan import Prefill, StepPlan


class Slot:
    def __init__(self, cache: StaticCache, device: torch.device):
        self.cache = cache
        self.rope_delta = torch.zeros((), dtype=torch.long, device=device)  # M-RoPE minus text position
        self.length = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None  # the graph's output buffer, [1, 1, vocab]


class ModelRunner:
    def __init__(self, model, processor, device: torch.device, max_slots: int = 1, max_len: int = 4096,
                 cuda_graphs: bool | None = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_len = max_len
        self.image_token_id = model.config.image_token_id
        if device.type == "cuda":
            # cuDNN's SDPA re-plans for every new KV length, ~18 ms of host time per attention call in
            # decode (measured on H100); flash / memory-efficient SDPA need no planning.
            torch.backends.cuda.enable_cudnn_sdp(False)
        text_config = model.config.text_config
        self.slots = [Slot(StaticCache(config=text_config, max_cache_len=max_len), device) for _ in range(max_slots)]
        # Decode inputs live at fixed addresses so that captured graphs can read them.
        self.decode_ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.decode_pos = torch.zeros((3, 1, 1), dtype=torch.long, device=device)
        with torch.inference_mode():
            for slot in range(max_slots):  # transformers allocates cache tensors on first use: do it now
                self.prefill(Prefill(slot, [0]))
                self.decode(slot, 0)
                self.slots[slot].cache.reset()
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs:
            try:
                self.capture()
            except Exception as e:  # serve eagerly rather than not at all; every rank takes the same path
                log(f"[rank {os.environ.get('RANK', '0')}] CUDA graph capture failed, decoding eagerly: {e!r}")
                with torch.inference_mode():
                    for slot in self.slots:
                        slot.graph = slot.graph_logits = None
                        slot.cache.reset()
                self.cuda_graphs = False

    @torch.inference_mode()
    def capture(self) -> None:
        """One CUDA graph per slot for a decode step; all graphs share one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for i, slot in enumerate(self.slots):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on the capture stream (allocator, NCCL, Triton autotune)
                for _ in range(2):
                    self._forward_decode(slot)
            torch.cuda.current_stream().wait_stream(stream)
            slot.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(slot.graph, pool=pool):
                slot.graph_logits = self._forward_decode(slot)
            slot.cache.reset()  # the warm-up wrote into the cache
            slot.length = 0
        torch.cuda.synchronize()
        log(f"[rank {os.environ.get('RANK', '0')}] captured decode CUDA graphs for {len(self.slots)} slot(s)")

    def image_inputs(self, images: list[bytes]) -> dict:
        """The checkpoint's image processor on the plan's bytes: identical pixels on every rank."""
        out = self.processor.image_processor(images=[open_image(b) for b in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device),
                "image_grid_thw": out["image_grid_thw"].to(self.device)}

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Execute one plan; returns each stepped slot's next-token logits ([vocab], float32)."""
        logits = {}
        for item in plan.prefill:
            logits[item.slot] = self.prefill(item)
        for slot, token in plan.decode:
            logits[slot] = self.decode(slot, token)
        return logits

    @torch.inference_mode()
    def prefill(self, item: Prefill) -> torch.Tensor:
        slot = self.slots[item.slot]
        if len(item.input_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(item.input_ids)} tokens does not fit a slot of {self.max_len}")
        slot.cache.reset()  # a slot is reused: nothing of the previous sequence may leak in
        ids = torch.tensor([item.input_ids], device=self.device)
        mm_types = (ids == self.image_token_id).int()
        image_kwargs = self.image_inputs(item.images) if item.images else {}
        positions, delta = self.model.model.get_rope_index(ids, mm_types, image_grid_thw=image_kwargs.get("image_grid_thw"))
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=slot.cache, use_cache=True,
                         mm_token_type_ids=mm_types, logits_to_keep=1, **image_kwargs)
        slot.rope_delta.copy_(delta.view(()))
        slot.length = ids.shape[1]
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, slot_id: int, token: int) -> torch.Tensor:
        slot = self.slots[slot_id]
        if slot.length >= self.max_len:
            raise ValueError(f"slot {slot_id} is full ({self.max_len} tokens)")
        self.decode_ids.fill_(token)
        self.decode_pos.copy_((slot.rope_delta + slot.length).expand(3, 1, 1))
        if slot.graph is not None:
            slot.graph.replay()
            logits = slot.graph_logits
        else:
            logits = self._forward_decode(slot)
        slot.length += 1
        return logits[0, -1].float()

    def _forward_decode(self, slot: Slot) -> torch.Tensor:
        return self.model(input_ids=self.decode_ids, position_ids=self.decode_pos, past_key_values=slot.cache,
                          use_cache=True, logits_to_keep=1).logits

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
