"""Speculative decoding on this rank: the verify step, per-position state selection, the MTP drafter.

A verify step runs the target over T = k + 1 tokens per decoding row ([fed token, k drafts]) in one
forward -- one read of every weight for up to T tokens -- with logits for all T positions. The Gated
DeltaNet conv and recurrent state after each position go to SlotState's step buffers (kernels/gdn.py);
KV is written at the T positions. Rank 0 decides how many drafts each row accepts and says so in the
next plan (`StepPlan.accept`), where the runner first selects the state after the last accepted
position (SlotState.select_steps): rollback without recompute. KV past the accepted length is never
attended (the masks stop at each query's position) and is overwritten when the sequence gets there.

Drafts: `ngram` drafts come from rank 0's host in the plan. `mtp` drafts are made here, on every rank,
by the checkpoint's MTP head (ds_qwen_vision/mtp.py) with its own KV (one full-attention layer) per
slot; its logits are all-reduced like the main model's, so every rank drafts the same tokens
(greedy argmax drafts: a deterministic drafter, so rank 0's acceptance rule needs no draft probabilities).

The MTP head's KV at position i holds the pair (h_i, token_{i+1}), h_i being the main model's last
hidden state (after the final norm) at i -- vLLM's convention. A step for an MTP row with fed token t
at position L first catches up the pairs since the last step (positions L-n .. L-1, the accepted
tokens' hidden states kept from the previous verify, n = accepted + 1, or the prompt's last hidden
state after prefill), drafting d1 from the last; then k - 1 single-position head steps draft d2 .. dk.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from ..model import log, to_device
from . import graphs
from .slot_state import CacheView, kv_pool

METHODS = ("none", "mtp", "ngram")


class VerifiedTokens(Mapping):
    """Each verified slot's T tokens (slot -> list), on their way to the host: MTP drafts are made on the
    device, and reading them at once would make `verify` wait for its own forward. The copy starts at launch
    (pinned memory, an event); the first read waits for it -- on rank 0 after the host's other work for the
    step (engine.py: the last step's text goes out meanwhile), on a follower at its next accept."""

    def __init__(self, slots: list[int], tokens: torch.Tensor):
        self.slots, self.event = slots, None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens
        self._lists: dict[int, list[int]] | None = None

    def _read(self) -> dict[int, list[int]]:
        if self._lists is None:
            if self.event is not None:
                self.event.synchronize()
            self._lists = dict(zip(self.slots, self.host.tolist()))
        return self._lists

    def __getitem__(self, slot: int) -> list[int]:
        return self._read()[slot]

    def __iter__(self):
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)


class Speculation:
    def __init__(self, runner, method: str, k: int, rows: int | None = None):
        if method not in METHODS[1:]:
            raise ValueError(f"speculative.method {method!r}: one of {', '.join(METHODS)}")
        if k < 1:
            raise ValueError(f"speculative.num_tokens is {k}; it must be at least 1")
        self.runner, self.method, self.k, self.t = runner, method, k, k + 1
        # Verify rows: the slots [0, rows) may verify drafts; the others decode one token a step. The step
        # buffers keep T GDN states a row (4 x 72 MiB per row for the 27B at tp=2 with k = 3), which is what
        # bounds speculative concurrency on a small card (runner/memory.py decides; None: every slot).
        slots = self.rows = min(rows or runner.max_slots, runner.max_slots)
        self.batch_sizes = [b for b in runner.batch_sizes if b < slots] + [slots]
        model, device = runner.model, runner.device
        runner.state.alloc_steps(self.t, slots)
        self.lm = model.model.language_model
        # Inputs at fixed addresses, for the graphs: token, cache position, M-RoPE position [slots, T].
        self.verify_in = torch.zeros((3, slots, self.t), dtype=torch.long, device=device)
        self.offsets = torch.arange(self.t, device=device)
        self.hidden: torch.Tensor | None = None  # the final norm's last output (the MTP head's input)
        self.lm.norm.register_forward_hook(self._keep_hidden)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.mtp = None
        if method == "mtp":
            self.mtp = getattr(model, "mtp", None)
            if self.mtp is None:
                raise ValueError("speculative.method mtp: the model was loaded without its mtp.* head")
            self.mtp.config._attn_implementation = model.config.text_config._attn_implementation
            # The head's KV blocks: the same block ids as the main model's (one table), pools of their own.
            state = runner.state
            self.mtp_state = SimpleNamespace(kv={}, table=state.table, block_size=state.block_size)
            for layer in self.mtp.layers:
                attn = layer.self_attn
                self.mtp_state.kv[attn.layer_idx] = kv_pool(attn, state.num_blocks, state.block_size, device,
                                                            runner.dtype, state.kv_fp8)
            state.extra_kv = self.mtp_state.kv
            hidden = model.config.text_config.hidden_size
            # Per slot: the main model's hidden states not yet paired into the head's KV, and their tokens.
            self.pend_hidden = torch.zeros((slots, self.t, hidden), dtype=runner.dtype, device=device)
            self.pend_n = [0] * slots
            self.pend_tokens: list[list[int]] = [[] for _ in range(slots)]
            # The head's inputs at fixed addresses (captured with the verify): catch-up tokens and positions
            # [2, slots, T], the index of each row's last caught-up pair, its M-RoPE offset.
            self.mtp_in = torch.zeros((2, slots, self.t), dtype=torch.long, device=device)
            self.mtp_last = torch.zeros(slots, dtype=torch.long, device=device)
            self.mtp_delta = torch.zeros(slots, dtype=torch.long, device=device)
        # the T tokens of each slot's last verify (host lists, or a VerifiedTokens still on its way)
        self.verified: list[Mapping[int, list[int]] | None] = [None] * slots

    def _keep_hidden(self, module, args, out):
        self.hidden = out

    # ---- rollback -------------------------------------------------------------------------------
    def accept(self, accepts: list[tuple[int, int]]) -> None:
        """The previous verify's first i + 1 tokens of each (slot, i) are the sequence's: keep that state."""
        device = self.runner.device
        for slot, i in accepts:
            if not 0 <= i < self.t:
                raise ValueError(f"slot {slot}: accepted position {i} outside the verified {self.t}")
        slots = torch.tensor([s for s, _ in accepts], device=device)
        index = torch.tensor([i for _, i in accepts], device=device)
        self.runner.state.select_steps(slots, index)
        for slot, i in accepts:
            self.runner.length[slot] += i + 1
            if self.mtp is not None:
                self.pend_n[slot] = i + 1
                self.pend_tokens[slot] = self.verified[slot][slot][1:i + 1]

    # ---- prefill: the MTP head's KV over the prompt -----------------------------------------------
    def after_prefill(self, slot: int, start: int, end: int, n_prompt: int, embeds, positions: torch.Tensor) -> None:
        """Pairs (h_i, token_{i+1}) for the prompt chunk [start, end) into the head's KV; the prompt's last
        hidden state waits for the first sampled token (paired at the slot's first verify). `embeds(s, e)`:
        the prompt's embeddings of positions [s, e); positions: the whole prompt's M-RoPE positions."""
        if self.mtp is None:
            return
        hidden = self.hidden  # [1, end - start, hidden], the chunk's final-norm output
        stop = min(end, n_prompt - 1)
        if stop > start:
            view = CacheView(self.mtp_state, slice(slot, slot + 1), start=start)
            pos = positions[:, :, start:stop]
            self.mtp(embeds(start + 1, stop + 1), hidden[:, :stop - start], self.lm.rotary_emb(hidden, pos),
                     view.mask(stop - start), pos, view)
        if end == n_prompt and slot < self.rows:  # (the head's KV is kept for every slot: a snapshot may be
            self.pend_hidden[slot, 0] = hidden[0, -1]  # restored into a verify row)
            self.pend_n[slot] = 1
            self.pend_tokens[slot] = []

    # ---- MTP drafts ----------------------------------------------------------------------------
    def _mtp_prepare(self, b: int, rows: list[int], fed: list[int]) -> None:
        """The head's inputs for rows [0, b) (host): for each MTP row the pairs to catch up (the tokens after
        the pending hidden states, the fed token last); other rows write where they never attend. Built as
        lists and made tensors once: a held step's GPU waits for this host work."""
        runner, t = self.runner, self.t
        ids = [[0] * t for _ in range(b)]
        first, last = list(runner.length[:b]), [0] * b  # each row's first position, its last caught-up pair
        for r in rows:
            n = self.pend_n[r]
            if n < 1:
                raise ValueError(f"slot {r}: no MTP state (prefill it first)")
            ids[r][:n] = self.pend_tokens[r] + [fed[r]]
            first[r], last[r] = first[r] - n, n - 1
        pos = (torch.tensor(first)[:, None] + torch.arange(t)).clamp(max=runner.kv_len - 1)
        self.mtp_in[:, :b].copy_(torch.stack([torch.tensor(ids), pos]))
        self.mtp_last[:b].copy_(torch.tensor(last))
        self.mtp_delta[:b].copy_(torch.tensor(runner.rope_delta[:b]))

    def _mtp_forward(self, b: int) -> None:
        """k drafts for rows [0, b) into verify_in[0, :b, 1:], on device (reads only the fixed inputs, so it is
        captured with the verify): one catch-up forward over T positions, then k - 1 one-position steps."""
        runner, t, device = self.runner, self.t, self.runner.device
        ids, pos = self.mtp_in[:, :b]
        last, delta = self.mtp_last[:b], self.mtp_delta[:b]
        kv_view = lambda p: CacheView(self.mtp_state, slice(0, b), positions=p)  # noqa: E731
        embed, head = self.lm.embed_tokens, runner.model.lm_head
        # mtp.DraftHead where speculative.draft_vocab is set (serve.py): drafts over part of the vocabulary
        draft = getattr(self.mtp, "draft_head", None)
        if draft is None:
            draft = lambda x: head(x).argmax(-1)  # noqa: E731
        # catch-up: the pairs since the last step, the last of them drafts d1
        mrope = (pos + delta[:, None])[None].expand(3, b, t)
        h = self.pend_hidden[:b]
        view = kv_view(pos)
        out = self.mtp(embed(ids), h, self.lm.rotary_emb(h, mrope), view.mask(), mrope, view)
        h = out[torch.arange(b, device=device), last][:, None]  # [b, 1, hidden]
        token = draft(h)  # [b, 1]
        drafts = [token]
        step_pos = pos.gather(1, last[:, None])  # the position of the last caught-up pair
        for j in range(1, self.k):
            step_pos = (step_pos + 1).clamp(max=runner.kv_len - 1)
            mrope = (step_pos + delta[:, None])[None].expand(3, b, 1)
            view = kv_view(step_pos)
            h = self.mtp(embed(token), h, self.lm.rotary_emb(h, mrope), view.mask(), mrope, view, step=j)
            token = draft(h)
            drafts.append(token)
        self.verify_in[0, :b, 1:] = torch.cat(drafts, dim=1)  # [b, k]; drafts of rows not verifying are unused

    # ---- verify --------------------------------------------------------------------------------
    def _verify_forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T tokens for rows [0, b) (with MTP, its drafts first): logits [b, T, vocab] and final hidden states
        [b, T, hidden]. Reads only verify_in (and the head's fixed inputs), so it can be captured."""
        if self.mtp is not None:
            self._mtp_forward(b)
        ids, positions, mrope = self.verify_in[:, :b]
        view = CacheView(self.runner.state, slice(0, b), positions=positions, steps=True)
        logits = self.runner.model(input_ids=ids, position_ids=mrope[None].expand(3, b, self.t),
                                   past_key_values=view, use_cache=True, logits_to_keep=0,
                                   attention_mask={"full_attention": view.mask(), "linear_attention": None}).logits
        return logits, self.hidden

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """One CUDA graph of the verify (with MTP: its drafts, then the target) per decode batch size (T fixed
        by the config)."""
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.verify_in.zero_()  # no row's own state is touched by a verify (it writes the step buffers)
        if self.mtp is not None:  # the head's KV at positions 0 .. T-1 of every slot: rewritten by any prefill
            self.mtp_in.zero_()
            self.mtp_last.zero_()
            self.mtp_delta.zero_()
        captured = graphs.capture_all({b: lambda b=b: self._verify_forward(b) for b in reversed(self.batch_sizes)},
                                      pool, self.runner.device, warm_runs=2)
        self.graphs = {b: (graph, logits, hidden) for b, (graph, (logits, hidden)) in captured.items()}
        torch.cuda.synchronize()
        log(f"[rank {os.environ.get('RANK', '0')}] captured verify CUDA graphs (T={self.t}) for batch sizes "
            f"{self.batch_sizes}")

    def _inputs(self, items: list[tuple[int, list[int]]], b: int) -> list[int]:
        """verify_in for rows [0, b): each verifying row's tokens (padded to T), cache and M-RoPE positions;
        rows not verifying write KV where their own tokens will go (never attended before rewritten). Built
        as lists and made a tensor once (a held step's GPU waits for this host work). Returns each row's
        first token."""
        runner, t = self.runner, self.t
        ids = [[0] * t for _ in range(b)]
        for slot, tokens in items:
            if not 1 <= len(tokens) <= t:
                raise ValueError(f"slot {slot}: {len(tokens)} tokens to verify; 1 to {t} allowed")
            if runner.length[slot] + t > runner.kv_len:
                raise ValueError(f"slot {slot} is full ({runner.max_len} tokens)")
            ids[slot] = tokens + [tokens[-1]] * (t - len(tokens))
        pos = (torch.tensor(runner.length[:b])[:, None] + torch.arange(t)).clamp(max=runner.kv_len - 1)
        self.verify_in[:, :b].copy_(torch.stack([torch.tensor(ids), pos, pos + torch.tensor(runner.rope_delta[:b])[:, None]]))
        return [row[0] for row in ids]

    @torch.inference_mode()
    def verify(self, items: list[tuple[int, list[int]]]) -> tuple[dict[int, torch.Tensor], dict[int, list[int]]]:
        """T tokens for each (slot, [fed token, host drafts...]) (padded to T; with MTP the drafts are
        made here). Returns per slot the logits [T, vocab] (float32) and the T tokens verified."""
        runner, t = self.runner, self.t
        if max(slot for slot, _ in items) >= self.rows:
            raise ValueError(f"slot {max(slot for slot, _ in items)} verifies; only slots below {self.rows} may")
        b = next(size for size in self.batch_sizes if size > max(slot for slot, _ in items))
        fed = self._inputs(items, b)
        if self.mtp is not None:
            self._mtp_prepare(b, [slot for slot, _ in items], fed)
        if b in self.graphs:
            graph, logits, hidden = self.graphs[b]
            graph.replay()
        else:
            logits, hidden = self._verify_forward(b)
        # From here nothing waits for the forward (pinned index, the tokens copied without a sync): the
        # host is free for other work until it reads the results.
        slots = [slot for slot, _ in items]
        rows = to_device(torch.tensor(slots), runner.device)
        if self.mtp is not None:
            self.pend_hidden[rows] = hidden[rows].to(self.pend_hidden.dtype)
            tokens = VerifiedTokens(slots, self.verify_in[0, rows])  # the head's drafts: on the device
        else:
            tokens = dict(items)  # the host's own drafts
        out = logits[rows].float()
        for slot in slots:
            self.verified[slot] = tokens
        return {slot: out[i] for i, slot in enumerate(slots)}, tokens
