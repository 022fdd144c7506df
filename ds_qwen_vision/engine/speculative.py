"""Speculative decoding, rank 0's host side: the n-gram drafter, acceptance, per-sequence bookkeeping, metrics.

Each step a decoding sequence is scheduled as a verify row `[token to feed, drafts...]` (runner/
speculative.py runs it: T = k + 1 positions in one forward). From the T logits rows rank 0 accepts:
- greedy (temperature 0): the longest draft prefix equal to the target's argmax, then the target's own
  token at the first mismatch (or after the last draft): exactly the tokens plain greedy decoding gives;
- sampled: speculative sampling (Leviathan et al. / Chen et al.): draft d_i is accepted with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from the residual
  max(0, p_i - q_i) / sum; if all are accepted, one more from p_k. The output then follows p exactly.
  Both drafters here are deterministic (n-gram lookup, the MTP head's argmax), i.e. q_i is one-hot:
  accept with probability p_i(d_i), residual = p_i without d_i. Draws use the request's own generator.
The number accepted goes to the runner in the next plan (StepPlan.accept), which selects the state.

A step that must know the accepted counts before planning the next is synchronous (`holds`): the host
reads the verify's tokens back before the next plan. A step whose sequences all decode without drafts
(they stopped drafting, or never draft) runs as a plain one, overlapped with the host's work: its tokens
are fed on the device and the next plan's rows say FROM_DEVICE (the engine's loop, engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from prometheus_client import Counter

from ..plan import FROM_DEVICE

NGRAM_MAX, NGRAM_MIN = 3, 1
# A sequence whose drafts keep failing stops drafting (so it never runs slower than without them):
# after STOP_AFTER verifies, if fewer than STOP_BELOW drafts per verify were accepted on average; and
# sooner, after STOP_EARLY verifies that accepted nothing at all. Measured on one H200 (27B shapes,
# 2026-12-02): an MTP verify step with its k=3 drafts costs 1.34x the plain step, so it pays from ~0.34
# accepted drafts per verify; 16 failed probes cost a 64-token answer 7.5%, 4 cost it ~2%. A stream
# that accepts 88/77/66% at positions 1/2/3 fails 4 verifies in a row with probability 0.12^4 = 2e-4.
STOP_AFTER, STOP_BELOW, STOP_EARLY = 16, 0.4, 4


class NgramIndex:
    """Prompt lookup over one sequence's tokens: where each n-gram (n in [NGRAM_MIN, NGRAM_MAX]) last
    occurred, kept incrementally, so a draft costs O(n) dictionary look-ups however long the sequence."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence, the suffix excluded
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            # the n-grams that end at the current last token become "earlier" occurrences
            end = len(self.tokens)
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self.last[tuple(self.tokens[end - n:end])] = end - n
            self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """The k tokens that followed the most recent earlier occurrence of the longest suffix n-gram."""
        t = self.tokens
        for n in range(min(NGRAM_MAX, len(t)), NGRAM_MIN - 1, -1):
            start = self.last.get(tuple(t[len(t) - n:]))
            if start is not None:
                return t[start + n:start + n + k]
        return []


def accept_greedy(drafts: list[int], argmax: list[int]) -> list[int]:
    """argmax: the target's greedy token at each of the len(drafts) + 1 positions. Returns the tokens the
    sequence gets: the accepted drafts and the target's next token."""
    out = []
    for d, t in zip(drafts, argmax):
        out.append(t)
        if t != d:
            return out
    out.append(argmax[len(drafts)])
    return out


def accept_sampled(drafts: list[int], probs: torch.Tensor, generator: torch.Generator | None,
                   draft_probs: torch.Tensor | None = None) -> list[int]:
    """Speculative sampling. probs [>= len(drafts) + 1, vocab]: the target distribution at each position;
    draft_probs [len(drafts), vocab] the drafter's (None: a deterministic drafter, one-hot q)."""
    k = len(drafts)
    if k == 0:
        return [int(torch.multinomial(probs[0], 1, generator=generator))]
    device = probs.device
    d = torch.tensor(drafts, device=device)
    p_d = probs[torch.arange(k, device=device), d]
    q_d = torch.ones_like(p_d) if draft_probs is None else draft_probs[torch.arange(k, device=device), d]
    u = torch.rand(k, generator=generator, device=device, dtype=probs.dtype)
    ok = (u * q_d < p_d).tolist()  # u < min(1, p/q) without dividing by a zero q
    a = ok.index(False) if False in ok else k
    if a == k:
        last = probs[k]
    else:
        q = torch.zeros_like(probs[a]).scatter_(0, d[a:a + 1], 1.0) if draft_probs is None else draft_probs[a]
        last = (probs[a] - q).clamp(min=0)
        if float(last.sum()) <= 0:  # p == q: the rejection had probability 0; keep p
            last = probs[a]
    return drafts[:a] + [int(torch.multinomial(last / last.sum(), 1, generator=generator))]


def target_probs(logits: torch.Tensor, sampling) -> torch.Tensor:
    """The distribution plain sampling draws from at each of the rows of logits [T, vocab]: the sampler's own
    transform (engine/sampling.filter_logits: temperature, top-k, top-p, min-p) with the request's values."""
    from .sampling import RowParams, filter_logits

    rows = logits.float()
    params = RowParams.build([sampling] * rows.shape[0], [None] * rows.shape[0], rows.shape[-1], rows.device)
    return filter_logits(rows, params).softmax(dim=-1).double()


@dataclass
class SeqSpec:
    """One sequence's speculation state."""
    index: NgramIndex | None = None
    accept: int | None = None     # accepted position of the last verify, for the next plan
    verifies: int = 0
    accepted: int = 0
    drafting: bool = True
    tokens: list[int] = field(default_factory=list)


class Speculator:
    def __init__(self, method: str, k: int, registry, rows: int | None = None):
        # rows: the slots [0, rows) have verify buffers (runner/speculative.py); a sequence in a higher slot
        # decodes one token a step (None: every slot verifies)
        self.method, self.k, self.rows = method, k, rows
        self.m_drafts = Counter("dsqv_spec_draft_tokens", "Draft tokens verified", registry=registry)
        self.m_accepted = Counter("dsqv_spec_accepted_tokens", "Draft tokens accepted", registry=registry)
        self.m_pos_drafts = Counter("dsqv_spec_position_drafts", "Drafts verified at each draft position",
                                    ["position"], registry=registry)
        self.m_pos_accepted = Counter("dsqv_spec_position_accepted", "Drafts accepted at each draft position "
                                      "(acceptance = accepted / drafts per position)", ["position"], registry=registry)
        # each position's counters, looked up once: record() runs per verified row while a held step's GPU waits
        self.pos_drafts = [self.m_pos_drafts.labels(str(i + 1)) for i in range(k)]
        self.pos_accepted = [self.m_pos_accepted.labels(str(i + 1)) for i in range(k)]

    def start(self, seq) -> None:
        # Penalties and logprobs depend on each token's predecessors (and need the sampler's per-token state):
        # such sequences decode one token a step (in a verify batch they take its first position only).
        s = seq.sampling
        plain = not (s.penalised or s.logprobs)
        seq.spec = SeqSpec(index=NgramIndex(seq.input_ids) if self.method == "ngram" else None, drafting=plain)

    def schedule(self, plan, seq) -> None:
        """The sequence's part of the plan: the accept of its last verify, then a verify or a plain decode."""
        s = seq.spec
        if s.accept is not None:
            plan.accept.append((seq.slot, s.accept))
            s.accept = None
        # drafts past max_tokens could never be used (in_flight: the last held step's tokens, not delivered yet)
        room = seq.sampling.max_tokens - seq.generated - seq.in_flight - 1
        if not s.drafting or room < 1 or (self.rows is not None and seq.slot >= self.rows):
            # a plain row, as the plain scheduler's: its token where the last step left it, max_tokens
            # counted with the tokens still in flight
            if seq.generated + seq.in_flight < seq.sampling.max_tokens:
                plan.decode.append((seq.slot, FROM_DEVICE if seq.fed else seq.next_token))
                seq.in_flight += 1
            return
        if self.method == "ngram":
            s.index.extend([seq.next_token])
            drafts = s.index.draft(min(self.k, room))
            if not drafts:
                plan.decode.append((seq.slot, seq.next_token))
                return
            plan.verify.append((seq.slot, [seq.next_token] + drafts))
        else:
            plan.verify.append((seq.slot, [seq.next_token]))

    def merge(self, plan) -> None:
        """One forward for the decoding rows where it can: when some rows verify, the plain decode rows with
        verify buffers join the verify (a verify row without drafts is a decode); rows above them, and rows
        whose token is on the device (a verify row's tokens come from the host), decode in a forward of
        their own; without verify rows the step stays a plain decode."""
        if plan.verify and plan.decode:
            rows = self.rows if self.rows is not None else float("inf")
            joins = [(slot, token) for slot, token in plan.decode if slot < rows and token != FROM_DEVICE]
            plan.verify.extend((slot, [token]) for slot, token in joins)
            plan.decode = [row for row in plan.decode if row not in joins]

    def holds(self, plan, running) -> bool:
        """Whether the step's tokens must reach the host before the next plan (StepPlan.hold): it verifies,
        or a sequence in it drafts (its next drafts, or its next verify row, start from its token; one in a
        slot without verify buffers never does)."""
        slots = [slot for slot, _ in plan.decode] + [  # a prompt's last chunk gives its first token
            p.slot for p in plan.prefill if not p.snapshot_only and p.end in (None, len(p.input_ids))]
        return bool(plan.verify) or any(running[slot].spec.drafting and (self.rows is None or slot < self.rows)
                                        for slot in slots if slot in running)

    def drafts(self, seq, verified: list[int]) -> list[int]:
        """The drafts of a verified row the sequence can use: none if it does not draft, none past max_tokens."""
        if not seq.spec.drafting:
            return []
        room = seq.sampling.max_tokens - seq.generated - seq.in_flight
        return verified[1:][:max(0, room - 1)]

    def tokens(self, seq, logits: torch.Tensor, drafts: list[int], argmax: list[int] | None = None) -> list[int]:
        """The tokens a verified row gives the sequence (accepted drafts, then the target's own);
        logits [T, vocab] of the row, drafts as drafts() gave them; `argmax`: the row's argmax at each
        position where the caller has it on the host already (greedy)."""
        if seq.sampling.greedy or seq.generator is None:
            top = argmax if argmax is not None else logits[:len(drafts) + 1].argmax(-1).tolist()
            out = accept_greedy(drafts, top[:len(drafts) + 1])
        else:
            out = accept_sampled(drafts, target_probs(logits[:len(drafts) + 1], seq.sampling), seq.generator)
        return self.record(seq, out, drafts)

    def record(self, seq, out: list[int], drafts: list[int]) -> list[int]:
        """The outcome of a verify (`out`: the accepted drafts, then the target's token) into the sequence's
        state (the next plan's accept), its drafter, the counters and the stop-drafting rule. Returns out."""
        s = seq.spec
        a = len(out) - 1
        s.accept = a
        if self.method == "ngram":
            s.index.extend(out[:-1])  # the last one is fed next step (schedule() adds it)
        s.verifies += 1
        s.accepted += a
        self.m_drafts.inc(len(drafts))
        self.m_accepted.inc(a)
        for i in range(len(drafts)):
            self.pos_drafts[i].inc()
            if i < a:
                self.pos_accepted[i].inc()
        if (s.verifies >= STOP_AFTER and s.accepted / s.verifies < STOP_BELOW) or \
                (s.verifies >= STOP_EARLY and s.accepted == 0):
            # From now on a plain decode row (merged into a verify batch it takes position 0 only, and an
            # MTP head's drafts for it are ignored).
            s.drafting = False
        return out
