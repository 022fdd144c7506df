"""The vision tower's output per image, kept on the device so that an image sent again (every turn of a
chat re-sends its images) is not encoded again.

Keyed by the engine's image key (a hash of the image's bytes + the processor's grid for it). Which keys
are held is rank 0's decision (engine/prefix_cache.py keeps the budget); the step plan names, per image,
whether its embeddings come from here or from the vision tower, and every rank stores and evicts exactly
what the plan says, so every rank holds the same entries.
"""
from __future__ import annotations

import math

import torch


class ImageEmbeddingCache:
    def __init__(self, hidden: int, merge: int, dtype: torch.dtype):
        self.hidden, self.merge, self.dtype = hidden, merge, dtype
        self.entries: dict[str, torch.Tensor] = {}   # key -> [image tokens, hidden]

    def tokens(self, grid: list[int]) -> int:
        """Image tokens of an image of grid (t, h, w) patches: the merger packs merge x merge patches into one."""
        return math.prod(grid) // self.merge**2

    def nbytes(self, grid: list[int]) -> int:
        return self.tokens(grid) * self.hidden * torch.empty((), dtype=self.dtype).element_size()

    def get(self, key: str) -> torch.Tensor:
        return self.entries[key]

    def put(self, key: str, embeds: torch.Tensor) -> None:
        self.entries[key] = embeds

    def evict(self, key: str) -> None:
        del self.entries[key]
