"""Logprobs in OpenAI's shape: each generated token's text, UTF-8 bytes and raw logprob, and the most
likely alternatives at its position (``{"token", "logprob", "bytes", "top_logprobs": [...]}``).

A token's bytes come from the tokenizer's vocabulary, not from decoding it alone: a byte-level BPE
token may hold part of a multi-byte character, which decodes to U+FFFD on its own. Its ``token`` text
is the bytes as UTF-8 with any incomplete sequence written as ``\\xNN`` escapes (as OpenAI does).
"""
from __future__ import annotations

import functools

from transformers.convert_slow_tokenizer import bytes_to_unicode


class TokenBytes:
    """Token id -> (text, bytes), cached (the same few thousand ids recur)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_of = {ch: b for b, ch in bytes_to_unicode().items()}  # GPT-2's byte <-> unicode map
        # Added tokens (<|im_end|>, <think>, ...) are stored as their text, not byte-level encoded.
        self._added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self.lookup = functools.lru_cache(maxsize=1 << 18)(self._lookup)

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in self._added:
            data = self._added[token_id].encode()
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is None:  # an id past the tokenizer's vocabulary (the embedding is padded)
                return "", []
            if all(ch in self._byte_of for ch in piece):
                data = bytes(self._byte_of[ch] for ch in piece)
            else:  # not byte-level (a tokenizer of another kind): its text is the token
                data = piece.encode()
        return data.decode("utf-8", errors="backslashreplace"), list(data)

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        text, data = self.lookup(token_id)
        alternatives = []
        for i, lp in top:
            t, b = self.lookup(i)
            alternatives.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives}
