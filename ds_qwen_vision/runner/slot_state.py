"""Every slot's sequence state, allocated once, and the view of it that transformers' layers see as their cache."""
from __future__ import annotations

import torch

from ..kernels.decode_attention import Fp8Pool, PagedKV, quantize_fp8
from ..model import to_device


class SlotState:
    """Every sequence's state, allocated once.

    Full attention: one pool of KV blocks per layer, [blocks, kv heads, block_size, head dim], shared by every
    slot through its row of `table` (this slot's position p is in block table[slot, p // block_size]). Rank 0
    decides which blocks a sequence holds and the step plan carries them (plan.Prefill.blocks), so every rank
    holds the same table. Block 0 is the null block: never given to a sequence, it is where an unmapped
    position points, so padding and idle rows write there harmlessly.
    Gated DeltaNet: the conv + recurrent state of each slot (row r = slot r), a fixed size per sequence.

    The exact cache is the default: KV in the model's dtype and the recurrent state in float32 (the
    checkpoint's mamba_ssm_dtype, the recurrence kernels' own). `kv_fp8` stores KV as float8 e4m3 with a
    scale per vector (kernels/decode_attention.Fp8Pool) and `state_dtype` bfloat16 halves the recurrent
    state: options that double what the memory holds, at an accuracy cost docs/benchmarks.md measures.
    """

    def __init__(self, model, max_slots: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 num_blocks: int | None = None, block_size: int = 64, kv_fp8: bool = False,
                 state_dtype: torch.dtype = torch.float32):
        self.block_size = block_size
        self.kv_fp8 = kv_fp8
        self.blocks_per_seq = -(-max_len // block_size)
        if num_blocks is None:  # every slot can hold max_len (what a static cache held), plus the null block
            num_blocks = max_slots * self.blocks_per_seq + 1
        self.num_blocks = num_blocks
        self.table = torch.zeros((max_slots, self.blocks_per_seq), dtype=torch.int32, device=device)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        self.gdn_layers: list[int] = []
        gdn = None
        for i, layer in enumerate(model.model.language_model.layers):
            if hasattr(layer, "linear_attn"):
                gdn = layer.linear_attn  # head counts are this rank's (tp_policy.shard_gated_deltanet)
                self.gdn_layers.append(i)
            else:
                self.kv[i] = kv_pool(layer.self_attn, num_blocks, block_size, device, dtype, kv_fp8)
        # The GDN states of all layers in one tensor each ([layers, slots, ...], per-layer views in
        # conv / recurrent), so that selecting a speculative step's accepted state is one copy per kind.
        n = len(self.gdn_layers)
        self.conv_shape = (gdn.conv1d.weight.shape[0], gdn.conv_kernel_size) if gdn is not None else (0, 0)
        self.rec_shape = (gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim) if gdn is not None else (0, 0, 0)
        self.conv_all = torch.zeros((n, max_slots, *self.conv_shape), dtype=dtype, device=device)
        self.rec_all = torch.zeros((n, max_slots, *self.rec_shape), dtype=state_dtype, device=device)
        for j, i in enumerate(self.gdn_layers):
            self.conv[i], self.recurrent[i] = self.conv_all[j], self.rec_all[j]
        self.gdn_index = {i: j for j, i in enumerate(self.gdn_layers)}
        # Speculative verify (alloc_steps): the state after each of T positions, [layers, slots, T, ...].
        self.conv_steps: torch.Tensor | None = None
        self.rec_steps: torch.Tensor | None = None
        # Other pools that use the same block ids (the MTP head's layer, runner/speculative.py): a block
        # copy copies them too.
        self.extra_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def alloc_steps(self, t: int, slots: int) -> None:
        """Room for the GDN state after each of t verified positions, for slots [0, slots) and every layer."""
        n = self.conv_all.shape[0]
        self.conv_steps = torch.zeros((n, slots, t, *self.conv_shape), dtype=self.conv_all.dtype,
                                      device=self.conv_all.device)
        self.rec_steps = torch.zeros((n, slots, t, *self.rec_shape), dtype=self.rec_all.dtype,
                                     device=self.rec_all.device)

    def select_steps(self, slots: torch.Tensor, index: torch.Tensor) -> None:
        """Rollback without recompute: slot slots[i] takes the state after its verified position index[i]."""
        self.conv_all[:, slots] = self.conv_steps[:, slots, index]
        self.rec_all[:, slots] = self.rec_steps[:, slots, index]

    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """The slot's block table from now on: `blocks` in position order, the rest the null block."""
        row = torch.zeros(self.blocks_per_seq, dtype=torch.int32)
        row[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.table[slot].copy_(to_device(row, self.table.device))

    def static_blocks(self, slot: int) -> list[int]:
        """A slot's fixed share of a pool sized for every slot (num_blocks None): the blocks of a first chunk
        that comes without rank 0's (a runner driven directly, as tests and benchmarks do)."""
        slots, n = self.table.shape
        if self.num_blocks < slots * n + 1:
            raise ValueError(f"slot {slot}: a first prefill chunk without its KV blocks (plan.Prefill.blocks), "
                             f"and the pool ({self.num_blocks} blocks) has no fixed share per slot")
        return list(range(1 + slot * n, 1 + (slot + 1) * n))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block src's keys and values into block dst, in every pool (a restored prefix's partial last block:
        the new sequence writes the rest of it)."""
        src = to_device(torch.tensor([s for s, _ in pairs]), self.table.device)
        dst = to_device(torch.tensor([d for _, d in pairs]), self.table.device)
        for t in self.kv_tensors():
            t[dst] = t[src]

    def kv_tensors(self) -> list[torch.Tensor]:
        """Every tensor of every pool, block-major (an FP8 pool's data as bytes, and its scales)."""
        pools = [p for kv in (*self.kv.values(), *self.extra_kv.values()) for p in kv]
        return [t for p in pools for t in ((p.data.view(torch.uint8), p.scale) if isinstance(p, Fp8Pool) else (p,))]

    def kv_bytes_per_block(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.kv_tensors())

    def nbytes(self) -> int:
        tensors = self.kv_tensors() + [self.conv_all, self.rec_all, self.table]
        tensors += [t for t in (self.conv_steps, self.rec_steps) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def kv_pool(attn, num_blocks: int, block_size: int, device, dtype, fp8: bool = False) -> tuple:
    """One attention layer's key and value blocks, [blocks, this rank's kv heads, block_size, head dim]
    (fp8: kernels/decode_attention.Fp8Pool each)."""
    shape = (num_blocks, attn.k_proj.weight.shape[0] // attn.head_dim, block_size, attn.head_dim)
    if fp8:
        return tuple(Fp8Pool(torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
                             torch.zeros(shape[:-1], dtype=torch.float32, device=device)) for _ in "kv")
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def write_kv(pools: tuple, block_size: int, table: torch.Tensor,
             positions: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """key / value [b, heads, T, dim] at positions [b, T] of rows whose block tables are table [b, blocks]."""
    blocks = table.gather(1, positions // block_size).long()  # [b, T]
    offsets = positions % block_size
    for pool, x in zip(pools, (key, value)):
        x = x.transpose(1, 2)  # the indexed result is [b, T, heads, dim]
        if isinstance(pool, Fp8Pool):
            data, scale = quantize_fp8(x)
            pool.data.view(torch.uint8)[blocks, :, offsets] = data.view(torch.uint8)
            pool.scale[blocks, :, offsets] = scale
        else:
            pool[blocks, :, offsets] = x


def paged(state, table: torch.Tensor, qpos: torch.Tensor) -> PagedKV:
    """The attention mask argument of rows with block tables `table` [b, blocks] whose queries sit at
    qpos [b, T] (each attends to the positions up to its own)."""
    return PagedKV(table, qpos, state.block_size)


class CacheView:
    """The `past_key_values` transformers' layers see: some slots of SlotState (or of a pool with the same block
    table, as the MTP head's).

    Eager prefill: one row, prompt tokens [start, start + n) (start > 0 continues a chunked prefill).
    Decode: rows [0, b), one token each, written at `positions` [b]; with `active`, only those rows keep
    their new GDN state (None: every row decodes).
    Verify (speculative): rows [0, b), T tokens each, written at `positions` [b, T]; the GDN state after
    each position goes to SlotState's step buffers (`steps=True`), the slots' own state is untouched
    until SlotState.select_steps picks the accepted position.
    Full attention writes the new keys through the rows' block tables and reads the pools with `mask()`
    (kernels/decode_attention.PagedKV); a first prefill chunk attends to its own keys (SDPA, causal).
    Implements the part of transformers' Cache interface that Qwen3.5 layers call; decode and verify
    GDN layers use gdn_step_state (kernels/gdn.py).
    """

    def __init__(self, state, rows: slice, start: int = 0, positions: torch.Tensor | None = None,
                 active: torch.Tensor | None = None, steps: bool = False):
        self.state, self.rows, self.start, self.positions = state, rows, start, positions
        self.active = active
        self.steps = steps
        self.gdn_step = None if positions is None else ("verify" if steps else "decode")
        self.table = state.table[rows]

    def mask(self, n: int | None = None) -> PagedKV | None:
        """The full-attention mask argument of this view's queries: decode / verify rows at their positions;
        an eager chunk of n tokens at start.. (None for a first chunk: causal over its own keys)."""
        if self.positions is not None:
            return paged(self.state, self.table, self.positions.view(self.table.shape[0], -1))
        if self.start == 0:
            return None
        return paged(self.state, self.table, torch.arange(self.start, self.start + n, device=self.table.device)[None])

    # full-attention layers
    def update(self, key, value, layer_idx, *args, **kwargs):
        pools = self.state.kv[layer_idx]
        if self.positions is None:
            positions = torch.arange(self.start, self.start + key.shape[2], device=key.device)[None]
        else:
            positions = self.positions.view(key.shape[0], -1)
        write_kv(pools, self.state.block_size, self.table, positions, key, value)
        if self.positions is None and self.start == 0:
            return key, value  # a new sequence's first chunk sees only its own keys
        return pools

    # Gated DeltaNet layers, decode / verify (kernels/gdn.py)
    def gdn_step_state(self, layer_idx):
        """kernels/gdn.gdn_multi_token's state arguments: the rows' conv and recurrent state, the rows that
        keep their new state (decode), or the step buffers that take the state after each position (verify)."""
        conv, recurrent = self.state.conv[layer_idx][self.rows], self.state.recurrent[layer_idx][self.rows]
        if not self.steps:
            return conv, recurrent, self.active, None, None
        j = self.state.gdn_index[layer_idx]
        return conv, recurrent, None, self.state.conv_steps[j, self.rows], self.state.rec_steps[j, self.rows]

    # Gated DeltaNet layers, eager prefill (transformers' own path)
    def is_recording_past(self, layer_idx) -> bool:
        return False

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.state.conv[layer_idx][self.rows] if self.start > 0 else None

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.state.recurrent[layer_idx][self.rows] if self.start > 0 else None

    def update_conv_state(self, new, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        """Prefill: the window the causal conv needs (left context + new), keeping its last kernel columns."""
        conv = self.state.conv[layer_idx][self.rows]
        if self.start > 0:
            full = torch.cat([conv, new], dim=-1)
        else:  # a new sequence: zeros on the left are the conv's own causal padding
            full = torch.nn.functional.pad(new, (max(0, conv.shape[-1] - new.shape[-1]), 0))
        conv.copy_(full[..., -conv.shape[-1]:])
        return full

    def update_recurrent_state(self, new, layer_idx, state_idx=0, **kwargs):
        recurrent = self.state.recurrent[layer_idx][self.rows]
        recurrent.copy_(new)
        return recurrent


class PrefillView:
    """The cache a prefill chunk sees when it runs from fixed buffers (runner/prefill_graphs.py), so that
    one CUDA graph per chunk size serves every slot and every start: the slot is a tensor (`slot`, [1]),
    the chunk's T positions are `cache_pos` ([T]: the real tokens first, then padding, whose positions
    lie past the prompt's end where the slot writes again before it ever attends, or in the null block),
    `valid` ([T] float, 1 for real tokens) and `conv_index` (the conv window after the last real token, as
    columns of [state | chunk]). Full attention reads the slot's blocks, each query up to its position
    (`mask()`); Gated DeltaNet layers take kernels/gdn.py's chunk forward (`gdn_step == "prefill"`)."""

    gdn_step = "prefill"

    def __init__(self, state: SlotState, slot: torch.Tensor, cache_pos: torch.Tensor, valid: torch.Tensor,
                 conv_index: torch.Tensor):
        self.state, self.slot, self.cache_pos, self.valid, self.conv_index = state, slot, cache_pos, valid, conv_index
        self.table = state.table.index_select(0, slot)  # [1, blocks]

    def mask(self) -> PagedKV:
        return paged(self.state, self.table, self.cache_pos[None])

    def update(self, key, value, layer_idx, *args, **kwargs):
        return self.write(key, value, layer_idx)

    def write(self, key, value, layer_idx):
        """The chunk's keys and values ([1, heads, T, dim]) into the slot's blocks; the layer's pools back."""
        pools = self.state.kv[layer_idx]
        write_kv(pools, self.state.block_size, self.table, self.cache_pos[None], key, value)
        return pools

    def gdn_state(self, layer_idx):
        return (self.state.conv[layer_idx].index_select(0, self.slot),
                self.state.recurrent[layer_idx].index_select(0, self.slot))

    def gdn_update(self, layer_idx, conv_state, rec_state):
        self.state.conv[layer_idx].index_copy_(0, self.slot, conv_state.to(self.state.conv[layer_idx].dtype))
        rec = self.state.recurrent[layer_idx]
        rec.index_copy_(0, self.slot, rec_state.to(rec.dtype))


class MixedView:
    """The cache of a forward that carries one slot's prefill chunk and one decode token for each row of
    the decode batch (runner/prefill_graphs.py, `mixed`): the sequence is [chunk (t positions) | one token
    per decode row], so the step reads the weights once for both. `chunk` is the chunk's PrefillView,
    `decode` the decode rows' CacheView (rows [0, b), `positions`, `active`). Full attention reads the pools
    through kernels/decode_attention.MixedMask (the chunk's and the rows' PagedKV); Gated DeltaNet layers
    take kernels/gdn.py's mixed forward (`gdn_step == "mixed"`)."""

    gdn_step = "mixed"

    def __init__(self, chunk: PrefillView, decode: CacheView, t: int):
        self.chunk, self.decode, self.t = chunk, decode, t

    def update(self, key, value, layer_idx, *args, **kwargs):
        t = self.t
        # the decode rows first: an idle row writes where its slot writes again before attending there
        self.decode.update(key[0, :, t:].transpose(0, 1).unsqueeze(2), value[0, :, t:].transpose(0, 1).unsqueeze(2),
                           layer_idx)
        return self.chunk.write(key[:, :, :t], value[:, :, :t], layer_idx)
