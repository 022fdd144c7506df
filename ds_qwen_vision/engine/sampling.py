"""Per-request sampling parameters and the device-side pick of the next token."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token (a 0-d tensor on the logits' device, no host sync): greedy at temperature 0; otherwise
    temperature, top-k, top-p, drawn with the request's own generator (on the same device)."""
    if s.temperature == 0 or generator is None:
        return torch.argmax(logits)
    # Largest logit shifted to 0, in float64: any temperature > 0, however small (1e-300), then gives
    # logits in [-inf, 0] and a valid distribution, never inf - inf = nan (which would fail the engine).
    logits = logits.double()
    logits = (logits - logits.max()) / s.temperature
    if s.top_k and s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0)  # (boolean indexing would sync with the host)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
