"""Runs step plans on this rank's shard of the model. The same code on every rank.

Each slot holds one sequence's cache (KV for the full-attention layers, conv + recurrent state for
the Gated DeltaNet layers, sharded like the layers) and its M-RoPE offset. Forward passes are
transformers' own, with the 3-D positions computed once at prefill by the model's get_rope_index.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .model import open_image
from .plan import Prefill, StepPlan


@dataclass
class Slot:
    cache: DynamicCache
    rope_delta: torch.Tensor  # [1, 1]: M-RoPE position minus text position after the prompt
    length: int


class ModelRunner:
    def __init__(self, model, processor, device: torch.device):
        self.model = model
        self.processor = processor
        self.device = device
        self.image_token_id = model.config.image_token_id
        self.slots: dict[int, Slot] = {}
        if device.type == "cuda":
            # cuDNN's SDPA re-plans for every new KV length, ~18 ms of host time per attention call in
            # decode (measured on H100); flash / memory-efficient SDPA need no planning.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def image_inputs(self, images: list[bytes]) -> dict:
        """The checkpoint's image processor on the plan's bytes: identical pixels on every rank."""
        out = self.processor.image_processor(images=[open_image(b) for b in images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.device),
                "image_grid_thw": out["image_grid_thw"].to(self.device)}

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Execute one plan; returns each stepped slot's next-token logits ([vocab], float32)."""
        for slot in plan.release:
            self.slots.pop(slot, None)
        logits = {}
        for item in plan.prefill:
            logits[item.slot] = self.prefill(item)
        for slot, token in plan.decode:
            logits[slot] = self.decode(slot, token)
        return logits

    def prefill(self, item: Prefill) -> torch.Tensor:
        ids = torch.tensor([item.input_ids], device=self.device)
        mm_types = (ids == self.image_token_id).int()
        image_kwargs = self.image_inputs(item.images) if item.images else {}
        positions, delta = self.model.model.get_rope_index(ids, mm_types, image_grid_thw=image_kwargs.get("image_grid_thw"))
        cache = DynamicCache(config=self.model.config.text_config)
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                         mm_token_type_ids=mm_types, logits_to_keep=1, **image_kwargs)
        self.slots[item.slot] = Slot(cache, delta.to(self.device), ids.shape[1])
        return out.logits[0, -1].float()

    def decode(self, slot_id: int, token: int) -> torch.Tensor:
        slot = self.slots[slot_id]
        ids = torch.tensor([[token]], device=self.device)
        positions = (slot.rope_delta + slot.length).view(1, 1, 1).expand(3, 1, 1)
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=slot.cache, use_cache=True,
                         logits_to_keep=1)
        slot.length += 1
        return out.logits[0, -1].float()

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
        return {"rank": rank, "ready": True, "device": str(self.device), "slots_in_use": len(self.slots), **mem}


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
