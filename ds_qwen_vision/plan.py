"""The step plan: everything a rank needs to run one step, decided by rank 0 and broadcast to all.

Followers run exactly what a plan says and nothing else; they never look at requests, sample or
branch on local state, so the ranks cannot drift apart. A plan is plain data (picklable) and covers
a batch of sequences: prefill chunks (a new sequence's prompt, or the next part of a long one) and the
decode tokens of running sequences. A slot needs no freeing: a prefill overwrites all of its state.
Image pixels do not travel in the plan: rank 0 broadcasts them on the model's own (device) group.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch.distributed as tdist


@dataclass
class Prefill:
    slot: int
    input_ids: list[int]           # the whole prompt, image placeholders already expanded
    image_grid_thw: list[list[int]] = field(default_factory=list)  # per image, in prompt order
    pixels_shape: tuple[int, int] | None = None  # the processor's pixel_values, broadcast at start == 0
    start: int = 0                 # this step runs prompt tokens [start, end); start > 0 continues a prompt
    end: int | None = None         # None: to the end of the prompt
    # Prefix reuse (engine/prefix_cache.py decides, runner/snapshots.py does): restore = a snapshot whose
    # state is copied into the slot first, the prompt then continuing at start (= its length); save = after
    # this chunk, keep a snapshot of the slot's state under this id (its length: end).
    restore: int | None = None
    save: int | None = None
    # Image embedding cache (runner/image_cache.py), per image of image_grid_thw: its key (None: not cached)
    # and where its embeddings come from: "encode" (the vision tower; its pixels are in the broadcast, and a
    # keyed one is then kept), "cache", or "skip" (wholly inside a restored prefix: never looked at).
    image_keys: list[str | None] = field(default_factory=list)
    image_source: list[str] = field(default_factory=list)
    # A snapshot job (prefix_cache.PrefixCache.finished) in a slot no sequence holds: restore, prefill, save,
    # and keep nothing else (no logits, no pending prompt).
    snapshot_only: bool = False


@dataclass
class StepPlan:
    prefill: list[Prefill] = field(default_factory=list)
    decode: list[tuple[int, int]] = field(default_factory=list)  # (slot, token to feed)
    # Speculative decoding (runner/speculative.py). accept: (slot, i) -- the previous step verified T
    # tokens for the slot and the first i + 1 of them were accepted: select the state after position i
    # before anything else runs. verify: (slot, [token to feed, host drafts...]); with MTP the runner
    # adds its own drafts on device (identical on every rank).
    accept: list[tuple[int, int]] = field(default_factory=list)
    verify: list[tuple[int, list[int]]] = field(default_factory=list)
    evict_snapshots: list[int] = field(default_factory=list)  # dropped before this step's prefills
    evict_images: list[str] = field(default_factory=list)
    heartbeat: bool = False        # idle tick: ranks report their status instead of computing
    stop: bool = False             # followers leave their loop

    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.verify or self.accept or self.heartbeat or self.stop)


class ControlChannel:
    """Broadcasts plans from rank 0 over a CPU (gloo) group, separate from the model's collectives.

    A separate gloo group keeps control traffic off NCCL and gives it its own timeout: a follower
    waiting for the next plan notices a dead rank 0 (its connection drops) instead of hanging.
    """

    def __init__(self, timeout_s: float = 7 * 24 * 3600):
        self.group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = tdist.get_rank()
        self.world = tdist.get_world_size()

    def broadcast(self, plan: StepPlan | None = None) -> StepPlan:
        box = [plan]
        tdist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere): used for health reports."""
        out = [None] * self.world if self.rank == 0 else None
        tdist.gather_object(obj, out, dst=0, group=self.group)
        return out
