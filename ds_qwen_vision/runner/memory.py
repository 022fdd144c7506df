"""The memory planner: how many sequences and KV blocks this deployment holds, from the memory the ranks have.

In vLLM's order, at start-up, before any cache is allocated: the weights are loaded; a profiling forward
runs the largest shapes a request can bring (the largest prefill chunk, and the largest allowed image
through the vision tower -- capped, and said so, where it does not fit); every rank measures what its
device still has (free, plus what PyTorch's caching allocator holds unused) less what those forwards
needed at their peak; the ranks take the minimum, so that every rank allocates the same caches; then
`memory.gpu_fraction` of it (vLLM's gpu_memory_utilization, of what is left rather than of the card) is
split into

  * the prefix and image caches (`cache.prefix_bytes`, `cache.image_bytes`, as configured);
  * per sequence slot: its Gated DeltaNet state (conv + recurrent, float32 as the checkpoint's
    mamba_ssm_dtype, or memory.gdn_state_dtype) and its small buffers. `limits.max_concurrent` caps the slots; left out, the slots'
    fixed state takes at most a quarter of the budget (at most MAX_CONCURRENT);
  * with speculative decoding, verify rows: the GDN state after each of the k + 1 verified positions
    (rollback without recompute), 4 x 72 MiB a row for the 27B at tp=2 with k = 3. The slots [0, rows)
    verify drafts, the others decode one token a step; at most another quarter of the budget, at least one
    row (on one 32 GB card's twin a slot for every verify row would have left one sequence);
  * KV blocks with the rest: one pool per attention layer (and the MTP head's), shared by every sequence
    through block tables (runner/slot_state.py), so that one long conversation or many short ones use
    the same memory as they come.

`limits.max_prompt_tokens` left out is what fits one sequence (up to the model's positions). A deployment
whose KV cannot hold one request of its own limits refuses to start with the numbers (MemoryError here, a
config error: exit 2). CPU ranks take `memory.cpu_cache_bytes` as the budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..config import MAX_CONCURRENT
from ..model import log, ranks_min

SLOT_SHARE = 0.25  # of the budget, for the slots' fixed state when limits.max_concurrent is left out
GIB = 1 << 30
FP8_CAPABILITY = (8, 9)  # float8 e4m3 in Triton kernels (memory.kv_cache_dtype fp8_e4m3)
IMAGE_FLOOR = 4 << 20  # pixels: images are not capped below 2048 x 2048 to make room for the caches


class PlanError(ValueError):
    """A deployment that cannot serve one request of its own limits: a config error (exit 2)."""


@dataclass
class MemoryPlan:
    max_slots: int          # sequences at once (GDN state rows)
    num_blocks: int         # KV blocks per attention layer, the null block included
    block_size: int
    max_prompt_tokens: int
    max_len: int            # tokens one sequence may hold: prompt + new tokens
    max_image_pixels: int
    kv_tokens: int          # tokens of KV all sequences together can hold
    budget_bytes: int       # what the caches got
    available_bytes: int    # what the device had for them (after weights and activations), the ranks' minimum
    activation_bytes: int   # the profiled forwards' peak beyond the weights
    per_token_bytes: int
    per_slot_bytes: int
    spec_rows: int = 0      # speculative verify rows: slots [0, spec_rows) verify drafts
    per_row_bytes: int = 0  # bytes per verify row
    kv_cache_dtype: str = "auto"      # memory.kv_cache_dtype
    gdn_state_dtype: str = "float32"  # memory.gdn_state_dtype

    def summary(self) -> str:
        return (f"KV capacity: {self.kv_tokens:,} tokens ({self.num_blocks - 1:,} blocks of {self.block_size}), up "
                f"to {self.max_slots} sequences, each up to {self.max_len:,} tokens (prompt up to "
                f"{self.max_prompt_tokens:,}); cache budget {self.budget_bytes / GIB:.2f} GiB of "
                f"{self.available_bytes / GIB:.2f} GiB available after the weights and "
                f"{self.activation_bytes / GIB:.2f} GiB of activations; {self.per_token_bytes / 1024:.1f} KiB per "
                f"token, {self.per_slot_bytes / (1 << 20):.1f} MiB per sequence slot"
                + (f"; speculative drafts verified for up to {self.spec_rows} of them at once "
                   f"({self.per_row_bytes / (1 << 20):.1f} MiB a verify row)" if self.spec_rows else "")
                + (f"; KV {self.kv_cache_dtype}" if self.kv_cache_dtype != "auto" else "")
                + (f"; GDN state {self.gdn_state_dtype}" if self.gdn_state_dtype != "float32" else ""))

    def as_dict(self) -> dict:
        return asdict(self)


def per_token_bytes(model, dtype: torch.dtype, mtp: bool, kv_fp8: bool = False) -> int:
    """KV bytes one token takes on this rank: K and V of every full-attention layer (this rank's heads),
    and of the MTP head's layers with speculative MTP; FP8: one byte a value and a float32 scale a vector
    (kernels/decode_attention.Fp8Pool)."""
    layers = [layer.self_attn for layer in model.model.language_model.layers if not hasattr(layer, "linear_attn")]
    if mtp and getattr(model, "mtp", None) is not None:
        layers += [layer.self_attn for layer in model.mtp.layers]
    size = torch.tensor([], dtype=dtype).element_size()
    if kv_fp8:
        return sum(2 * attn.k_proj.weight.shape[0] + 2 * 4 * attn.k_proj.weight.shape[0] // attn.head_dim
                   for attn in layers)
    return sum(2 * attn.k_proj.weight.shape[0] * size for attn in layers)


def gdn_state_bytes(model, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
    """One sequence's Gated DeltaNet state on this rank: conv windows (model dtype) and recurrent state
    (memory.gdn_state_dtype: float32 by default)."""
    gdn = [layer.linear_attn for layer in model.model.language_model.layers if hasattr(layer, "linear_attn")]
    size, rec = (torch.tensor([], dtype=d).element_size() for d in (dtype, state_dtype))
    return sum(g.conv1d.weight.shape[0] * g.conv_kernel_size * size
               + g.num_v_heads * g.head_k_dim * g.head_v_dim * rec for g in gdn)


def per_slot_bytes(model, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
    """Fixed bytes per sequence slot on this rank: its GDN state and the penalties' per-slot counts
    (engine/sampling.PenaltyState)."""
    return gdn_state_bytes(model, dtype, state_dtype) + model.config.text_config.vocab_size * 5


def verify_row_bytes(model, dtype: torch.dtype, spec_tokens: int, state_dtype: torch.dtype = torch.float32) -> int:
    """Bytes per speculative verify row: the GDN state after each of T = k + 1 verified positions (rollback
    without recompute) and the MTP head's pending hidden states."""
    t = spec_tokens + 1
    size = torch.tensor([], dtype=dtype).element_size()
    return t * gdn_state_bytes(model, dtype, state_dtype) + t * model.config.text_config.hidden_size * size


def _peak(device, fn) -> int:
    """The peak bytes allocated beyond what is allocated now while fn() runs."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def profile_chunk(runner_like, tokens: int) -> int:
    """Peak activation bytes of a first prefill chunk of `tokens` (the largest a step runs)."""
    from .slot_state import CacheView, SlotState

    model, device = runner_like.model, runner_like.device
    text = model.config.text_config
    state = SlotState(model, 1, tokens, device, runner_like.dtype)  # one sequence of one chunk

    def forward():
        embeds = torch.zeros((1, tokens, text.hidden_size), dtype=runner_like.dtype, device=device)
        positions = torch.arange(tokens, device=device).view(1, 1, -1).expand(3, 1, -1)
        model(inputs_embeds=embeds, position_ids=positions, past_key_values=CacheView(state, slice(0, 1)),
              attention_mask={"full_attention": None, "linear_attention": None}, use_cache=True, logits_to_keep=1)

    return _peak(device, forward)


def profile_image(runner_like, pixels: int) -> int | None:
    """Peak activation bytes of the vision tower on a square image of `pixels`; None: out of memory."""
    model, device = runner_like.model, runner_like.device
    vision = model.config.vision_config
    side = max(1, int(math.sqrt(pixels)) // (vision.patch_size * vision.spatial_merge_size))  # merged tokens
    grid = torch.tensor([[1, side * vision.spatial_merge_size, side * vision.spatial_merge_size]], device=device)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2

    def forward():
        x = torch.zeros((int(grid.prod()), width), dtype=runner_like.dtype, device=device)
        model.model.get_image_features(x, grid, return_dict=True)

    try:
        return _peak(device, forward)
    except torch.OutOfMemoryError:
        return None


def plan_memory(runner_like, limits, memory, cache, spec_tokens: int, mtp: bool) -> MemoryPlan:
    """The plan (module docstring). `runner_like`: model, device, dtype (the runner before its caches)."""
    model, device = runner_like.model, runner_like.device
    chunk = min(limits.prefill_chunk_tokens, limits.max_prompt_tokens or limits.prefill_chunk_tokens)
    pixels = limits.max_image_pixels if limits.max_images_per_request > 0 else None
    if device.type != "cuda":
        return split_budget(model, runner_like.dtype, limits, memory, cache, spec_tokens, mtp,
                            memory.cpu_cache_bytes, 0, limits.max_image_pixels, budget_share=1.0)
    # the attention kernels read e4m3 in Triton, which has it from Ada / Hopper on: say so at start, not as a
    # compile error in warm-up (every rank refuses if one must: the ranks agree)
    if memory.kv_cache_dtype == "fp8_e4m3" and ranks_min(
            int(torch.cuda.get_device_capability(device) >= FP8_CAPABILITY), device) == 0:
        raise PlanError(f"memory.kv_cache_dtype fp8_e4m3 needs a GPU of compute capability "
                        f"{'.'.join(map(str, FP8_CAPABILITY))} or newer (Ada, Hopper, Blackwell) on every rank; "
                        f"this rank's is {'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use \"auto\"")
    chunk_peak = profile_chunk(runner_like, chunk)
    image_peak = profile_image(runner_like, pixels) if pixels is not None else 0
    # An image whose vision tower needs more than a prefill chunk takes that memory from the caches for good
    # (its attention spans all of one image's patches): images are capped until it does not, down to 4 MP
    # (2048 x 2048, 4,096 image tokens), and the log says so. The ranks agree on the cap.
    while pixels is not None and pixels >= 2 * IMAGE_FLOOR and ranks_min(
            int(image_peak is not None and image_peak <= chunk_peak), device) == 0:
        log(f"[rank {_rank()}] memory planner: the vision tower on an image of {pixels:,} pixels needs "
            f"{'more than the device has' if image_peak is None else f'{image_peak / GIB:.2f} GiB'}, more than a "
            f"prefill chunk's {chunk_peak / GIB:.2f} GiB; limits.max_image_pixels capped at {pixels // 2:,}")
        pixels //= 2
        image_peak = profile_image(runner_like, pixels)
    if ranks_min(int(image_peak is not None), device) == 0:
        raise PlanError(f"the vision tower runs out of memory on an image of {pixels:,} pixels beside the weights")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # The prefill graphs keep a pool of their own for their largest chunk's activations, beside what eager
    # forwards (longer chunks, the vision tower) take from the caching allocator.
    activation = chunk_peak + max(chunk_peak, image_peak)
    available = ranks_min(free + unused - activation, device)
    plan = split_budget(model, runner_like.dtype, limits, memory, cache, spec_tokens, mtp, available, activation,
                        pixels if pixels is not None else limits.max_image_pixels)
    return plan


def split_budget(model, dtype, limits, memory, cache, spec_tokens: int, mtp: bool, available: int,
                 activation: int, image_pixels: int, budget_share: float | None = None) -> MemoryPlan:
    """What `available` bytes (the ranks' minimum) hold: slots, KV blocks and the limits that follow."""
    text = model.config.text_config
    state_dtype = getattr(torch, memory.gdn_state_dtype)
    token_bytes = per_token_bytes(model, dtype, mtp, memory.kv_cache_dtype == "fp8_e4m3")
    slot_bytes = per_slot_bytes(model, dtype, state_dtype)
    row_bytes = verify_row_bytes(model, dtype, spec_tokens, state_dtype) if spec_tokens else 0
    block = memory.block_size
    slack = spec_tokens + 1  # a verify writes k positions past the length; one step computed past the end
    budget = int(available * (memory.gpu_fraction if budget_share is None else budget_share))
    budget -= cache.prefix_bytes + cache.image_bytes
    longest = text.max_position_embeddings
    want = (limits.max_prompt_tokens + limits.max_new_tokens) if limits.max_prompt_tokens else None
    if limits.max_concurrent is not None:
        slots = min(limits.max_concurrent, MAX_CONCURRENT)
    else:
        slots = max(1, min(MAX_CONCURRENT, int(SLOT_SHARE * budget) // slot_bytes))
    # speculative verify rows (the slots [0, rows) verify drafts, the rest decode one token a step): another
    # share of the budget, at least one
    rows = max(1, min(slots, int(SLOT_SHARE * budget) // row_bytes)) if row_bytes else 0
    # fewer slots (and rows) where the KV left would not hold one request of the limits (or, left out, a
    # useful one)
    need_one = (want or min(longest, 4 * limits.max_new_tokens)) + slack
    while slots > 1 and (budget - slots * slot_bytes - rows * row_bytes) // token_bytes < need_one:
        slots -= 1
        rows = min(rows, slots)
    kv_bytes = budget - slots * slot_bytes - rows * row_bytes
    num_blocks = max(0, kv_bytes // (token_bytes * block))  # the null block is one of them
    kv_tokens = (num_blocks - 1) * block
    if num_blocks < 2 or kv_tokens < need_one:
        raise PlanError(
            f"the KV cache would hold {max(kv_tokens, 0):,} tokens ({max(budget, 0) / GIB:.2f} GiB for caches of "
            f"{available / GIB:.2f} GiB available after the weights and {activation / GIB:.2f} GiB of activations, "
            f"less cache.prefix_bytes + cache.image_bytes = {(cache.prefix_bytes + cache.image_bytes) / GIB:.2f} GiB "
            f"and {slots} sequence slot(s) of {slot_bytes / (1 << 20):.1f} MiB"
            + (f" and {rows} verify row(s) of {row_bytes / (1 << 20):.1f} MiB" if rows else "") + "), but one request of "
            f"limits.max_prompt_tokens + limits.max_new_tokens needs {need_one:,}: lower those limits or the cache "
            f"budgets, or give the deployment more memory (memory.gpu_fraction, more GPUs)")
    max_len = min(kv_tokens - slack, longest)
    if want is not None:
        max_len = min(max_len, want)
    prompt = limits.max_prompt_tokens or max(1, max_len - limits.max_new_tokens)
    return MemoryPlan(slots, num_blocks, block, prompt, max_len, image_pixels, kv_tokens, budget, available,
                      activation, token_bytes, slot_bytes, rows, row_bytes, memory.kv_cache_dtype,
                      memory.gdn_state_dtype)


def _rank() -> str:
    import os

    return os.environ.get("RANK", "0")
