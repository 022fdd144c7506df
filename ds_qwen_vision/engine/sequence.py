"""A sequence: one choice of one request, as the engine's rooms share it -- intake (intake.py) makes it,
the scheduler (scheduler.py) places it, the output path (output.py) turns its tokens into events."""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import torch

from ..ipc import error_event
from .prefix_cache import PromptKeys
from .sampling import Sampling
from .textstream import TextStream
from .tools import ToolCallParser


class RequestError(Exception):
    """A request the engine refuses; becomes an OpenAI error event (status, type, message, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def event(self) -> dict:
        return error_event(self.status, self.message, type=self.type, param=self.param, code=self.code)


@dataclass(eq=False)  # compared by identity: the queue removes this very sequence
class Sequence:
    id: int
    input_ids: list[int]
    sampling: Sampling
    pixel_values: torch.Tensor | None = None  # the processor's output, handed to the runner (rank 0) at prefill
    image_grid_thw: list[list[int]] = field(default_factory=list)
    stream: TextStream | None = None
    events: queue.Queue | None = None
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.perf_counter)
    request_id: str = ""            # the front's X-Request-Id (or the engine's own): in logs and 500s
    slot: int | None = None
    prefilled: int = 0              # prompt tokens scheduled so far (chunked prefill)
    next_token: int | None = None   # sampled, fed to the model in the next step (synchronous steps)
    fed: bool = False               # speculative deployments: its last step fed its token on the device
    in_flight: int = 0              # tokens scheduled whose value the host has not read yet
    picked: int = 0                 # tokens picked on the device so far (the host reads them one step later)
    generated: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False
    index: int = 0                  # the choice it is (a request with n choices has n sequences)
    group: list = field(default_factory=list, repr=False)  # the request's sequences, this one too
    pixels: int = 0                 # image pixels it holds on the host until prefilled (the queue's bound)
    pending_logprobs: list = field(default_factory=list)  # of tokens whose text is not out yet
    spec: object = None             # speculative decoding state (engine/speculative.SeqSpec)
    prefix: PromptKeys | None = None  # prefix reuse + image cache (prefix_cache.py); None: caches off
    # Constrained decoding (engine/grammar.py): this row's next-token mask needs its previous token
    # accepted first, so a constrained row decodes one token a step (no drafts) and a step holding one
    # is synchronous (`Scheduler.synchronous`): the previous step's tokens are read before it is launched.
    grammar: object = None          # an xgrammar GrammarMatcher
    tools: ToolCallParser | None = None  # tool calls read out of the content (engine/tools.py)
    fault: str | None = None        # the stage a test's marker fails (engine/faults.py); None: never
    # Paged KV (engine/block_manager.py): the tokens of cache it reserves (prompt + max_tokens + the verify's
    # slack), the blocks it holds from admission to its end, and a restored prefix's partial block to copy.
    reserve: int = 0
    blocks: list[int] = field(default_factory=list)
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """Nothing more of it is computed or emitted (finished, failed, or its client left)."""
        return self.done or self.cancelled
