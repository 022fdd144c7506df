"""engine/grammar.py on the tiny checkpoint's tokenizer: what each constraint admits, token by token, and
that the masks reach the logits (padding rows included). The texts are written by hand in Qwen3.6's
format (as its chat template renders a call), not produced by our parser."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from ds_qwen_vision.engine.grammar import GrammarError, Grammars

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}},
         {"type": "function", "function": {"name": "clock"}}]
CALL = "<tool_call>\n<function=weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
NAMED = {"type": "function", "function": {"name": "weather"}}


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    vocab = 1344  # the tiny config's vocab_size: padded past the tokenizer's 1,306 tokens
    assert len(tok) < vocab
    return tok, Grammars(tok, vocab, eos), eos, vocab


def allowed(grammars: Grammars, matcher, vocab: int) -> set[int]:
    rows = torch.zeros(1, vocab)
    grammars.apply(rows, grammars.fill([matcher]))
    return set(torch.nonzero(rows[0] == 0).flatten().tolist())


def accepts(grammars, request, thinking: bool, text: str, tok) -> bool:
    m = grammars.matcher(grammars.compile(request, thinking))
    return all(m.accept_token(t) for t in tok(text)["input_ids"])


def test_nothing_constrained_without_a_forced_choice_or_format(setup):
    _, g, _, _ = setup
    for request in ({}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}, {"response_format": None}):
        assert g.compile(request, thinking=False) is None


def test_forced_call_admits_a_call_and_then_only_the_end(setup):
    tok, g, eos, vocab = setup
    for request in ({"tools": TOOLS, "tool_choice": NAMED}, {"tools": TOOLS, "tool_choice": "required",
                                                            "parallel_tool_calls": False}):
        m = g.matcher(g.compile(request, thinking=False))
        first = allowed(g, m, vocab)
        assert tok.convert_tokens_to_ids("<tool_call>") in first and tok.encode("Hello")[0] not in first
        assert not first & set(range(len(tok), vocab))  # padding rows are never allowed
        for t in tok(CALL)["input_ids"]:
            assert m.accept_token(t)
        assert allowed(g, m, vocab) == eos


def test_forced_call_follows_the_schema(setup):
    tok, g, _, _ = setup
    named = {"tools": TOOLS, "tool_choice": NAMED}
    assert accepts(g, named, False, CALL, tok)
    assert not accepts(g, named, False, CALL.replace("weather", "clock"), tok)  # the other tool
    bad_int = CALL.replace("</parameter>\n</function>", "</parameter>\n<parameter=days>\nsoon\n</parameter>\n"
                                                       "</function>")
    assert not accepts(g, named, False, bad_int, tok)
    assert not accepts(g, named, False, "Sure! " + CALL, tok)  # nothing but calls


def test_parallel_calls_only_when_allowed(setup):
    tok, g, _, _ = setup
    two = CALL + "\n" + CALL.replace("weather", "clock").replace(
        "<parameter=city>\nOslo\n</parameter>\n", "")
    assert accepts(g, {"tools": TOOLS, "tool_choice": "required"}, False, two, tok)
    assert not accepts(g, {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, False, two, tok)


def test_thinking_comes_first_then_the_constraint(setup):
    tok, g, _, vocab = setup
    request = {"tools": TOOLS, "tool_choice": "required"}
    m = g.matcher(g.compile(request, thinking=True))
    assert tok.encode("Hello")[0] in allowed(g, m, vocab)  # free reasoning
    assert accepts(g, request, True, "Let me see.</think>\n\n" + CALL, tok)
    assert not accepts(g, request, True, "Let me see.</think>\n\nNo call.", tok)
    fmt = {"response_format": {"type": "json_object"}}
    assert accepts(g, fmt, True, 'Hmm.</think>\n\n{"a": 1}', tok)
    assert not accepts(g, fmt, False, 'Hmm.</think>\n\n{"a": 1}', tok)


def test_json_schema_strict_and_not(setup):
    tok, g, _, _ = setup
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = lambda strict: {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": strict}}}
    assert accepts(g, fmt(True), False, '{"a": 1}', tok)
    assert not accepts(g, fmt(True), False, '{"a": 1, "b": 2}', tok)
    assert accepts(g, fmt(False), False, '{"a": 1, "b": 2}', tok)
    assert not accepts(g, fmt(False), False, '{"a": "x"}', tok)
    assert not accepts(g, {"response_format": {"type": "json_object"}}, False, "[1]", tok)


def test_uncompilable_schemas_name_their_parameter(setup):
    _, g, _, _ = setup
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    with pytest.raises(GrammarError) as e:
        g.compile({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}}, False)
    assert e.value.param == "response_format.json_schema.schema" and "strin" in str(e.value)
    tools = TOOLS + [{"type": "function", "function": {"name": "bad", "parameters": bad}}]
    with pytest.raises(GrammarError) as e:
        g.compile({"tools": tools, "tool_choice": "required"}, False)
    assert e.value.param == "tools[2].function.parameters" and not str(e.value).startswith("[")


def test_unconstrained_rows_are_left_alone(setup):
    _, g, _, vocab = setup
    m = g.matcher(g.compile({"response_format": {"type": "json_object"}}, False))
    rows = torch.randn(3, vocab)
    before = rows.clone()
    g.apply(rows, g.fill([None, m, None]))
    assert torch.equal(rows[0], before[0]) and torch.equal(rows[2], before[2])
    assert torch.isinf(rows[1]).sum() > vocab // 2
