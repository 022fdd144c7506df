"""Copies of a slot's Gated DeltaNet state at a prompt position, kept on the device so that a later prompt
starting with the same tokens can continue from there (prefix reuse).

Gated DeltaNet state cannot be rewound: the conv window and the recurrent state of position p are gone
once position p + 1 is prefilled. So the state of a prefix is copied out of the slot at the moment the
prefill reaches it (`save`) and copied into a slot again on a hit (`restore`). The prefix's KV is not
copied: its blocks are shared (paged KV). Rank 0 keeps a reference to them with the snapshot and maps
them into the next sequence's block table (plan.Prefill.blocks; a partial last block is copied,
Prefill.copy_blocks, since the new sequence writes the rest of it). A snapshot is never shared with a
running sequence: restoring copies, so dropping one (`evict`) can never touch a live slot.

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
    conv: torch.Tensor                            # [GDN layers, channels, kernel]
    recurrent: torch.Tensor                       # [GDN layers, v_heads, head_k_dim, head_v_dim], float32


class SnapshotStore:
    def __init__(self, state: SlotState):
        self.state = state
        self.snapshots: dict[int, Snapshot] = {}

    def nbytes(self, length: int = 0) -> int:
        """Bytes one snapshot takes on this rank (every rank's shard is the same size), whatever its length:
        its KV blocks are the paged cache's."""
        s = self.state
        return s.conv_all[:, 0].numel() * s.conv_all.element_size() + s.rec_all[:, 0].numel() * s.rec_all.element_size()

    def save(self, snapshot_id: int, slot: int, length: int) -> None:
        """Copy slot's GDN state as it is now; the slot must hold exactly `length` prompt tokens."""
        s = self.state
        self.snapshots[snapshot_id] = Snapshot(length, s.conv_all[:, slot].clone(), s.rec_all[:, slot].clone())

    def restore(self, snapshot_id: int, slot: int) -> int:
        """Overwrite slot's GDN state with the snapshot's; returns its length (the slot's tokens from now on)."""
        snap = self.snapshots[snapshot_id]
        self.state.conv_all[:, slot].copy_(snap.conv)
        self.state.rec_all[:, slot].copy_(snap.recurrent)
        return snap.length

    def evict(self, snapshot_id: int) -> None:
        del self.snapshots[snapshot_id]
