"""Fault injection, for the tests of per-sequence isolation (output.py): inert unless the environment
variable DSQV_FAULT_INJECTION is 1 when the engine starts. Then a request whose text holds the marker
``dsqv-fault:STAGE`` raises InjectedFault in that stage of its own host work, every time it gets there,
so that one server covers every stage:

    sampling    building its sampling parameters (output.Output.pick)
    grammar     filling its grammar's token mask (output.Output.token_mask; needs response_format or forced tools)
    logprobs    its logprob entries (output.Output.logprob_entries; needs logprobs: true)
    detokenize  turning its token into text (output.Output.deliver)
    stop        its stop checks (output.Output.deliver)
    tools       parsing its tool calls (output.Output.emit; needs tools)
"""
from __future__ import annotations

import os
import re

ENV = "DSQV_FAULT_INJECTION"
STAGES = ("sampling", "grammar", "logprobs", "detokenize", "stop", "tools")
MARKER = re.compile(r"dsqv-fault:(" + "|".join(STAGES) + r")\b")


class InjectedFault(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def stage_of(request: dict) -> str | None:
    """The stage the request's marker names (its messages' text), or None."""
    for message in request["messages"]:
        content = message["content"]
        texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or []]
        for text in texts:
            if m := MARKER.search(text or ""):
                return m.group(1)
    return None


def inject(seq, stage: str) -> None:
    if seq.fault == stage:
        raise InjectedFault(f"fault injected in {stage} ({ENV})")
