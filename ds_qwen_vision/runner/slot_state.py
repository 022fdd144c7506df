"""Every slot's sequence state, allocated once, and the view of it that transformers' layers see as their cache."""
from __future__ import annotations

import torch


class SlotState:
    """Every slot's sequence state in batched tensors, allocated once; row r belongs to slot r."""

    def __init__(self, model, max_slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
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
                attn = layer.self_attn
                shape = (max_slots, attn.k_proj.weight.shape[0] // attn.head_dim, max_len, attn.head_dim)
                self.kv[i] = (torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device))
        # The GDN states of all layers in one tensor each ([layers, slots, ...], per-layer views in
        # conv / recurrent), so that selecting a speculative step's accepted state is one copy per kind.
        n = len(self.gdn_layers)
        self.conv_shape = (gdn.conv1d.weight.shape[0], gdn.conv_kernel_size) if gdn is not None else (0, 0)
        # float32 like the recurrence kernels' own state (FLA's and transformers' reference)
        self.rec_shape = (gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim) if gdn is not None else (0, 0, 0)
        self.conv_all = torch.zeros((n, max_slots, *self.conv_shape), dtype=dtype, device=device)
        self.rec_all = torch.zeros((n, max_slots, *self.rec_shape), dtype=torch.float32, device=device)
        for j, i in enumerate(self.gdn_layers):
            self.conv[i], self.recurrent[i] = self.conv_all[j], self.rec_all[j]
        self.gdn_index = {i: j for j, i in enumerate(self.gdn_layers)}
        # Speculative verify (alloc_steps): the state after each of T positions, [layers, slots, T, ...].
        self.conv_steps: torch.Tensor | None = None
        self.rec_steps: torch.Tensor | None = None
        # transformers' decode path (causal_conv1d_update) shifts the conv state in place for every row;
        # kept for a view that runs it (decode now goes through kernels/gdn.py, which writes masked rows).
        any_conv = next(iter(self.conv.values()), None)
        self.conv_scratch = torch.zeros_like(any_conv) if any_conv is not None else None

    def alloc_steps(self, t: int) -> None:
        """Room for the GDN state after each of t verified positions, for every slot and layer."""
        n, slots = self.conv_all.shape[:2]
        self.conv_steps = torch.zeros((n, slots, t, *self.conv_shape), dtype=self.conv_all.dtype,
                                      device=self.conv_all.device)
        self.rec_steps = torch.zeros((n, slots, t, *self.rec_shape), dtype=torch.float32, device=self.rec_all.device)

    def select_steps(self, slots: torch.Tensor, index: torch.Tensor) -> None:
        """Rollback without recompute: slot slots[i] takes the state after its verified position index[i]."""
        self.conv_all[:, slots] = self.conv_steps[:, slots, index]
        self.rec_all[:, slots] = self.rec_steps[:, slots, index]

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + [self.conv_all, self.rec_all]
        tensors += [t for t in (self.conv_steps, self.rec_steps) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class CacheView:
    """The `past_key_values` transformers' layers see: rows of SlotState.

    Prefill: one row, prompt tokens [start, start + n) (start > 0 continues a chunked prefill).
    Decode: rows [0, b), one token each, written at `positions` [b]; with `active`, only those rows keep
    their new GDN state (None: every row decodes).
    Verify (speculative): rows [0, b), T tokens each, written at `positions` [b, T]; the GDN state after
    each position goes to SlotState's step buffers (`steps=True`), the slots' own state is untouched
    until SlotState.select_steps picks the accepted position.
    Implements the part of transformers' Cache interface that Qwen3.5 layers call; decode and verify
    GDN layers use gdn_step_state (kernels/gdn.py).
    """

    def __init__(self, state: SlotState, rows: slice, start: int = 0, positions: torch.Tensor | None = None,
                 active: torch.Tensor | None = None, steps: bool = False, span: int | None = None):
        self.state, self.rows, self.start, self.positions = state, rows, start, positions
        self.span = span  # prefill: the keys returned cover [0, span) (None: up to the chunk's end)
        self.active = active
        self.steps = steps
        self.gdn_step = None if positions is None else ("verify" if steps else "decode")
        if positions is not None:
            self.batch_index = torch.arange(rows.stop - rows.start, device=positions.device)

    # full-attention layers
    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = (t[self.rows] for t in self.state.kv[layer_idx])
        if self.positions is None:
            end = self.start + key.shape[2]
            keys[:, :, self.start:end] = key
            values[:, :, self.start:end] = value
            stop = end if self.span is None else self.span
            return keys[:, :, :stop], values[:, :, :stop]
        if self.positions.dim() == 1:
            keys[self.batch_index, :, self.positions] = key[:, :, 0]
            values[self.batch_index, :, self.positions] = value[:, :, 0]
        else:  # [b, T] positions: the indexed result is [b, T, heads, dim]
            keys[self.batch_index[:, None], :, self.positions] = key.transpose(1, 2)
            values[self.batch_index[:, None], :, self.positions] = value.transpose(1, 2)
        return keys, values

    # Gated DeltaNet layers, decode / verify (kernels/gdn.py)
    def gdn_step_state(self, layer_idx):
        """kernels/gdn.gdn_multi_token's state arguments: the rows' conv and recurrent state, the rows that
        keep their new state (decode), or the step buffers that take the state after each position (verify)."""
        conv, recurrent = self.state.conv[layer_idx][self.rows], self.state.recurrent[layer_idx][self.rows]
        if not self.steps:
            return conv, recurrent, self.active, None, None
        j = self.state.gdn_index[layer_idx]
        return conv, recurrent, None, self.state.conv_steps[j, self.rows], self.state.rec_steps[j, self.rows]

    # Gated DeltaNet layers
    def is_recording_past(self, layer_idx) -> bool:
        return False

    def get_conv_state(self, layer_idx, state_idx=0):
        if self.active is not None:
            scratch = self.state.conv_scratch[self.rows]
            scratch.copy_(self.state.conv[layer_idx][self.rows])
            return scratch
        return self.state.conv[layer_idx][self.rows] if self.positions is not None or self.start > 0 else None

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.state.recurrent[layer_idx][self.rows] if self.positions is not None or self.start > 0 else None

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
        if self.active is None:
            recurrent.copy_(new)
            return recurrent
        keep = self.active.view(-1, 1, 1, 1)
        torch.where(keep, new, recurrent, out=recurrent)
        conv = self.state.conv[layer_idx][self.rows]  # this layer's conv step is done by now
        torch.where(keep.view(-1, 1, 1), self.state.conv_scratch[self.rows], conv, out=conv)
        return recurrent


class PrefillView:
    """The cache a prefill chunk sees when it runs from fixed buffers (runner/prefill_graphs.py), so that
    one CUDA graph per chunk size serves every slot and every start: the slot is a tensor (`slot`, [1]),
    the chunk's T positions are `cache_pos` ([T]: the real tokens first, then padding, whose positions
    lie past the prompt's end where the slot writes again before it ever attends), `valid` ([T] float,
    1 for real tokens) and `conv_index` (the conv window after the last real token, as columns of
    [state | chunk]). Full attention sees the slot's whole cache (attention is masked by position);
    Gated DeltaNet layers take kernels/gdn.py's chunk forward (`gdn_step == "prefill"`)."""

    gdn_step = "prefill"

    def __init__(self, state: SlotState, slot: torch.Tensor, cache_pos: torch.Tensor, valid: torch.Tensor,
                 conv_index: torch.Tensor):
        self.state, self.slot, self.cache_pos, self.valid, self.conv_index = state, slot, cache_pos, valid, conv_index

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = self.write(key, value, layer_idx)
        return keys.index_select(0, self.slot), values.index_select(0, self.slot)

    def write(self, key, value, layer_idx):
        """The chunk's keys and values ([1, heads, T, dim]) into the slot's cache; every slot's cache back."""
        keys, values = self.state.kv[layer_idx]
        keys[self.slot, :, self.cache_pos] = key[0].transpose(0, 1)  # [T, heads, dim]
        values[self.slot, :, self.cache_pos] = value[0].transpose(0, 1)
        return keys, values

    def gdn_state(self, layer_idx):
        return (self.state.conv[layer_idx].index_select(0, self.slot),
                self.state.recurrent[layer_idx].index_select(0, self.slot))

    def gdn_update(self, layer_idx, conv_state, rec_state):
        self.state.conv[layer_idx].index_copy_(0, self.slot, conv_state.to(self.state.conv[layer_idx].dtype))
        self.state.recurrent[layer_idx].index_copy_(0, self.slot, rec_state.float())


class MixedView:
    """The cache of a forward that carries one slot's prefill chunk and one decode token for each row of
    the decode batch (runner/prefill_graphs.py, `mixed`): the sequence is [chunk (t positions) | one token
    per decode row], so the step reads the weights once for both. `chunk` is the chunk's PrefillView,
    `decode` the decode rows' CacheView (rows [0, b), `positions`, `active`). Full attention gets every
    slot's cache, and kernels/decode_attention.MixedMask tells it which queries attend to which rows;
    Gated DeltaNet layers take kernels/gdn.py's mixed forward (`gdn_step == "mixed"`)."""

    gdn_step = "mixed"

    def __init__(self, chunk: PrefillView, decode: CacheView, t: int):
        self.chunk, self.decode, self.t = chunk, decode, t

    def update(self, key, value, layer_idx, *args, **kwargs):
        t = self.t
        # the decode rows first: an idle row writes where its slot writes again before attending there
        self.decode.update(key[0, :, t:].transpose(0, 1).unsqueeze(2), value[0, :, t:].transpose(0, 1).unsqueeze(2),
                           layer_idx)
        return self.chunk.write(key[:, :, :t], value[:, :, :t], layer_idx)
