"""Per-request sampling parameters, and the pick of the next token for all rows of a step at once.

`sample` is a pure function of (logits rows, per-row parameters, per-row state): the engine calls it
once per step for every row; a speculative verifier can call it for k+1 positions of a row by
repeating the row's parameters and passing its counts. Everything runs on the logits' device, batched
over the rows, with no host sync: the host reads the tokens (and logprobs) once, after the call.

Order of the logit processing, per row (as vLLM / transformers' generate):

    mask (grammar hook) -> repetition penalty -> frequency / presence penalties -> temperature
    -> top-k -> top-p -> min-p -> draw

Logprobs are those of the model's raw distribution, ``log_softmax(logits)``, before the mask, the
penalties and every sampling parameter (OpenAI's are, and so are vLLM's by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import to_device

# Temperatures below this are greedy (vLLM's threshold): dividing by them would overflow float32.
GREEDY_BELOW = 1e-5
MAX_TOP_LOGPROBS = 20
# When every sampled row has a top_k up to this, the candidates are the rows' top-k (torch.topk) instead of a
# sort of the whole vocabulary (Qwen3.6's default top_k is 20).
TOP_K_FAST_PATH = 1024


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # <= 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0   # OpenAI: logit -= presence * (count > 0), over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count, over generated tokens
    repetition_penalty: float = 1.0  # transformers / vLLM: over prompt and generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's: generate up to max_tokens through the model's end-of-sequence tokens
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_request(cls, request: dict, defaults: dict, max_tokens: int) -> Sampling:
        """The engine request's values; those it leaves out (None) from `defaults` (the checkpoint's
        generation_config, see `generation_defaults`), else OpenAI's defaults."""
        def value(name: str, default):
            v = request.get(name)
            return v if v is not None else defaults.get(name, default)

        top_k = value("top_k", -1)
        return cls(max_tokens=max_tokens, temperature=value("temperature", 1.0), top_p=value("top_p", 1.0),
                   top_k=top_k if top_k > 0 else -1, min_p=value("min_p", 0.0),
                   presence_penalty=value("presence_penalty", 0.0), frequency_penalty=value("frequency_penalty", 0.0),
                   repetition_penalty=value("repetition_penalty", 1.0), seed=request.get("seed"),
                   stop=list(request.get("stop") or []), stop_token_ids=list(request.get("stop_token_ids") or []),
                   ignore_eos=bool(request.get("ignore_eos")), logprobs=bool(request.get("logprobs")),
                   top_logprobs=request.get("top_logprobs") or 0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


# The generation_config.json keys that stand in for a request's omitted parameters (vLLM's set; like
# vLLM, do_sample is not read: a request's temperature says whether it samples).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(generation_config) -> dict:
    """The sampling values a checkpoint's generation_config sets (transformers leaves unset ones None)."""
    if generation_config is None:
        return {}
    return {k: getattr(generation_config, k) for k in GENERATION_CONFIG_KEYS
            if getattr(generation_config, k, None) is not None}


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [R, 1] tensor on `device`, copied without waiting for the device's queue (pinned on CUDA)."""
    return to_device(torch.tensor(values, dtype=dtype).unsqueeze(1), device)


@dataclass
class RowParams:
    """The sampling parameters of R rows, as [R, 1] device tensors, plus what the host knows about them
    (which steps are needed at all) so that no decision reads the device."""

    greedy: torch.Tensor        # bool
    temperature: torch.Tensor   # float32; 1 on greedy rows
    top_k: torch.Tensor         # int64; vocab size where off
    top_p: torch.Tensor         # float32; 1 where off
    min_p: torch.Tensor         # float32
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    generators: list[torch.Generator | None]  # per row; None on greedy rows (and rows that only filter)
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    use_penalties: bool
    use_repetition: bool
    top_k_max: int              # > 0: every sampled row has a top_k, at most this (see TOP_K_FAST_PATH)
    logprobs: bool              # some row wants logprobs
    top_logprobs: int           # the most any row wants

    @classmethod
    def build(cls, rows: list[Sampling], generators: list[torch.Generator | None], vocab: int,
              device: torch.device | str) -> RowParams:
        device = torch.device(device)
        # A sampled row without a generator (speculative.target_probs wants the filtered distribution only)
        # keeps its parameters; drawn with no noise, it takes the most likely token.
        greedy = [s.greedy for s in rows]
        top_k = [vocab if g or s.top_k <= 0 else min(s.top_k, vocab) for s, g in zip(rows, greedy)]
        top_p = [1.0 if g else s.top_p for s, g in zip(rows, greedy)]
        min_p = [0.0 if g else s.min_p for s, g in zip(rows, greedy)]
        sampled_k = [k for k, g in zip(top_k, greedy) if not g]
        top_k_max = max(sampled_k) if sampled_k and max(sampled_k) <= min(TOP_K_FAST_PATH, vocab - 1) else 0
        f32 = torch.float32
        return cls(
            greedy=_column(greedy, torch.bool, device),
            temperature=_column([1.0 if g else s.temperature for s, g in zip(rows, greedy)], f32, device),
            top_k=_column(top_k, torch.int64, device), top_p=_column(top_p, f32, device),
            min_p=_column(min_p, f32, device),
            presence=_column([s.presence_penalty for s in rows], f32, device),
            frequency=_column([s.frequency_penalty for s in rows], f32, device),
            repetition=_column([s.repetition_penalty for s in rows], f32, device),
            generators=[None if g else gen for g, gen in zip(greedy, generators)],
            all_greedy=all(greedy), use_top_k=any(k < vocab for k in top_k), use_top_p=any(p < 1 for p in top_p),
            use_min_p=any(p > 0 for p in min_p), use_penalties=any(s.penalised for s in rows),
            use_repetition=any(s.repetition_penalty != 1 for s in rows), top_k_max=top_k_max,
            logprobs=any(s.logprobs for s in rows), top_logprobs=max((s.top_logprobs for s in rows), default=0))


@dataclass
class Picked:
    """The step's picks, on the logits' device."""

    tokens: torch.Tensor                        # [R] int64
    logprob: torch.Tensor | None = None         # [R] the picked token's raw logprob
    top_ids: torch.Tensor | None = None         # [R, K] the K most likely tokens of the raw distribution
    top_logprobs: torch.Tensor | None = None    # [R, K] their logprobs


def apply_penalties(logits: torch.Tensor, p: RowParams, counts: torch.Tensor,
                    prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty over the tokens seen (prompt or generated): a positive logit is divided by it,
    a negative one multiplied (transformers' and vLLM's rule); then OpenAI's frequency and presence
    penalties over the generated tokens' counts. `counts`: [R, V] generated-token counts."""
    if p.use_repetition:
        seen = counts > 0
        if prompt_mask is not None:
            seen = seen | prompt_mask
        penalised = torch.where(logits > 0, logits / p.repetition, logits * p.repetition)
        logits = torch.where(seen, penalised, logits)
    return logits - p.frequency * counts - p.presence * (counts > 0)


def top_k_candidates(logits: torch.Tensor, p: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path of `filter_logits` (every sampled row has a top_k, at most p.top_k_max): the rows'
    candidates, [R, K] values (most likely first; -inf where dropped) and their token ids. The same rules,
    applied to the K best only: top-p and min-p never keep a token that top-k drops. (Ties with the k-th
    value beyond K are dropped, where transformers' TopK would keep them.)"""
    values, ids = (logits / p.temperature).topk(p.top_k_max, dim=-1)
    position = torch.arange(p.top_k_max, device=values.device)
    values = values.masked_fill(position >= p.top_k, float("-inf"))
    if p.use_top_p:  # transformers' rule, most likely first: drop a token once the mass before it reaches top_p
        probs = values.softmax(dim=-1)
        values = values.masked_fill(probs.cumsum(dim=-1) - probs >= p.top_p, float("-inf"))
    if p.use_min_p:
        probs = values.softmax(dim=-1)
        values = values.masked_fill(probs < p.min_p * probs[:, :1], float("-inf"))
    return values, ids


def filter_logits(logits: torch.Tensor, p: RowParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (transformers' warpers, batched with per-row values):
    the logits the draw is made from, with the tokens out of the running at -inf."""
    if p.top_k_max:
        values, ids = top_k_candidates(logits, p)
        return torch.full_like(logits, float("-inf")).scatter_(1, ids, values)
    logits = logits / p.temperature
    if p.use_top_k or p.use_top_p:
        ascending, order = logits.sort(dim=-1)
        if p.use_top_k:  # keep every token at least as likely as the k-th (ties kept, as TopKLogitsWarper)
            kth = ascending.gather(1, ascending.shape[1] - p.top_k)
            ascending = ascending.masked_fill(ascending < kth, float("-inf"))
        if p.use_top_p:  # drop the least likely tokens whose mass is at most 1 - top_p; the best always stays
            mass = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = mass <= 1 - p.top_p
            drop[:, -1] = False
            ascending = ascending.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, ascending)
    if p.use_min_p:  # drop tokens less likely than min_p times the most likely one
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: RowParams, counts: torch.Tensor | None = None,
           prompt_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> Picked:
    """The next token of each row of `logits` [R, V], on their device, without a host sync.

    counts: [R, V] generated-token counts (needed when a row has a penalty); prompt_mask: [R, V] bool, the
    prompt's tokens (for the repetition penalty). mask: the hook for constrained decoding, applied before
    everything else: a bool [R, V] (True = allowed) or an additive float [R, V] (0 or -inf).
    """
    raw = logits.float()
    x = raw
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else x + mask
    if p.use_penalties and counts is not None:
        x = apply_penalties(x, p, counts, prompt_mask)
    tokens = x.argmax(dim=-1)
    if not p.all_greedy:
        ids = None
        if p.top_k_max:  # [R, K] candidates instead of the whole vocabulary
            values, ids = top_k_candidates(x, p)
            probs = values.softmax(dim=-1)
        else:
            probs = filter_logits(x, p).softmax(dim=-1)
        # One draw per row with the row's own generator: argmax(probs / q), q ~ Exp(1), is a draw from
        # probs (the exponential race), and the argmax is batched over the rows.
        q = torch.ones_like(probs)
        for i, generator in enumerate(p.generators):
            if generator is not None:
                q[i].exponential_(generator=generator)
        drawn = (probs / q).argmax(dim=-1)
        if ids is not None:
            drawn = ids.gather(1, drawn[:, None])[:, 0]
        tokens = torch.where(p.greedy[:, 0], tokens, drawn)
    picked = Picked(tokens)
    if p.logprobs:
        logprobs = raw.log_softmax(dim=-1)
        picked.logprob = logprobs.gather(1, tokens[:, None])[:, 0]
        if p.top_logprobs:
            picked.top_logprobs, picked.top_ids = logprobs.topk(p.top_logprobs, dim=-1)
    return picked


class PenaltyState:
    """Per-slot token counts on the device, for the penalties: [slots, V] generated-token counts and a
    [slots, V] mask of the prompt's tokens. Allocated on first use (most deployments never need it)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.counts: torch.Tensor | None = None
        self.prompt: torch.Tensor | None = None

    def _allocate(self, vocab: int, device: torch.device) -> None:
        if self.counts is None or self.counts.shape[1] != vocab or self.counts.device != device:
            self.counts = torch.zeros(self.slots, vocab, dtype=torch.int32, device=device)
            self.prompt = torch.zeros(self.slots, vocab, dtype=torch.bool, device=device)

    def start(self, slot: int, prompt_ids: list[int], vocab: int, device: torch.device) -> None:
        """A new sequence in `slot`: no tokens generated yet; the prompt's tokens marked."""
        self._allocate(vocab, device)
        self.counts[slot].zero_()
        self.prompt[slot].zero_()
        ids = to_device(torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.int64), device)
        self.prompt[slot].index_fill_(0, ids, True)

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.counts is not None and self.prompt is not None
        return self.counts.index_select(0, slots), self.prompt.index_select(0, slots)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's new token (on the device)."""
        assert self.counts is not None
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
