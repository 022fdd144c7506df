"""Qwen3.6's tool calls in generated text → OpenAI ``tool_calls``, incrementally.

Qwen3.6 (like Qwen3-Coder) writes a call as XML-ish text, the format its chat template teaches and
renders for history::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text: a string parameter (by the tool's JSON schema) is taken as it is,
any other is JSON (``3``, ``true``, ``{"a": 1}``); the template renders Python-style ``True`` /
``None`` for booleans and nulls, which are read back too. Whitespace around a value is not part of
it: the template puts a newline on each side, and xgrammar's grammar of this format (which enforces
``tool_choice``) admits any whitespace there.

`ToolCallParser` is fed the *content* text as the detokenizer releases it (the reasoning block never
reaches it: a call written while thinking is not a call) and returns the content to show and the
tool-call deltas in OpenAI's streaming shape: first ``{index, id, type, function: {name, arguments:
""}}`` once the function's name is complete, then ``{index, function: {arguments: fragment}}`` for
each parameter as its value completes (its type needs the whole value), and the closing brace, so
that the fragments concatenate to a JSON object. The non-streamed answer is the concatenation of the
same deltas, so the two agree by construction. Text that turns out not to be a call (``<tool_call>``
followed by something else) is released as content; the start of a call still arriving when the output
ends (a partial ``<tool_call>`` tag, an unfinished ``<function=`` header) is not content, and not a call.
A call cut off by ``max_tokens`` (`finish(cut=True)`) keeps its ``arguments`` as generated, as OpenAI
returns them with ``finish_reason: length``: the parameters so far and the one being written, its value
as far as it went, unclosed (a string without its closing quote); never a made-up ``{}``. A call the
model itself left unfinished (it ended the output) is closed with the parameters complete so far.

Written by hand because it has to run on rank 0's detokenized stream, step by step; vLLM's and
SGLang's ``qwen3_coder`` parsers are the references for the format.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"
_HEADER = re.compile(r"\s*<function=([^>\n]+)>")
_PARAM_HEADER = re.compile(r"<parameter=([^>\n]+)>")

TEXT, HEADER, PARAMS, CLOSING = "text", "header", "params", "closing"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parameter_schemas(tools: list[dict]) -> dict[str, dict[str, Any]]:
    """Function name → {parameter name → its JSON schema}, from OpenAI-shaped tools."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        fn = tool["function"]
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn["name"]] = {k: v for k, v in props.items() if isinstance(v, dict)}
    return out


def _is_string(schema: dict | None) -> bool:
    """Whether a parameter's value is taken raw (a string) rather than parsed as JSON."""
    if schema is None:  # not in the schema: nothing says it is anything but text
        return True
    kind = schema.get("type")
    if isinstance(kind, list):
        rest = [k for k in kind if k != "null"]
        return rest == ["string"]
    if kind is not None:
        return kind == "string"
    if "enum" in schema:
        return all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    return False  # anyOf, $ref, ...: JSON, falling back to the raw text below


def convert_value(raw: str, schema: dict | None) -> Any:
    """A parameter's raw text → its value, typed by the parameter's schema."""
    value = raw.strip()
    if _is_string(schema):
        if value == "null" and isinstance(schema, dict) and "null" in (schema.get("type") or []):
            return None
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:  # the template renders values with Jinja's |string: True, False, None
        return ast.literal_eval(value) if value in ("True", "False", "None") else value
    except ValueError:
        return value


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    def __init__(self, tools: list[dict], parallel: bool = True):
        self.schemas = parameter_schemas(tools)
        self.parallel = parallel
        self.buf = ""               # text not yet released or parsed
        self.state = TEXT
        self.calls: list[dict] = []  # the calls so far: {"id", "name", "arguments"} (arguments assembled)
        self.n_params = 0           # parameters emitted in the current call
        self.after_call = False     # whitespace right after a call is not content
        self.done = False           # parallel_tool_calls=false and the one call is complete
        self.cut = False            # finish(cut=True): the output was cut by max_tokens

    # ---- the public part ------------------------------------------------------------------------
    def feed(self, text: str) -> tuple[str, list[dict]]:
        """Content text in; (content to show, tool-call deltas) out."""
        self.buf += text
        return self._run(final=False)

    def finish(self, cut: bool = False) -> tuple[str, list[dict]]:
        """The sequence ended: release what was held back; a call cut off midway is closed, or with `cut`
        (max_tokens ended it) left as far as it was generated."""
        self.cut = cut
        return self._run(final=True)

    # ---- the state machine ---------------------------------------------------------------------
    def _run(self, final: bool) -> tuple[str, list[dict]]:
        content: list[str] = []
        deltas: list[dict] = []
        while True:
            before = (self.state, len(self.buf))
            if self.done:
                self.buf = ""  # one call asked for, one made: the rest is not shown (generation ends)
                break
            step = {TEXT: self._text, HEADER: self._header, PARAMS: self._params, CLOSING: self._closing}
            step[self.state](content, deltas, final)
            if (self.state, len(self.buf)) == before:
                break
        return "".join(content), deltas

    def _text(self, content: list[str], deltas: list[dict], final: bool) -> None:
        if self.after_call:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return
        at = self.buf.find(CALL_OPEN)
        if at == -1:
            keep = _partial_suffix(self.buf, CALL_OPEN)  # at the end: the start of a call, never content
            out, self.buf = self.buf[:len(self.buf) - keep], "" if final else self.buf[len(self.buf) - keep:]
            if out:
                content.append(out)
                self.after_call = False
            return
        if at:
            content.append(self.buf[:at])
        self.buf, self.state = self.buf[at + len(CALL_OPEN):], HEADER

    def _header(self, content: list[str], deltas: list[dict], final: bool) -> None:
        m = _HEADER.match(self.buf)
        if m is None:
            head = self.buf.lstrip()
            maybe = FUNCTION_OPEN.startswith(head) or (head.startswith(FUNCTION_OPEN) and
                                                       not re.search(r"[>\n]", head[len(FUNCTION_OPEN):]))
            if maybe:  # the rest of the header is still to come; at the end, an unfinished call: dropped
                if final:
                    self.buf, self.state, self.after_call = "", TEXT, False
                return
            # Not a call after all: what was held back is content.
            content.append(CALL_OPEN + self.buf)
            self.buf, self.state, self.after_call = "", TEXT, False
            return
        name = m.group(1).strip()
        call = {"id": new_call_id(), "name": name, "arguments": ""}
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                       "function": {"name": name, "arguments": ""}})
        self.buf, self.state, self.n_params = self.buf[m.end():], PARAMS, 0

    def _params(self, content: list[str], deltas: list[dict], final: bool) -> None:
        self.buf = self.buf.lstrip()
        if self.buf.startswith(FUNCTION_CLOSE):
            self.buf = self.buf[len(FUNCTION_CLOSE):]
            self._close_call(deltas)
            self.state = CLOSING
            return
        m = _PARAM_HEADER.match(self.buf)
        if m is not None:
            # The value ends at </parameter>; a model that forgets it is read up to the next tag.
            rest = self.buf[m.end():]
            ends = [(i, len(tag)) for tag in (PARAM_CLOSE,) for i in [rest.find(tag)] if i != -1]
            ends += [(i, 0) for tag in (PARAM_OPEN, FUNCTION_CLOSE) for i in [rest.find(tag)] if i != -1]
            if not ends:
                if final:  # ended inside a value: cut, it is sent as far as it went; else the call keeps what was complete
                    if self.cut:
                        name = m.group(1).strip()
                        self._add_fragment(deltas, self._opening(name) + self._partial(rest, name))
                    else:
                        self._close_call(deltas)
                    self.buf, self.state = "", TEXT
                return
            at, skip = min(ends)
            name = m.group(1).strip()
            value = convert_value(rest[:at], self._schema(name))
            self._add_fragment(deltas, self._opening(name) + json.dumps(value, ensure_ascii=False))
            self.n_params += 1
            self.buf = rest[at + skip:]
            return
        maybe_tag = self.buf.startswith(PARAM_OPEN) or any(t.startswith(self.buf)
                                                           for t in (PARAM_OPEN, FUNCTION_CLOSE))
        if not final and (not self.buf or maybe_tag):
            return  # a tag still arriving
        if final and maybe_tag:
            self.buf = ""  # cut off inside the call: the start of a tag is part of it, not content
        if final and self.cut and not self.buf:  # cut between two parameters: as generated, unclosed
            self.state = TEXT
            return
        # Anything else ends the call with what it has; the text is content again.
        self._close_call(deltas)
        self.state = TEXT

    def _closing(self, content: list[str], deltas: list[dict], final: bool) -> None:
        head = self.buf.lstrip()
        if head.startswith(CALL_CLOSE):
            self.buf = head[len(CALL_CLOSE):]
        elif CALL_CLOSE.startswith(head):
            if not final:
                return
            self.buf = ""  # cut off inside the closing tag
        else:
            self.buf = head  # no closing tag: the call is complete anyway
        self.state, self.after_call = TEXT, True
        if not self.parallel:
            self.done = True

    def _schema(self, name: str) -> dict | None:
        return self.schemas.get(self.calls[-1]["name"], {}).get(name)

    def _opening(self, name: str) -> str:
        return ("{" if self.n_params == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": "

    def _partial(self, raw: str, name: str) -> str:
        """A value cut off by max_tokens, as JSON text so far: a string unclosed, anything else raw (the
        start of its closing tag is not part of it)."""
        tail = max(_partial_suffix(raw, tag) for tag in (PARAM_CLOSE, PARAM_OPEN, FUNCTION_CLOSE))
        value = raw[:len(raw) - tail].strip()
        return json.dumps(value, ensure_ascii=False)[:-1] if _is_string(self._schema(name)) else value

    def _close_call(self, deltas: list[dict]) -> None:
        self._add_fragment(deltas, "}" if self.n_params else "{}")

    def _add_fragment(self, deltas: list[dict], fragment: str) -> None:
        self.calls[-1]["arguments"] += fragment
        deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str, list[dict]]:
    """A whole output's content → (content, calls as OpenAI message tool_calls)."""
    parser = ToolCallParser(tools)
    content, _ = parser.feed(text)
    rest, _ = parser.finish()
    return content + rest, [{"id": c["id"], "type": "function",
                             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in parser.calls]
