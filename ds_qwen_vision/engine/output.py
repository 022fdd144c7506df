"""The output path (rank 0, host side): each step's picks from the logits, then per sequence its token
into text, tool calls, logprobs and events (ipc.py's contract), and its end.

Per-sequence isolation lives here. The host work of one sequence -- building its sampling parameters, its
grammar's mask, its logprob entries, detokenizing, stop checks, tool-call parsing -- runs inside `guard`:
an exception there ends that request alone (all its choices) with a 500 `internal_error` naming its
request id, which the log carries with the traceback; its slot and KV blocks are freed at the next plan
like any ended sequence's, and every other sequence goes on. What is not one sequence's -- the forward, the
batched draw on the device, reading the step's tokens -- raises out of here and fails the engine (engine.py).
"""
from __future__ import annotations

import traceback

import torch

from ..ipc import delta_event, done_event, error_event
from ..model import log, to_device
from .faults import inject
from .logprobs import TokenBytes
from .sampling import PenaltyState, Picked, RowParams, Sampling, sample
from .sequence import Sequence

# What a failed row samples with until the step it is in is over (its token is never read).
GREEDY = Sampling(max_tokens=1, temperature=0.0)


class Output:
    def __init__(self, intake, max_slots: int, metrics, scheduler):
        self.tokenizer, self.eos_ids, self.grammars = intake.tokenizer, intake.eos_ids, intake.grammars
        self.m, self.scheduler = metrics, scheduler
        self.penalties = PenaltyState(max_slots)
        self.token_bytes = TokenBytes(self.tokenizer)
        self._rows: tuple[tuple[int, ...], RowParams, torch.Tensor] | None = None  # the last step's rows

    # ---- isolation -----------------------------------------------------------------------------------
    def guard(self, seq: Sequence, stage: str, fn, *args):
        """fn(*args), or None after failing seq's request when it raises (the others go on)."""
        try:
            return fn(*args)
        except Exception as e:
            self.fail(seq, stage, e)
            return None

    def fail(self, seq: Sequence, stage: str, error: Exception) -> None:
        """End seq's request: every choice stops (the queued ones leave the queue), one 500 event."""
        if seq.done and seq.cancelled:
            return  # failed already (another of its choices, or an earlier stage of this step)
        log(f"[rank 0] request {seq.request_id}: choice {seq.index} failed in {stage}; the request ends with a 500, "
            f"the others go on\n" + "".join(traceback.format_exception(error)))
        for s in seq.group:
            s.done = s.cancelled = True  # done: never emitted again; cancelled: never admitted
        self.scheduler.waiting.remove(seq.group)
        seq.events.put(error_event(500, f"the server failed while generating this request (request id "
                                        f"{seq.request_id}; its log has the details)", code="internal_error"))
        self.m.outcome("failed")

    # ---- picks (the step's rows, on their device) ----------------------------------------------------
    def pick(self, rows: torch.Tensor, seqs: list[Sequence]) -> Picked:
        """The next token of every row ([R, V] logits of `seqs`), on the logits' device."""
        key = tuple(seq.id for seq in seqs)
        if self._rows is None or self._rows[0] != key:  # the batch changed: its parameters to the device
            params = self.row_params(seqs, rows)
            # pinned (to_device): a plain torch.tensor(..., device=) here would make the host wait for the
            # step just launched whenever a stream joins or leaves the batch, which delays the previous
            # step's tokens by a whole step
            self._rows = (key, params, to_device(torch.tensor([s.slot for s in seqs]), rows.device))
        _, params, slots = self._rows
        counts = prompt = None
        if params.use_penalties:
            for seq in seqs:
                if seq.picked == 0 and seq.sampling.penalised:  # its first token: counts start at 0
                    self.guard(seq, "sampling", self.penalties.start, seq.slot, seq.input_ids, rows.shape[-1],
                               rows.device)
            if self.penalties.counts is not None:
                counts, prompt = self.penalties.rows(slots)
        picked = sample(rows, params, counts, prompt, self.token_mask(seqs, rows))
        if counts is not None:
            self.penalties.record(slots, picked.tokens)
        for seq in seqs:  # counted here, not when the host reads it: that is one step later
            seq.picked += 1
        return picked

    def row_params(self, seqs: list[Sequence], rows: torch.Tensor) -> RowParams:
        """The rows' sampling parameters on their device; a row whose own parameters raise fails its request
        and samples greedily for the rest of the step (its token is never read)."""
        vocab = rows.shape[-1]
        kept = []
        for seq in seqs:
            self.guard(seq, "sampling", inject, seq, "sampling")
            kept.append(GREEDY if seq.ended else seq.sampling)
        generators = [seq.generator for seq in seqs]
        try:
            return RowParams.build(kept, generators, vocab, rows.device)
        except Exception:  # one row's own parameters: find it, fail its request, build the others; else re-raised
            for i, seq in enumerate(seqs):
                if kept[i] is not GREEDY:
                    self.guard(seq, "sampling", RowParams.build, [seq.sampling], [seq.generator], vocab, "cpu")
                    kept[i] = GREEDY if seq.ended else kept[i]
            return RowParams.build(kept, generators, vocab, rows.device)

    def token_mask(self, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor | None:
        """Constrained decoding: a [R, V] additive mask (0 allowed, -inf not) of the tokens each row may
        take, from its grammar (engine/grammar.py), applied before the penalties and sampling. None: no
        row is constrained. The host fills the bitmasks before anything reads the rows, so on a GPU that
        work overlaps the forward still running."""
        matchers = [None if seq.ended else seq.grammar for seq in seqs]  # a row computed past its end: free
        if all(m is None for m in matchers):
            return None
        for i, seq in enumerate(seqs):
            if matchers[i] is not None:
                self.guard(seq, "grammar", inject, seq, "grammar")
                matchers[i] = None if seq.ended else matchers[i]
        try:
            return self.grammars.additive_mask(matchers, rows)
        except Exception:  # one matcher's own fault: find it, fail its request, mask the others; else re-raised
            for i, seq in enumerate(seqs):
                if matchers[i] is not None:
                    self.guard(seq, "grammar", self.grammars.fill, [matchers[i]])
                    matchers[i] = None if seq.ended else matchers[i]
            return self.grammars.additive_mask(matchers, rows)

    def logprob_entries(self, picked: Picked, tokens: list[int], seqs: list[Sequence | None]) -> list[dict | None] | None:
        """OpenAI logprob entries of the rows that asked for them (None for the others)."""
        if picked.logprob is None:
            return None
        chosen = picked.logprob.tolist()
        top_ids = picked.top_ids.tolist() if picked.top_ids is not None else None
        top_lps = picked.top_logprobs.tolist() if picked.top_logprobs is not None else None

        def entry(i: int, seq: Sequence) -> dict:
            inject(seq, "logprobs")
            k = seq.sampling.top_logprobs
            top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids is not None else []
            return self.token_bytes.entry(tokens[i], chosen[i], top)

        return [self.guard(seq, "logprobs", entry, i, seq) if seq is not None and not seq.ended and
                seq.sampling.logprobs else None for i, seq in enumerate(seqs)]

    # ---- tokens into events --------------------------------------------------------------------------
    def read(self, picked: Picked, seqs: list[Sequence | None], now: float) -> None:
        """The host's side of a step's picks (host tensors): each row's token into its sequence's events."""
        tokens = picked.tokens.tolist()
        logprobs = self.logprob_entries(picked, tokens, seqs)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq is None or seq.ended:
                continue  # computed after the sequence ended (one step late): never emitted
            seq.in_flight -= 1
            if logprobs is not None and logprobs[i] is not None:
                seq.pending_logprobs.append(logprobs[i])
            seq.pixel_values = None  # prefilled: the pixels are no longer needed
            self.deliver(seq, token, now)

    def deliver(self, seq: Sequence, token: int, now: float) -> bool:
        """One new token of seq: text events, stop checks; True when the sequence has ended (finished, or
        failed: its own host work raised)."""
        seq.generated += 1
        self.m.tokens.inc()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.m.ttft.observe(now - seq.created)
        else:
            self.m.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        finish = self.guard(seq, "output", self._advance, seq, token)
        if seq.done:  # failed: its own host work raised
            return True
        if finish:
            self.guard(seq, "output", self._finish, seq, finish)
            return True
        seq.next_token = token
        return False

    def _advance(self, seq: Sequence, token: int) -> str | None:
        """The token's text out; its finish reason if it ends the sequence."""
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            return "stop"  # cannot happen (the token was picked under the grammar's mask); never loop on it
        if token in seq.sampling.stop_token_ids or (token in self.eos_ids and not self.through_eos(seq)):
            return "stop"
        inject(seq, "detokenize")
        reasoning, content = seq.stream.add(token)
        self.emit(seq, reasoning, content)
        inject(seq, "stop")
        if seq.stream.stopped or (seq.tools is not None and seq.tools.done):
            return "stop"
        if seq.generated >= seq.sampling.max_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.emit(seq, *seq.stream.finish(), final=True, cut=reason == "length")
        self.finish(seq, reason)

    @staticmethod
    def through_eos(seq: Sequence) -> bool:
        """ignore_eos: an end-of-sequence token is one more token (its text, if any, is a special token's:
        skipped). Not under a grammar, whose end is an end-of-sequence token that nothing may follow."""
        return seq.sampling.ignore_eos and seq.grammar is None

    @staticmethod
    def emit(seq: Sequence, reasoning: str, content: str, final: bool = False, cut: bool = False) -> None:
        """Text of seq out as a delta event. `final`: the sequence ended (`cut`: by max_tokens), so what the
        tool-call parser held back comes out, an unfinished call as far as it was generated."""
        calls: list[dict] = []
        if seq.tools is not None:  # only the content: a call written inside the reasoning is not a call
            inject(seq, "tools")
            content, calls = seq.tools.feed(content)
            if final:
                rest, more = seq.tools.finish(cut)
                content, calls = content + rest, calls + more
        if reasoning or content or calls:
            logprobs = None
            if seq.sampling.logprobs:  # the tokens up to this text (some held back text until now)
                logprobs, seq.pending_logprobs = seq.pending_logprobs, []
            seq.events.put(delta_event(content, reasoning, index=seq.index, tool_calls=calls, logprobs=logprobs))

    def finish(self, seq: Sequence, reason: str) -> None:
        """This choice's end (with the logprobs of tokens that produced no text); the request's end once
        every choice has ended."""
        seq.done = True
        if reason == "stop" and seq.tools is not None and seq.tools.calls:
            reason = "tool_calls"
        logprobs = None
        if seq.sampling.logprobs:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        seq.events.put(delta_event(index=seq.index, logprobs=logprobs, finish_reason=reason))
        if not all(s.done for s in seq.group):
            return
        generated = sum(s.generated for s in seq.group)
        seq.events.put(done_event(reason, len(seq.input_ids), generated, seq.prefix.cached if seq.prefix else 0))
        self.m.outcome("completed")
