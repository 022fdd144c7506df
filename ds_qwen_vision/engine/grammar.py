"""Constrained decoding through xgrammar: a request's constraint compiled once, a matcher per
sequence, and each step one token bitmask per constrained row, applied to the logits where they are.

What is constrained (`Grammars.compile`):

* ``tool_choice`` ``"required"`` or a named function: Qwen3.5/3.6's tool-call format as xgrammar
  describes it (`Grammars._tool_calls`), with each tool's parameter schema enforced inside the
  ``<parameter=...>`` tags, so the call always parses and its arguments validate. Only calls: one
  for a named function or ``parallel_tool_calls=false``, one or more otherwise.
* ``response_format`` ``json_object`` (any JSON object) and ``json_schema`` (the schema;
  ``strict`` is xgrammar's strict mode: no properties beyond the schema's).
* ``tool_choice`` ``"auto"`` is not constrained (the model decides whether to call; the parser
  reads what it wrote), as in vLLM.

The thinking block: when the prompt leaves ``<think>`` open, the grammar starts with it -- any text
without the think tags, then ``</think>\\n\\n`` -- and the constraint applies to what follows, so the
reasoning is the model's own. A model that thinks until ``max_tokens`` ends with ``length`` and no
call/JSON; send ``chat_template_kwargs: {"enable_thinking": false}`` to constrain from the first token.

Everything here runs on rank 0 only: followers never see a grammar, just the plan's tokens.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import xgrammar as xgr
from xgrammar.structural_tag import (
    AnyTextFormat,
    ConstStringFormat,
    JSONSchemaFormat,
    SequenceFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Runs of whitespace inside JSON / between tool-call tags: unbounded, a model stuck on whitespace
# tokens (random weights are, often) never ends its object. 16 admits indented nested JSON.
MAX_WHITESPACE = 16


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], threads: int = 2):
        # The model's vocabulary may be padded past the tokenizer's (rows no token maps to):
        # xgrammar masks those off when told the logits' width.
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads)
        self.batch = xgr.BatchGrammarMatcher(threads)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        # The rest of a thinking block the prompt opened: any text without the think tags, closed as the
        # chat template closes it in history.
        self._reasoning = xgr.Grammar.from_structural_tag(StructuralTag(format=SequenceFormat(elements=[
            TagFormat(begin="", content=AnyTextFormat(excludes=[THINK_OPEN, THINK_CLOSE]), end=THINK_CLOSE),
            ConstStringFormat(value="\n\n")])))

    # ---- per request (IPC thread, before anything is queued) ---------------------------------------
    def compile(self, request: dict, thinking: bool) -> xgr.CompiledGrammar | None:
        """The request's constraint, or None when nothing is constrained. Raises GrammarError."""
        tools, choice = request.get("tools") or [], request.get("tool_choice")
        if tools and (choice == "required" or isinstance(choice, dict)):
            return self._tool_calls(tools, choice, request.get("parallel_tool_calls", True), thinking)
        fmt = request.get("response_format") or {}
        if fmt.get("type") == "json_object":
            return self._json({"type": "object"}, False, thinking, "response_format")
        if fmt.get("type") == "json_schema":
            spec = fmt["json_schema"]
            return self._json(spec.get("schema", {}), bool(spec.get("strict")), thinking,
                              "response_format.json_schema.schema")
        return None

    def _tool_calls(self, tools: list[dict], choice: str | dict, parallel: bool, thinking: bool) -> xgr.CompiledGrammar:
        """Only tool calls, at least one: the named function's, or any of the tools' ("required").

        Built from xgrammar's formats the way its own ``qwen_3_5`` structural tag builds a call (the
        ``qwen_xml`` style checks each ``<parameter=...>`` value against the tool's schema), but with
        nothing allowed between or after the calls: that tag's "required" admits free text around them,
        which the chat template forbids ("ONLY reply in the following format with NO suffix") and which
        a model would otherwise keep writing until max_tokens. And the closing ``</function>``
        follows the last parameter's own newline, as the template renders a call: that tag wants one more
        newline before it, which a call without parameters (``<function=f>\n</function>``) does not have.
        """
        chosen = list(enumerate(tools))  # (index in the request, tool)
        if isinstance(choice, dict):
            chosen = [(i, t) for i, t in chosen if t["function"]["name"] == choice["function"]["name"]]
            parallel = False  # a named function is one call (xgrammar's "forced")
        tags = []
        for _, tool in chosen:
            fn = tool["function"]
            body = JSONSchemaFormat(json_schema=fn.get("parameters") or {"type": "object"}, style="qwen_xml",
                                    max_whitespace_cnt=MAX_WHITESPACE)
            tags.append(TagFormat(begin=f"{CALL_OPEN}\n<function={fn['name']}>\n", content=body,
                                  end=f"</function>\n{CALL_CLOSE}"))
        calls = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
        try:
            grammar = xgr.Grammar.from_structural_tag(StructuralTag(format=calls))
            return self.compiler.compile_grammar(xgr.Grammar.concat(self._reasoning, grammar) if thinking else grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar: RuntimeError; pydantic: ValueError
            # Find the tool whose schema is at fault, so that the error names it.
            for i, tool in chosen:
                try:
                    xgr.Grammar.from_json_schema(tool["function"].get("parameters") or {"type": "object"})
                except (RuntimeError, ValueError, TypeError) as e2:
                    raise GrammarError(f"the grammar engine cannot compile this schema: {_short(e2)}",
                                       f"tools[{i}].function.parameters") from None
            raise GrammarError(f"the grammar engine cannot compile these tools: {_short(e)}", "tools") from None

    def _json(self, schema: Any, strict: bool, thinking: bool, param: str) -> xgr.CompiledGrammar:
        try:
            grammar = xgr.Grammar.from_json_schema(schema, strict_mode=strict, max_whitespace_cnt=MAX_WHITESPACE)
            if thinking:
                grammar = xgr.Grammar.concat(self._reasoning, grammar)
            return self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar: RuntimeError; pydantic: ValueError
            raise GrammarError(f"the grammar engine cannot compile this schema: {_short(e)}", param) from None

    def matcher(self, compiled: xgr.CompiledGrammar | None) -> xgr.GrammarMatcher | None:
        return None if compiled is None else xgr.GrammarMatcher(compiled)

    # ---- per step (engine loop) ---------------------------------------------------------------
    def fill(self, matchers: list[xgr.GrammarMatcher | None]) -> torch.Tensor:
        """[len(matchers), ceil(vocab/32)] int32 bitmask on the host: each matcher's allowed next tokens,
        every token for the rows without one (None)."""
        if self.bitmask.shape[0] < len(matchers):
            self.bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        mask = self.bitmask[:len(matchers)]
        xgr.reset_token_bitmask(mask)
        rows = [i for i, m in enumerate(matchers) if m is not None]
        self.batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], mask, rows)
        return mask

    def additive_mask(self, matchers: list[xgr.GrammarMatcher | None], rows: torch.Tensor) -> torch.Tensor:
        """The sampler's mask for `rows` ([R, V] logits, one per matcher): 0 where a token is allowed, -inf
        where not; all 0 for the rows without a matcher. Filled on the host, set on the rows' device."""
        mask = torch.zeros(rows.shape, dtype=rows.dtype, device=rows.device)
        self.apply(mask, self.fill(matchers))
        return mask

    def apply(self, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Disallowed tokens to -inf, in place, on the rows' device (xgrammar's kernel for it)."""
        xgr.apply_token_bitmask_inplace(rows, mask.to(rows.device, non_blocking=True),
                                        vocab_size=min(rows.shape[-1], self.vocab_size))

def _short(e: Exception) -> str:
    """xgrammar's message without its C++ source location ("[20:14:13] /project/cpp/x.cc:5082: ")."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0] if lines else type(e).__name__)
    return text[:300]

