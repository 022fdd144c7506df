"""Rank 0's scheduler: each step's plan, decided from the sequences' state alone (nothing here reads a
device, a socket or a clock).

The queue is FIFO. A sequence is admitted into the lowest free slot once the KV blocks of its whole
reservation are free (`reserve`: prompt + max_tokens, a held prefix's blocks shared); the head of the queue
waits for them (`held`) and nothing passes it. Every running sequence decodes one token a step (or, with
speculative decoding, verifies its drafts); prompts are prefilled within a token budget per step
(`prefill_budget`, limits.max_gap_steps through warm-up), continuing ones first, then new ones. A sequence
that has ended (done, failed, or cancelled) leaves its slot at the next plan, and its blocks go back.
"""
from __future__ import annotations

import threading
from collections import deque

from ..plan import FROM_DEVICE, Prefill, StepPlan
from .sequence import Sequence


class RequestQueue:
    """Sequences waiting for a slot, in arrival order, at most `max_size` of them and at most `max_pixels`
    image pixels held on the host (one request alone always fits; one without images is never refused for
    them). A request's choices enter together; a cancelled request leaves at once, so its place and its
    pixels are free for the next."""

    def __init__(self, max_size: int, max_pixels: int | None = None):
        self.max_size, self.max_pixels = max_size, max_pixels
        self.items: deque[Sequence] = deque()
        self.pixels = 0  # of the requests queued (their first choice's: a request's choices share the pixels)
        self.lock = threading.Lock()  # IPC threads put and remove, the loop pops

    def put(self, group: list[Sequence], more_pixels: int = 0) -> str | None:
        """Queue the request's sequences; or why not ("queue_full", "pixels"). `more_pixels`: held beside
        the queue (its head, waiting for memory)."""
        with self.lock:
            if len(self.items) + len(group) > self.max_size:
                return "queue_full"
            held, pixels = self.pixels + more_pixels, group[0].pixels
            if self.max_pixels is not None and held and pixels and held + pixels > self.max_pixels:
                return "pixels"
            self.items.extend(group)
            self.pixels += group[0].pixels
        return None

    def pop(self) -> Sequence | None:
        with self.lock:
            if not self.items:
                return None
            seq = self.items.popleft()
            self.pixels -= seq.pixels if seq.index == 0 else 0
            return seq

    def remove(self, group: list[Sequence]) -> list[Sequence]:
        """Those of `group` still queued, taken out."""
        with self.lock:
            out = [s for s in group if s in self.items]
            for s in out:
                self.items.remove(s)
                self.pixels -= s.pixels if s.index == 0 else 0
            return out

    def __len__(self) -> int:
        return len(self.items)


class Scheduler:
    def __init__(self, max_slots: int, chunk_tokens: int, queue: RequestQueue, blocks, prefix_cache, spec,
                 metrics, kv_slack: int = 1):
        self.max_slots, self.chunk_tokens = max_slots, chunk_tokens
        self.waiting, self.blocks, self.prefix_cache, self.spec, self.m = queue, blocks, prefix_cache, spec, metrics
        self.kv_slack = kv_slack  # a verify writes k positions past a sequence's length; +1: the step past its end
        self.held: Sequence | None = None  # the queue's head, waiting for free KV blocks (FIFO: nothing passes it)
        self.running: dict[int, Sequence] = {}
        # Prompt tokens prefilled per step: limits.prefill_chunk_tokens, or what warm-up derived from
        # limits.max_gap_steps and the measured step times; and a prefill forward's fixed cost in tokens,
        # charged per prompt after the first.
        self.prefill_budget = chunk_tokens
        self.prefill_overhead = 0
        self.m.max_sequences.set(max_slots)
        if blocks is not None:
            self.m.blocks_free.set(blocks.capacity)
            self.m.kv_capacity.set(blocks.capacity * blocks.block_size)

    # ---- the queue (IPC threads) ---------------------------------------------------------------------
    def add(self, group: list[Sequence]) -> str | None:
        """Queue a request's sequences; or why not ("queue_full", "pixels")."""
        held = self.held
        why = self.waiting.put(group, held.pixels if held is not None and held.index == 0 else 0)
        self.m.queue.set(self.queued())
        return why

    def cancel(self, group: list[Sequence]) -> None:
        """The client left: what is queued leaves the queue now; what runs leaves its slot at the next plan."""
        for seq in group:
            if not seq.done:
                seq.cancelled = True
        if any(seq.index == 0 for seq in self.waiting.remove(group)):
            self.m.outcome("cancelled")
        self.m.queue.set(self.queued())

    def queued(self) -> int:
        return len(self.waiting) + (self.held is not None)

    def idle(self) -> bool:
        """Nothing queued, nothing left to generate."""
        return not self.queued() and all(seq.ended for seq in self.running.values())

    def take_all(self) -> list[Sequence]:
        """Every sequence not ended, queued or running, taken out of the queue (the engine is failing)."""
        out = [seq for seq in list(self.running.values()) if not seq.ended]
        held, self.held = self.held, None
        if held is not None:
            out.append(held)
        while (seq := self.waiting.pop()) is not None:
            out.append(seq)
        return out

    # ---- the plan (the loop) -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Every generating sequence decodes one token; prompts are prefilled within a token budget per
        step, continuing ones first, then new sequences in free slots."""
        plan = StepPlan()
        self.prefix_cache.begin_plan(plan)
        # The per-step budget (limits.max_gap_steps) protects streams that decode; when none does, nothing
        # waits on this step and prompts get whole chunks (a burst of new requests is prefilled at full rate).
        decoding = any(not s.ended and s.prefilled >= len(s.input_ids) for s in self.running.values())
        budget = self.prefill_budget if decoding else max(self.prefill_budget, self.chunk_tokens)
        budget += self.prefill_overhead  # the first prefill's overhead is in the budget
        for slot, seq in list(self.running.items()):
            if seq.ended:
                if seq.cancelled and not seq.done and seq.index == 0:  # once per request
                    self.m.outcome("cancelled")
                del self.running[slot]  # the slot's next prefill overwrites its GDN state
                self.release(plan, seq)
                if job := self.prefix_cache.finished(plan, seq):  # a snapshot job in the slot it left, if deferred
                    budget -= job + self.prefill_overhead
            elif seq.prefilled < len(seq.input_ids):
                budget -= self.schedule_prefill(plan, seq, budget - self.prefill_overhead, self.prefill_overhead)
            elif self.spec is not None:
                if seq.next_token is not None or seq.fed:
                    self.spec.schedule(plan, seq)  # its accept, then a verify (with drafts) or a decode
            elif seq.generated + seq.in_flight < seq.sampling.max_tokens:
                # its previous token is on the device already (picked there, maybe not read yet)
                plan.decode.append((slot, FROM_DEVICE))
                seq.in_flight += 1
        free = [s for s in range(self.max_slots) if s not in self.running]
        while free and budget > self.prefill_overhead:
            seq, self.held = self.held, None
            waited = seq is not None
            if seq is None and (seq := self.waiting.pop()) is None:
                break
            if seq.cancelled:  # its client left while it was the held head (or as the loop took it)
                if seq.index == 0 and not seq.done:
                    self.m.outcome("cancelled")
                continue
            hit = self.prefix_cache.lookup(seq.prefix)
            if not self.reserve(seq, hit):
                if not waited:
                    self.m.memory_waits.inc()
                self.held = seq  # first in line until enough blocks are free (sequences end, snapshots go)
                break
            seq.slot = free.pop(0)  # the lowest free slot: decoding rows stay packed at the front
            self.running[seq.slot] = seq
            seq.prefilled = self.prefix_cache.reuse(seq.prefix, hit)  # a held prefix: its state is restored
            if self.spec is not None:
                self.spec.start(seq)
                if seq.grammar is not None:  # each token's mask needs the token before it: no drafts
                    seq.spec.drafting = False
            budget -= self.schedule_prefill(plan, seq, budget - self.prefill_overhead, self.prefill_overhead)
        if self.spec is not None:
            self.spec.merge(plan)
            plan.hold = self.spec.holds(plan, self.running)
        self.m.queue.set(self.queued())
        self.m.in_flight.set(len(self.running))
        self.m.waiting_memory.set(self.held is not None)
        if self.blocks is not None:
            self.m.blocks_used.set(self.blocks.used)
            self.m.blocks_free.set(len(self.blocks.free))
        return plan

    def synchronous(self, plan: StepPlan) -> bool:
        """Whether this step must wait for the previous step's tokens on the host before it is launched:
        a pick that depends on the host's view of the tokens so far (a grammar's state for its mask) must
        return True here for the sequences it constrains; so does a speculative step that holds its tokens
        (StepPlan.hold: its plan was made from the host's tokens)."""
        return plan.hold or any(self.running[slot].grammar is not None for slot, _ in plan.decode)

    def reserve(self, seq: Sequence, hit: tuple[int | None, int]) -> bool:
        """Seq's KV blocks for its whole reservation, before it is admitted: a held prefix's (`hit`, from
        prefix_cache.lookup) shared, the rest new, snapshots evicted for room where needed. False: not
        enough blocks free now (nothing changed but the evictions)."""
        if self.blocks is None:
            return True
        snapshot_id, length = hit
        if snapshot_id is not None:
            self.prefix_cache.snapshots.touch(snapshot_id)  # pinned: no eviction below may drop it
        shared, tail = self.prefix_cache.shared_blocks(snapshot_id, length)
        need = self.blocks.blocks_for(seq.reserve) - len(shared)
        if len(self.blocks.free) < need:
            self.prefix_cache.reclaim(need)
        if len(self.blocks.free) < need:
            return False
        self.blocks.share(shared)
        seq.blocks = shared + self.blocks.allocate(need)
        seq.copy_blocks = [(tail, seq.blocks[len(shared)])] if tail is not None else []
        return True

    def release(self, plan: StepPlan, seq: Sequence) -> None:
        """An ended sequence's blocks go back (those a snapshot holds stay); its slot's table to the null block."""
        if self.blocks is not None and seq.blocks:
            self.blocks.release(seq.blocks)
            seq.blocks = []
            plan.release.append(seq.slot)

    def schedule_prefill(self, plan: StepPlan, seq: Sequence, budget: int, overhead: int = 0) -> int:
        """The next chunk of seq's prompt (at most `budget` tokens) into the plan; returns what it costs
        of the step's budget: its length plus `overhead` for each forward (nothing when no chunk fits).

        Where the prefix cache splits the chunk at its snapshot position (two forwards), the part after
        it waits for the next step when the budget has no room for a second forward's fixed cost: on
        one H200 (27B, 2026-12-02) those split chunks put ~100 gaps of 100-150 ms into every 16-stream
        burst against a 50 ms prefill step (benchmarks/bench_served.py's step trace)."""
        start = seq.prefilled
        end = min(len(seq.input_ids), start + budget)
        if end <= start:
            return 0
        begins = start == (seq.prefix.cached if seq.prefix else 0)  # the sequence's first chunk
        first = begins and seq.pixel_values is not None
        item = Prefill(seq.slot, seq.input_ids, seq.image_grid_thw if begins else [],
                       tuple(seq.pixel_values.shape) if first else None, start, end)
        if begins and self.blocks is not None:  # the sequence's KV blocks go with its first chunk
            item.blocks, item.copy_blocks = list(seq.blocks), seq.copy_blocks
        # prefix reuse / image cache: restore, snapshot (the chunk split there), only uncached images' pixels
        items, pixels = self.prefix_cache.schedule(seq.prefix, item, seq.pixel_values if first else None,
                                                   seq.blocks)
        if len(items) > 1 and end - start + overhead > budget:
            items = items[:1]  # [start, snapshot) now, the rest in a step of its own
            end = items[0].end
        if begins:
            seq.pixel_values = pixels
        plan.prefill.extend(items)
        seq.prefilled = end
        if end == len(seq.input_ids):
            seq.in_flight += 1  # the prompt's last chunk gives the first token
        return end - start + overhead * len(items)
