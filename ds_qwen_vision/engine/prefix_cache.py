"""Rank 0's side of prefix reuse and of the image embedding cache: which prompt prefixes and image
embeddings the ranks hold, matching new prompts against them, and an LRU within each byte budget.

The ranks hold the state itself (runner/snapshots.py, runner/image_cache.py); this module decides, and the
step plan carries the decisions (Prefill.restore / save / image_keys / image_source, StepPlan.evict_*), so
the followers never decide anything and every rank holds the same entries.

Matching is on token ids, with every image pad token replaced by its image's key -- a hash of the image's
bytes and the grid the processor gave it -- so two prompts that differ only in an image's pixels never
match past that image.

Where snapshots are taken: one per prompt, right before its last `<|im_start|>` (the start of the
generation prompt). Qwen's chat template renders every earlier message of a conversation the same way on
the next turn, but not the generation prompt (`<|im_start|>assistant\\n<think>\\n`): the next turn has the
reply there, rendered without its thinking. So that position ends the longest prefix of this prompt that
the next turn's prompt starts with. Gated DeltaNet state cannot be rewound, so the state must be copied at
that very position while the prompt is prefilled: the prefill chunk that crosses it is split there. The
generated tokens are never a boundary (the re-rendered reply is other tokens). Re-sending a prompt
(regenerate), or editing the last message, hits the same snapshot.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge

from ..plan import Prefill, StepPlan


class Lru:
    """Entries with sizes within a byte budget, least recently used evicted first. Entries used by the
    plan being built are pinned: the plan's evictions run before its prefills, so it must never evict
    what it restores or saves itself."""

    def __init__(self, budget: int):
        self.budget = budget
        self.sizes: OrderedDict = OrderedDict()
        self.used = 0
        self.pinned: set = set()

    def __contains__(self, key) -> bool:
        return key in self.sizes

    def touch(self, key) -> None:
        self.sizes.move_to_end(key)
        self.pinned.add(key)

    def admit(self, key, nbytes: int) -> list | None:
        """Add key; returns the keys evicted to make room, or None (nothing changed) when it cannot fit."""
        free, evict = self.budget - self.used, []
        for old, size in self.sizes.items():  # oldest first
            if free >= nbytes:
                break
            if old not in self.pinned:
                evict.append(old)
                free += size
        if free < nbytes:
            return None
        for old in evict:
            self.used -= self.sizes.pop(old)
        self.sizes[key] = nbytes
        self.used += nbytes
        self.pinned.add(key)
        return evict


@dataclass
class PromptKeys:
    """What the caches need to know about one prompt, computed when the request is prepared."""
    keys: tuple                 # per prompt token: its id, or for an image pad token its image's key
    image_keys: list[str]       # per image, in prompt order
    image_rows: list[int]       # per image: its rows (patches) in the processor's pixel_values
    image_last: list[int]       # per image: prompt position of its last pad token
    boundary: int               # where this prompt's snapshot is taken (0: none)
    cached: int = 0             # prompt tokens restored from a snapshot (usage.prompt_tokens_details.cached_tokens)
    restore: int | None = None  # that snapshot's id


def image_key(data: bytes, grid: list[int]) -> str:
    return f"{hashlib.sha256(data).hexdigest()}:{'x'.join(map(str, grid))}"


class PrefixCache:
    def __init__(self, prefix_bytes: int, image_bytes: int, boundary_token: int | None, image_token: int,
                 merge: int, snapshot_nbytes, image_nbytes, registry):
        self.snapshots, self.images = Lru(prefix_bytes), Lru(image_bytes)
        self.boundary_token, self.image_token, self.merge = boundary_token, image_token, merge
        self.snapshot_nbytes, self.image_nbytes = snapshot_nbytes, image_nbytes
        self.prefixes: dict[int, tuple] = {}  # snapshot id -> the keys of the prefix it holds
        self.ids = itertools.count()
        self.plan: StepPlan | None = None
        r = registry
        self.m_hits = Counter("dsqv_prefix_cache_hits", "Requests whose prompt continued a held prefix", registry=r)
        self.m_misses = Counter("dsqv_prefix_cache_misses", "Requests prefilled from the start", registry=r)
        self.m_cached = Counter("dsqv_prefix_cache_cached_tokens", "Prompt tokens restored, not prefilled", registry=r)
        self.m_evictions = Counter("dsqv_prefix_cache_evictions", "Prefix snapshots evicted (LRU)", registry=r)
        self.m_bytes = Gauge("dsqv_prefix_cache_bytes", "Bytes of prefix snapshots held per rank", registry=r)
        self.m_image_hits = Counter("dsqv_image_cache_hits", "Images whose embeddings came from the cache", registry=r)
        self.m_image_misses = Counter("dsqv_image_cache_misses", "Images run through the vision tower", registry=r)
        self.m_image_evictions = Counter("dsqv_image_cache_evictions", "Image embeddings evicted (LRU)", registry=r)
        self.m_image_bytes = Gauge("dsqv_image_cache_bytes", "Bytes of image embeddings held per rank", registry=r)

    @classmethod
    def for_runner(cls, runner, cache_config, tokenizer, registry) -> PrefixCache:
        """Budgets from the deployment config's `cache` section (None: both caches off)."""
        prefix_bytes = cache_config.prefix_bytes if cache_config is not None else 0
        image_bytes = cache_config.image_bytes if cache_config is not None else 0
        if not (prefix_bytes or image_bytes):
            return cls(0, 0, None, -1, 1, None, None, registry)
        config = runner.model.config
        boundary = tokenizer.convert_tokens_to_ids("<|im_start|>")
        boundary = boundary if isinstance(boundary, int) and boundary != tokenizer.unk_token_id else None
        snapshot_nbytes = runner.snapshots.nbytes if prefix_bytes else None
        image_nbytes = runner.images.nbytes if image_bytes else None
        return cls(prefix_bytes, image_bytes, boundary, config.image_token_id,
                   config.vision_config.spatial_merge_size, snapshot_nbytes, image_nbytes, registry)

    @property
    def enabled(self) -> bool:
        return bool(self.snapshots.budget or self.images.budget)

    # ---- request intake (IPC threads) ---------------------------------------------------------------
    def prompt(self, input_ids: list[int], images: list[bytes], grids: list[list[int]]) -> PromptKeys | None:
        if not self.enabled:
            return None
        image_keys = [image_key(data, grid) for data, grid in zip(images, grids, strict=True)]
        tokens = [g[0] * g[1] * g[2] // self.merge**2 for g in grids]  # the processor's pad tokens per image
        keys, image_last, j, left = list(input_ids), [], 0, 0
        for pos, token in enumerate(input_ids):
            if token != self.image_token:
                continue
            if left == 0:
                left = tokens[j]
                j += 1
            keys[pos] = image_keys[j - 1]
            left -= 1
            if left == 0:
                image_last.append(pos)
        boundary = 0
        if self.boundary_token is not None and self.snapshots.budget:
            boundary = max((p for p, t in enumerate(input_ids) if t == self.boundary_token), default=0)
        return PromptKeys(tuple(keys), image_keys, [g[0] * g[1] * g[2] for g in grids], image_last, boundary)

    # ---- planning (the engine loop) -----------------------------------------------------------------
    def begin_plan(self, plan: StepPlan) -> None:
        self.plan = plan
        self.snapshots.pinned.clear()
        self.images.pinned.clear()

    def reuse(self, prompt: PromptKeys | None) -> int:
        """A new sequence: the longest held prefix its prompt starts with (at least one token is left to
        prefill, for the logits). Returns the prompt tokens already there (0: none)."""
        if prompt is None or not self.snapshots.budget:
            return 0
        n, best, length = len(prompt.keys), None, 0
        for snapshot_id, keys in self.prefixes.items():
            if length < len(keys) < n and prompt.keys[:len(keys)] == keys:
                best, length = snapshot_id, len(keys)
        if best is None:
            self.m_misses.inc()
            return 0
        self.snapshots.touch(best)
        self.m_hits.inc()
        self.m_cached.inc(length)
        prompt.restore, prompt.cached = best, length
        return length

    def schedule(self, prompt: PromptKeys | None, item: Prefill, pixel_values: torch.Tensor | None
                 ) -> tuple[list[Prefill], torch.Tensor | None]:
        """The plan items for one prefill chunk (split where a snapshot is taken) and, for a first chunk,
        the pixels to broadcast: only those of the images the vision tower has to encode."""
        if prompt is None:
            return [item], pixel_values
        first = item.start == prompt.cached
        if first:
            item.restore = prompt.restore
            pixel_values = self._images(prompt, item, pixel_values)
        b = prompt.boundary
        if not (item.start < b <= item.end):
            return [item], pixel_values
        snapshot_id = self._admit_snapshot(prompt.keys[:b])
        if snapshot_id is None:
            return [item], pixel_values
        if b == item.end:
            item.save = snapshot_id
            return [item], pixel_values
        rest = Prefill(item.slot, item.input_ids, start=b, end=item.end)
        item.end, item.save = b, snapshot_id
        return [item, rest], pixel_values

    def _admit_snapshot(self, keys: tuple) -> int | None:
        for snapshot_id, held in self.prefixes.items():
            if held == keys:  # the same prefix is held already (e.g. the same prompt twice)
                self.snapshots.touch(snapshot_id)
                return None
        snapshot_id = next(self.ids)
        evicted = self.snapshots.admit(snapshot_id, self.snapshot_nbytes(len(keys)))
        if evicted is None:
            return None
        for old in evicted:
            del self.prefixes[old]
        self.prefixes[snapshot_id] = keys
        self.plan.evict_snapshots.extend(evicted)
        self.m_evictions.inc(len(evicted))
        self.m_bytes.set(self.snapshots.used)
        return snapshot_id

    def _images(self, prompt: PromptKeys, item: Prefill, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """Per image: skip (inside the restored prefix), cache (held) or encode (kept if the budget allows)."""
        keys, sources, rows, offset = [], [], [], 0
        for key, n_rows, last, grid in zip(prompt.image_keys, prompt.image_rows, prompt.image_last,
                                           item.image_grid_thw, strict=True):
            keep = None
            if last < item.start:
                source = "skip"
            elif key in self.images:
                source = "cache"
                keep = key
                self.images.touch(key)
                self.m_image_hits.inc()
            else:
                source = "encode"
                rows.append(pixel_values[offset:offset + n_rows])
                self.m_image_misses.inc()
                evicted = self.images.admit(key, self.image_nbytes(grid)) if self.images.budget else None
                if evicted is not None:
                    keep = key
                    self.plan.evict_images.extend(evicted)
                    self.m_image_evictions.inc(len(evicted))
            keys.append(keep)
            sources.append(source)
            offset += n_rows
        self.m_image_bytes.set(self.images.used)
        item.image_keys, item.image_source = keys, sources
        pixels = torch.cat(rows) if rows else None
        item.pixels_shape = tuple(pixels.shape) if pixels is not None else None
        return pixels
