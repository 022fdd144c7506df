"""Copies of a slot's sequence state at a prompt position, kept on the device so that a later prompt
starting with the same tokens can continue from there (prefix reuse).

Gated DeltaNet state cannot be rewound: the conv window and the recurrent state of position p are gone
once position p + 1 is prefilled. So the state of a prefix is copied out of the slot at the moment the
prefill reaches it (`save`) -- the conv + recurrent state of every GDN layer and the KV rows [0, length)
of every full-attention layer -- and copied into a slot again on a hit (`restore`). A snapshot is never
shared with a running sequence: restoring copies, so dropping one (`evict`) can never touch a live slot.

Which snapshots exist is rank 0's decision (engine/prefix_cache.py); every rank saves, restores and
evicts exactly the ids the step plan names, so every rank holds the same snapshots of its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .slot_state import SlotState


@dataclass
class Snapshot:
    length: int                                   # prompt tokens covered: positions [0, length)
    conv: dict[int, torch.Tensor]                 # GDN layer -> [channels, kernel]
    recurrent: dict[int, torch.Tensor]            # GDN layer -> [v_heads, head_k_dim, head_v_dim], float32
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # attention layer -> keys, values [kv_heads, length, head_dim]
    head_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # the MTP head's layers, the same (empty without one)


class SnapshotStore:
    def __init__(self, state: SlotState):
        self.state = state
        self.snapshots: dict[int, Snapshot] = {}
        # The speculative MTP head's KV per slot (runner/speculative.py), [slots, kv_heads, len, head_dim] per
        # layer: kept with the prefix so that a reused prefix drafts as well as a prefilled one. Its row at
        # position length - 1 pairs h(length - 1) with the prompt's token at `length`: the prefix cache cuts
        # right before an `<|im_start|>`, which every later prompt of the conversation has there too (and a
        # prompt that had another token only drafts worse: verification keeps the output exact).
        self.head_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def nbytes(self, length: int) -> int:
        """Bytes one snapshot of `length` tokens takes on this rank (every rank's shard is the same size)."""
        fixed = sum(t[0].numel() * t.element_size() for t in (*self.state.conv.values(), *self.state.recurrent.values()))
        per_token = sum(2 * k[0, :, 0].numel() * k.element_size()
                        for k, _ in (*self.state.kv.values(), *self.head_kv.values()))
        return fixed + per_token * length

    def save(self, snapshot_id: int, slot: int, length: int) -> None:
        """Copy slot's state as it is now; the slot must hold exactly `length` prompt tokens."""
        s = self.state
        self.snapshots[snapshot_id] = Snapshot(
            length,
            {i: t[slot].clone() for i, t in s.conv.items()},
            {i: t[slot].clone() for i, t in s.recurrent.items()},
            {i: (k[slot, :, :length].clone(), v[slot, :, :length].clone()) for i, (k, v) in s.kv.items()},
            {i: (k[slot, :, :length].clone(), v[slot, :, :length].clone()) for i, (k, v) in self.head_kv.items()})

    def restore(self, snapshot_id: int, slot: int) -> int:
        """Overwrite slot's state with the snapshot's; returns its length (the slot's tokens from now on).
        KV rows past `length` keep stale values: they are overwritten before any query can attend to them."""
        snap = self.snapshots[snapshot_id]
        s = self.state
        for i, t in snap.conv.items():
            s.conv[i][slot].copy_(t)
        for i, t in snap.recurrent.items():
            s.recurrent[i][slot].copy_(t)
        for kv, into in ((snap.kv, s.kv), (snap.head_kv, self.head_kv)):
            for i, (k, v) in kv.items():
                into[i][0][slot, :, :snap.length].copy_(k)
                into[i][1][slot, :, :snap.length].copy_(v)
        return snap.length

    def evict(self, snapshot_id: int) -> None:
        del self.snapshots[snapshot_id]
