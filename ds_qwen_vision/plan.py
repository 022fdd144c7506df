"""The step plan: everything a rank needs to run one step, decided by rank 0 and broadcast to all.

Followers run exactly what a plan says and nothing else; they never look at requests, sample or
branch on local state, so the ranks cannot drift apart. A plan is plain data (picklable) and covers
a batch of sequences: prefill chunks (a new sequence's prompt, or the next part of a long one) and the
decode tokens of running sequences. KV is paged: rank 0 hands a sequence its KV blocks with its first
prefill chunk (`Prefill.blocks`) and takes them back when it ends (`StepPlan.release` points the slot's
table at the null block, so that its idle decode row writes nowhere that matters); a prefill overwrites
all of the slot's Gated DeltaNet state.
Image pixels do not travel in the plan: rank 0 broadcasts them on the model's own (device) group, and
so are the tokens rank 0 samples (`ModelRunner.feed`): a decode entry's token is usually FROM_DEVICE.

Most steps are decode or verify steps (with their accepts and released slots); those travel as one
fixed-size integer tensor (`ControlChannel`), the rest (prefills, evictions) as a pickle after it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

# A decode entry's token: the one this rank's runner holds for the slot from the previous step
# (sampled on rank 0's device and broadcast to every rank there, never read by the host first).
FROM_DEVICE = -1


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
    # Paged KV (engine/block_manager.py decides): the slot's KV blocks in position order, from this chunk on
    # (set with a sequence's first chunk; None: the slot keeps its table), and (src, dst) blocks to copy
    # first -- a restored prefix's partial last block, which this sequence writes the rest of.
    blocks: list[int] | None = None
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepPlan:
    prefill: list[Prefill] = field(default_factory=list)
    decode: list[tuple[int, int]] = field(default_factory=list)  # (slot, token to feed, or FROM_DEVICE)
    # Speculative decoding (runner/speculative.py). accept: (slot, i) -- the previous step verified T
    # tokens for the slot and the first i + 1 of them were accepted: select the state after position i
    # before anything else runs. verify: (slot, [token to feed, host drafts...]); with MTP the runner
    # adds its own drafts on device (identical on every rank).
    accept: list[tuple[int, int]] = field(default_factory=list)
    verify: list[tuple[int, list[int]]] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # slots whose sequence ended: table to the null block
    evict_snapshots: list[int] = field(default_factory=list)  # dropped before this step's prefills
    evict_images: list[str] = field(default_factory=list)
    heartbeat: bool = False        # idle tick: ranks report their status instead of computing
    stop: bool = False             # followers leave their loop
    reset: bool = False            # zero every slot's state (the end of warm-up: nothing leaks into requests)
    # Rank 0 reads this step's picks on the host before it plans the next (a speculative step that verifies,
    # or whose sequences draft: the next drafts need the tokens): no rank feeds them (ModelRunner.feed), and
    # the next plan carries them. False (every other step): the picks are fed on the device and the next
    # plan's decode entries say FROM_DEVICE. Followers feed exactly when the plan says, so the collective
    # matches rank 0's.
    hold: bool = False

    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.verify or self.accept or self.heartbeat or self.stop
                    or self.reset or self.release or self.evict_snapshots or self.evict_images)


# The fixed-size header of every broadcast (S = max_slots, T = MAX_VERIFY_TOKENS): [kind, hold, n_decode,
# n_accept, n_verify, n_release], then decode [2, S] (slot, token), accept [2, S] (slot, i), release [S],
# verify [S, 2 + T] (slot, token count, tokens).
_STEP, _PICKLED, _HEARTBEAT, _STOP = range(4)
MAX_VERIFY_TOKENS = 8  # k + 1 <= 8 (config.SpeculativeConfig.num_tokens <= 7)


class ControlChannel:
    """Broadcasts plans from rank 0 over a CPU (gloo) group, separate from the model's collectives.

    A separate gloo group keeps control traffic off NCCL and gives it its own timeout: a follower
    waiting for the next plan notices a dead rank 0 (its connection drops) instead of hanging.
    """

    def __init__(self, max_slots: int = 64, timeout_s: float = 7 * 24 * 3600):
        self.group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = tdist.get_rank()
        self.world = tdist.get_world_size()
        self.max_slots = s = max_slots
        self.header = torch.zeros(6 + 5 * s + s * (2 + MAX_VERIFY_TOKENS), dtype=torch.long)
        h = self.header[6:]  # views of the header's parts
        self.decode, self.accept = h[:2 * s].view(2, s), h[2 * s:4 * s].view(2, s)
        self.release, self.verify = h[4 * s:5 * s], h[5 * s:].view(s, 2 + MAX_VERIFY_TOKENS)

    def fits(self, plan: StepPlan) -> bool:
        """Whether the plan is a step the tensor carries whole: decode rows, verify rows, their accepts and
        released slots, and nothing else. Any other field (prefills, evictions, anything added later) sends
        the whole plan pickled, so nothing is ever dropped."""
        s = self.max_slots
        return (plan == StepPlan(decode=list(plan.decode), accept=list(plan.accept), verify=list(plan.verify),
                                 release=list(plan.release), hold=plan.hold)
                and max(len(plan.decode), len(plan.accept), len(plan.verify), len(plan.release)) <= s
                and all(len(tokens) <= MAX_VERIFY_TOKENS for _, tokens in plan.verify))

    def broadcast(self, plan: StepPlan | None = None) -> StepPlan:
        """Rank 0 sends `plan`; every rank returns it. A decode or verify step is one tensor broadcast
        (no pickling, ~10x less host time than broadcast_object_list); others add a pickled one."""
        if self.world == 1:
            return plan
        h = self.header
        if self.rank == 0:
            h[:6].zero_()
            if plan.stop:
                h[0] = _STOP
            elif plan.heartbeat and plan == StepPlan(heartbeat=True):
                h[0] = _HEARTBEAT
            elif self.fits(plan):
                h[:6] = torch.tensor([_STEP, plan.hold, len(plan.decode), len(plan.accept), len(plan.verify),
                                      len(plan.release)])
                if plan.decode:
                    self.decode[:, :len(plan.decode)] = torch.tensor(plan.decode).T
                if plan.accept:
                    self.accept[:, :len(plan.accept)] = torch.tensor(plan.accept).T
                if plan.release:
                    self.release[:len(plan.release)] = torch.tensor(plan.release)
                if plan.verify:
                    rows = [[slot, len(t), *t] + [0] * (MAX_VERIFY_TOKENS - len(t)) for slot, t in plan.verify]
                    self.verify[:len(rows)] = torch.tensor(rows)
            else:
                h[0] = _PICKLED
        tdist.broadcast(h, src=0, group=self.group)
        kind = int(h[0])
        if kind == _PICKLED:
            box = [plan]
            tdist.broadcast_object_list(box, src=0, group=self.group)
            return box[0]
        if self.rank == 0:
            return plan
        if kind == _STOP:
            return StepPlan(stop=True)
        if kind == _HEARTBEAT:
            return StepPlan(heartbeat=True)
        _, hold, n_decode, n_accept, n_verify, n_release = h[:6].tolist()
        verify = [(row[0], row[2:2 + row[1]]) for row in self.verify[:n_verify].tolist()]
        return StepPlan(decode=list(zip(*self.decode[:, :n_decode].tolist())),
                        accept=list(zip(*self.accept[:, :n_accept].tolist())), verify=verify,
                        release=self.release[:n_release].tolist(), hold=bool(hold))

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere): used for health reports."""
        out = [None] * self.world if self.rank == 0 else None
        tdist.gather_object(obj, out, dst=0, group=self.group)
        return out
