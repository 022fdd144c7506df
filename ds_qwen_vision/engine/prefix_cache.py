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
that very position while the prompt is prefilled. A prompt prefilled from the start (a miss) splits its
chunk there. A prompt that continues a snapshot (a hit: every turn after the first) does not: splitting
would cost a second forward before the first token, mostly fixed host time for the few tokens of the
generation prompt. Its snapshot is taken by a job when the sequence ends, in the slot it leaves: restore
the snapshot it continued, prefill [that, boundary) again (the last turn's new tokens; their images come
from the image cache), save (`finished`). The next turn of a chat arrives after the answer, so the job is
off the path of any first token. The generated tokens are never a boundary (the re-rendered reply is
other tokens). Re-sending a prompt (regenerate), or editing the last message, hits the same snapshot.

Images whose embeddings the ranks hold are not decoded or run through the image processor again
(`process`): their grid is known from last time, and the prompt's image tokens are expanded with the
processor's own replacement methods.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge

from ..model import open_image
from ..plan import Prefill, StepPlan

GRIDS_KEPT = 4096  # image hash -> grid entries on the host (a few bytes each)


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
    image_first: list[int]      # per image: prompt positions of its first and last pad token
    image_last: list[int]
    boundary: int               # where this prompt's snapshot is taken (0: none)
    pixels: list                # per image: its pixel rows, or None where it was not processed (embeddings held)
    images: list[bytes]         # per image: its bytes, to process it late if its embeddings were evicted meanwhile
    cached: int = 0             # prompt tokens restored from a snapshot (usage.prompt_tokens_details.cached_tokens)
    restore: int | None = None  # that snapshot's id
    deferred: bool = False      # the snapshot at `boundary` is left to a job when the sequence ends


def _grid(grid: list[int]) -> str:
    return "x".join(map(str, grid))


def _patches(grid: list[int]) -> int:
    return grid[0] * grid[1] * grid[2]


class PrefixCache:
    def __init__(self, prefix_bytes: int, image_bytes: int, boundary_token: int | None, image_token: int,
                 merge: int, snapshot_nbytes, image_nbytes, registry, pool=None):
        self.snapshots, self.images = Lru(prefix_bytes), Lru(image_bytes)
        # Paged KV (engine/block_manager.BlockPool): a snapshot holds its prefix's blocks (`blocks`), which
        # a hit maps into the new sequence's table; prefix_bytes counts the snapshots' GDN state, and the
        # blocks only snapshots hold are given back when a sequence needs them (`reclaim`).
        self.pool = pool
        self.blocks: dict[int, list[int]] = {}
        self.boundary_token, self.image_token, self.merge = boundary_token, image_token, merge
        self.snapshot_nbytes, self.image_nbytes = snapshot_nbytes, image_nbytes
        self.prefixes: dict[int, tuple] = {}  # snapshot id -> the keys of the prefix it holds
        self.grids: OrderedDict[str, list[int]] = OrderedDict()  # image bytes hash -> the processor's grid
        self.grids_lock = threading.Lock()  # filled by the IPC threads (prepare)
        self.processor, self.image_device = None, {}
        self.ids = itertools.count()
        self.plan: StepPlan | None = None
        r = registry
        self.m_hits = Counter("dsqv_prefix_cache_hits", "Requests whose prompt continued a held prefix", registry=r)
        self.m_misses = Counter("dsqv_prefix_cache_misses", "Requests prefilled from the start", registry=r)
        self.m_cached = Counter("dsqv_prefix_cache_cached_tokens", "Prompt tokens restored, not prefilled", registry=r)
        self.m_jobs = Counter("dsqv_prefix_cache_snapshot_jobs", "Snapshots taken after a sequence ended",
                              registry=r)
        self.m_evictions = Counter("dsqv_prefix_cache_evictions", "Prefix snapshots evicted (LRU)", registry=r)
        self.m_bytes = Gauge("dsqv_prefix_cache_bytes", "Bytes of prefix snapshots held per rank", registry=r)
        self.m_image_hits = Counter("dsqv_image_cache_hits", "Images whose embeddings came from the cache", registry=r)
        self.m_image_misses = Counter("dsqv_image_cache_misses", "Images run through the vision tower", registry=r)
        self.m_image_evictions = Counter("dsqv_image_cache_evictions", "Image embeddings evicted (LRU)", registry=r)
        self.m_image_bytes = Gauge("dsqv_image_cache_bytes", "Bytes of image embeddings held per rank", registry=r)

    @classmethod
    def for_runner(cls, runner, cache_config, tokenizer, registry, pool=None) -> PrefixCache:
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
                   config.vision_config.spatial_merge_size, snapshot_nbytes, image_nbytes, registry, pool)

    @property
    def enabled(self) -> bool:
        return bool(self.snapshots.budget or self.images.budget)

    # ---- request intake (IPC threads) ---------------------------------------------------------------
    def process(self, processor, prompt: str, images: list[bytes], image_device: dict) -> dict:
        """The processor's inputs for a rendered prompt (input_ids [1, n], image_grid_thw, pixel_values of the
        images processed) plus "prefix": its PromptKeys. Images whose embeddings the ranks hold are neither
        decoded nor processed."""
        self.processor, self.image_device = processor, image_device
        hashes = [hashlib.sha256(data).hexdigest() for data in images]
        with self.grids_lock:
            grids = [self.grids.get(h) for h in hashes]
        todo = [j for j, (h, g) in enumerate(zip(hashes, grids)) if g is None or f"{h}:{_grid(g)}" not in self.images]
        pixels, processed = [None] * len(images), None
        if todo:
            out = processor.image_processor(images=[open_image(images[j]) for j in todo], return_tensors="pt",
                                            **image_device)
            done = out["image_grid_thw"].tolist()
            processed = out["pixel_values"].cpu()
            rows = processed.split([_patches(g) for g in done])  # views: no copy
            for j, grid, row in zip(todo, done, rows, strict=True):
                grids[j], pixels[j] = grid, row
                with self.grids_lock:
                    self.grids[hashes[j]] = grid
                    self.grids.move_to_end(hashes[j])
                    if len(self.grids) > GRIDS_KEPT:
                        self.grids.popitem(last=False)
        # The prompt's image tokens expanded as the processor's __call__ does it, with its own methods.
        grid_t = torch.tensor(grids) if grids else None
        replacements = [processor.replace_image_token({"image_grid_thw": grid_t}, image_idx=j) for j in range(len(grids))]
        text, _ = processor.get_text_with_replacements([prompt], replacements)
        input_ids = torch.tensor(processor.tokenizer(text)["input_ids"])
        keys = self.prompt(input_ids[0].tolist(), [f"{h}:{_grid(g)}" for h, g in zip(hashes, grids)], grids)
        keys.pixels, keys.images = pixels, images
        # pixel_values: the processed images' (all of them when none is held, as the processor returns them;
        # what warm-up prefills); the engine schedules through `schedule`, which takes them per image.
        return {"input_ids": input_ids, "image_grid_thw": grid_t, "pixel_values": processed, "prefix": keys}

    def prompt(self, input_ids: list[int], image_keys: list[str], grids: list[list[int]]) -> PromptKeys:
        tokens = [_patches(g) // self.merge**2 for g in grids]  # the processor's pad tokens per image
        keys, image_first, image_last, j, left = list(input_ids), [], [], 0, 0
        for pos, token in enumerate(input_ids):
            if token != self.image_token:
                continue
            if left == 0:
                left = tokens[j]
                j += 1
                image_first.append(pos)
            keys[pos] = image_keys[j - 1]
            left -= 1
            if left == 0:
                image_last.append(pos)
        boundary = 0
        if self.boundary_token is not None and self.snapshots.budget:
            boundary = max((p for p, t in enumerate(input_ids) if t == self.boundary_token), default=0)
        return PromptKeys(tuple(keys), image_keys, image_first, image_last, boundary, [None] * len(grids), [])

    # ---- planning (the engine loop) -----------------------------------------------------------------
    def begin_plan(self, plan: StepPlan) -> None:
        self.plan = plan
        self.snapshots.pinned.clear()
        self.images.pinned.clear()

    def lookup(self, prompt: PromptKeys | None) -> tuple[int | None, int]:
        """The longest held prefix the prompt starts with (at least one token is left to prefill, for the
        logits): (snapshot id, its length), or (None, 0). Changes nothing."""
        if prompt is None or not self.snapshots.budget:
            return None, 0
        n, best, length = len(prompt.keys), None, 0
        for snapshot_id, keys in self.prefixes.items():
            if length < len(keys) < n and prompt.keys[:len(keys)] == keys:
                best, length = snapshot_id, len(keys)
        return best, length

    def shared_blocks(self, snapshot_id: int | None, length: int) -> tuple[list[int], int | None]:
        """A snapshot's KV blocks as a sequence continuing it takes them: the full blocks, shared, and the
        partial last one (None: none), which the sequence copies, since it writes the rest of it."""
        if snapshot_id is None or self.pool is None:
            return [], None
        blocks, full = self.blocks[snapshot_id], length // self.pool.block_size
        return blocks[:full], (blocks[full] if length % self.pool.block_size else None)

    def reclaim(self, n: int) -> None:
        """Evict snapshots, least recently used first, until the pool has n free blocks (or none is left
        that this plan does not use)."""
        for snapshot_id in list(self.snapshots.sizes):
            if len(self.pool.free) >= n:
                return
            if snapshot_id not in self.snapshots.pinned:
                self.snapshots.used -= self.snapshots.sizes.pop(snapshot_id)
                self._drop(snapshot_id)
                self.plan.evict_snapshots.append(snapshot_id)
                self.m_evictions.inc()
        self.m_bytes.set(self.snapshots.used)

    def _drop(self, snapshot_id: int) -> None:
        del self.prefixes[snapshot_id]
        if self.pool is not None:
            self.pool.release(self.blocks.pop(snapshot_id))

    def reuse(self, prompt: PromptKeys | None, hit: tuple[int | None, int] | None = None) -> int:
        """A new sequence: continue the held prefix `hit` (lookup's; None: look it up). Returns the prompt
        tokens already there (0: none)."""
        if prompt is None or not self.snapshots.budget:
            return 0
        best, length = hit if hit is not None else self.lookup(prompt)
        if best is None:
            self.m_misses.inc()
            return 0
        self.snapshots.touch(best)
        self.m_hits.inc()
        self.m_cached.inc(length)
        prompt.restore, prompt.cached = best, length
        return length

    def schedule(self, prompt: PromptKeys | None, item: Prefill, pixel_values: torch.Tensor | None,
                 blocks: list[int] | None = None) -> tuple[list[Prefill], torch.Tensor | None]:
        """The plan items for one prefill chunk (split where a snapshot is taken) and, for a first chunk,
        the pixels to broadcast: only those of the images the vision tower has to encode. `blocks`: the
        sequence's KV blocks (a snapshot keeps those of its prefix)."""
        if prompt is None:
            return [item], pixel_values
        first = item.start == prompt.cached
        if first:
            item.restore = prompt.restore
            pixel_values = self._images(prompt, item)
        b = prompt.boundary
        if not (item.start < b <= item.end):
            return [item], pixel_values
        if first and prompt.restore is not None and all(  # ... and the job will find its images' embeddings
                key is not None for key, first_pos, last in zip(item.image_keys, prompt.image_first, prompt.image_last)
                if last >= item.start and first_pos < b):
            prompt.deferred = True  # a hit: the snapshot is taken by a job when the sequence ends (finished)
            return [item], pixel_values
        snapshot_id = self._admit_snapshot(prompt.keys[:b], blocks)
        if snapshot_id is None:
            return [item], pixel_values
        if b == item.end:
            item.save = snapshot_id
            return [item], pixel_values
        rest = Prefill(item.slot, item.input_ids, start=b, end=item.end)
        item.end, item.save = b, snapshot_id
        return [item, rest], pixel_values

    def _admit_snapshot(self, keys: tuple, blocks: list[int] | None) -> int | None:
        for snapshot_id, held in self.prefixes.items():
            if held == keys:  # the same prefix is held already (e.g. the same prompt twice)
                self.snapshots.touch(snapshot_id)
                return None
        snapshot_id = next(self.ids)
        evicted = self.snapshots.admit(snapshot_id, self.snapshot_nbytes(len(keys)))
        if evicted is None:
            return None
        for old in evicted:
            self._drop(old)
        self.prefixes[snapshot_id] = keys
        if self.pool is not None:  # the prefix's blocks, held by the snapshot too
            self.blocks[snapshot_id] = blocks[:self.pool.blocks_for(len(keys))]
            self.pool.share(self.blocks[snapshot_id])
        self.plan.evict_snapshots.extend(evicted)
        self.m_evictions.inc(len(evicted))
        self.m_bytes.set(self.snapshots.used)
        return snapshot_id

    def finished(self, plan: StepPlan, seq) -> int:
        """A sequence ended (done or cancelled) and left its slot: the snapshot job its prompt deferred, as the
        first item of the slot in this plan. Returns its prompt tokens. Nothing when what it needs is gone."""
        prompt = seq.prefix
        if prompt is None or not prompt.deferred:
            return 0
        prompt.deferred = False
        b = prompt.boundary
        keys, sources = [], []
        for key, first_pos, last in zip(prompt.image_keys, prompt.image_first, prompt.image_last, strict=True):
            needed = last >= prompt.cached and first_pos < b
            if needed and key not in self.images:
                return 0  # evicted since: no snapshot of this prompt (the next turn continues an older one)
            keys.append(key if needed else None)
            sources.append("cache" if needed else "skip")
        if prompt.restore not in self.prefixes:
            return 0
        self.snapshots.touch(prompt.restore)
        blocks, copies = None, []
        if self.pool is not None:  # the job's blocks: the restored prefix's, then [cached, b) in new ones
            shared, tail = self.shared_blocks(prompt.restore, prompt.cached)
            need = self.pool.blocks_for(b) - len(shared)
            if len(self.pool.free) < need:
                return 0  # the cache is full: no snapshot of this prompt (it is an optimisation)
            self.pool.share(shared)
            blocks = shared + self.pool.allocate(need)
            copies = [(tail, blocks[len(shared)])] if tail is not None else []
        for key in keys:
            if key is not None:
                self.images.touch(key)
        snapshot_id = self._admit_snapshot(prompt.keys[:b], blocks)
        if self.pool is not None:
            self.pool.release(blocks)  # the snapshot holds them now (or, not admitted, nobody)
        if snapshot_id is None:
            return 0
        plan.prefill.append(Prefill(seq.slot, seq.input_ids, seq.image_grid_thw, None, prompt.cached, b,
                                    restore=prompt.restore, save=snapshot_id, image_keys=keys,
                                    image_source=sources, snapshot_only=True, blocks=blocks, copy_blocks=copies))
        self.m_jobs.inc()
        return b - prompt.cached

    def _images(self, prompt: PromptKeys, item: Prefill) -> torch.Tensor | None:
        """Per image: skip (inside the restored prefix), cache (held) or encode (kept if the budget allows)."""
        keys, sources, rows = [], [], []
        for j, (key, last, grid) in enumerate(zip(prompt.image_keys, prompt.image_last, item.image_grid_thw,
                                                  strict=True)):
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
                rows.append(prompt.pixels[j] if prompt.pixels[j] is not None else self._late(prompt.images[j]))
                self.m_image_misses.inc()
                evicted = self.images.admit(key, self.image_nbytes(grid)) if self.images.budget else None
                if evicted is not None:
                    keep = key
                    self.plan.evict_images.extend(evicted)
                    self.m_image_evictions.inc(len(evicted))
            keys.append(keep)
            sources.append(source)
        prompt.pixels = [None] * len(prompt.pixels)  # handed over: the host copy is not needed any more
        self.m_image_bytes.set(self.images.used)
        item.image_keys, item.image_source = keys, sources
        pixels = torch.cat(rows) if rows else None
        item.pixels_shape = tuple(pixels.shape) if pixels is not None else None
        return pixels

    def _late(self, data: bytes) -> torch.Tensor:
        """Pixels of an image whose embeddings were held when its request was prepared and have been evicted
        since (the same bytes give the same grid). On the engine loop: rare under a sane budget."""
        out = self.processor.image_processor(images=[open_image(data)], return_tensors="pt", **self.image_device)
        return out["pixel_values"].cpu()
