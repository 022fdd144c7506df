"""Every slot's sequence state, allocated once, and the view of it that transformers' layers see as their cache."""
from __future__ import annotations

import torch


class SlotState:
    """Every slot's sequence state in batched tensors, allocated once; row r belongs to slot r."""

    def __init__(self, model, max_slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.language_model.layers):
            if hasattr(layer, "linear_attn"):
                gdn = layer.linear_attn  # head counts are this rank's (tp_policy.shard_gated_deltanet)
                self.conv[i] = torch.zeros(max_slots, gdn.conv1d.weight.shape[0], gdn.conv_kernel_size,
                                           dtype=dtype, device=device)
                # float32 like the recurrence kernels' own state (FLA's and transformers' reference)
                self.recurrent[i] = torch.zeros(max_slots, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim,
                                                dtype=torch.float32, device=device)
            else:
                attn = layer.self_attn
                shape = (max_slots, attn.k_proj.weight.shape[0] // attn.head_dim, max_len, attn.head_dim)
                self.kv[i] = (torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device))
        # Decode runs causal_conv1d_update, which shifts the conv state in place for every row: it
        # shifts this copy, and only the decoding rows are written back.
        any_conv = next(iter(self.conv.values()), None)
        self.conv_scratch = torch.zeros_like(any_conv) if any_conv is not None else None

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + list(self.conv.values()) + list(self.recurrent.values())
        return sum(t.numel() * t.element_size() for t in tensors)


class CacheView:
    """The `past_key_values` transformers' layers see: rows of SlotState.

    Prefill: one row, prompt tokens [start, start + n) (start > 0 continues a chunked prefill).
    Decode: rows [0, b), one token each, written at `positions`; with `active`, only those rows keep
    their new GDN state (None: every row decodes). Implements the part of transformers' Cache
    interface that Qwen3.5 layers call.
    """

    def __init__(self, state: SlotState, rows: slice, start: int = 0, positions: torch.Tensor | None = None,
                 active: torch.Tensor | None = None, span: int | None = None):
        self.state, self.rows, self.start, self.positions = state, rows, start, positions
        self.span = span  # prefill: the keys returned cover [0, span) (None: up to the chunk's end)
        self.active = active
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
        keys[self.batch_index, :, self.positions] = key[:, :, 0]
        values[self.batch_index, :, self.positions] = value[:, :, 0]
        return keys, values

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
