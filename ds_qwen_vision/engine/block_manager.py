"""Rank 0's bookkeeping of the paged KV cache: which blocks are free, and how many holders each has.

The ranks hold the blocks themselves (runner/slot_state.py); this only decides. A sequence holds the
blocks of its whole reservation (prompt + max_tokens, `blocks_for`) from admission to its end: reserve at
admission, so that a running sequence never meets a full cache (no preemption, no out-of-memory, no
hang); one waits in the queue until its blocks are free instead. A prefix snapshot (engine/prefix_cache.py)
holds the blocks of its prefix as well: prefixes are immutable, so a later sequence with the same prefix
maps those blocks into its own table instead of copying them, and a block goes back to the free list
when its last holder lets go. Block 0 is the null block (unmapped positions point there): never handed out.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.capacity = num_blocks - 1  # without the null block
        self.free = deque(range(1, num_blocks))
        self.refs = [0] * num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n free blocks, each with one holder. The caller checked that there are n."""
        if n > len(self.free):
            raise RuntimeError(f"{n} KV blocks asked for, {len(self.free)} free")  # a scheduling bug
        blocks = [self.free.popleft() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks` (held already)."""
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} is not held"
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """One holder fewer for each of `blocks`; a block nobody holds is free again."""
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} released more often than held"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
