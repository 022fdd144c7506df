"""Generated token ids → the text a client sees: incremental detokenization, stop strings, reasoning.

The same object produces the streamed deltas and (by concatenation) the non-streamed text, so the two
are equal by construction, multi-byte characters split across tokens included: text is only released
once it decodes without a trailing replacement character, and never while it could still turn out to
be the start of a stop string.
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the chat template left a thinking block open, so generation starts as reasoning."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


class TextStream:
    def __init__(self, tokenizer, stop: list[str], in_reasoning: bool):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        # Incremental detokenization (vLLM's scheme): each token decodes a short window of recent ids, not
        # the whole output again. ids[:read_at] are final text (`done`); ids[prefix_at:read_at] give the
        # decoder the left context that the next token's text depends on.
        self.done, self.prefix_at, self.read_at = "", 0, 0
        self.text = ""          # everything decoded so far (special tokens skipped), cut at a stop string
        self.sent = 0           # characters of self.text already released
        self.in_reasoning = in_reasoning
        self.strip_newlines = False  # the template puts blank lines after </think>; they are not content
        self.stopped = False    # a stop string was found; the text ends before it

    def add(self, token: int) -> tuple[str, str]:
        """Feed one generated token; returns the (reasoning, content) text now safe to release."""
        self.ids.append(token)
        text = self._decoded()
        # A character split across tokens decodes as a trailing U+FFFD until its last byte arrives:
        # release nothing from there on yet (if it never arrives, `finish` releases the U+FFFD, as a
        # plain decode of the whole output shows it).
        end = len(text.rstrip("\ufffd")) - self.holdback
        # The earliest stop string wins: one token can complete two of them. Only the text this token
        # may have completed one in is searched (earlier text was searched before).
        since = max(0, len(self.text.rstrip("\ufffd")) - self.holdback)
        stable = text.rstrip("\ufffd")  # a trailing U+FFFD may still become another character
        at = min((i for i in (stable.find(s, since) for s in self.stop) if i != -1), default=-1)
        if at != -1:
            text, end, self.stopped = text[:at], at, True
        self.text = text
        return self._release(max(end, self.sent), final=self.stopped)

    def _decoded(self) -> str:
        """The whole output's text, as tokenizer.decode(ids) gives it, decoding only the recent window."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self.prefix_at:], skip_special_tokens=True)
        new = window[len(prefix):]
        if new.endswith("\ufffd"):  # a character still incomplete: these ids stay in the window
            return self.done + new
        self.done += new
        self.prefix_at, self.read_at = self.read_at, len(self.ids)
        return self.done

    def finish(self) -> tuple[str, str]:
        """The sequence ended: release whatever was held back."""
        return self._release(len(self.text), final=True)

    def _release(self, end: int, final: bool) -> tuple[str, str]:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        reasoning = ""
        if self.in_reasoning:
            # Reasoning lasts until the model closes the thinking block; the tag itself is not shown.
            at = piece.find(THINK_CLOSE)
            if at == -1:
                keep = 0 if final else _partial_suffix(piece, THINK_CLOSE)  # maybe the start of the tag
                self.sent -= keep
                return piece[:len(piece) - keep], ""
            self.in_reasoning, self.strip_newlines = False, True
            reasoning, piece = piece[:at], piece[at + len(THINK_CLOSE):]
        if self.strip_newlines:
            piece = piece.lstrip("\n")
            self.strip_newlines = not piece
        return reasoning, piece


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
