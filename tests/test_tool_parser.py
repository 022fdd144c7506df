"""The Qwen3.6 tool-call parser on hand-written model outputs: whole and fed in every split, the
streamed deltas assembling (as the openai client assembles them) to the non-streamed calls."""
from __future__ import annotations

import json

import pytest

from ds_qwen_vision.engine.tools import ToolCallParser, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "metric": {"type": "boolean"}, "hours": {"type": "array"},
                                         "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]


def call(name: str, **params: str) -> str:
    """A call as Qwen3.6's chat template renders one."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def streamed(text: str, pieces: list[int], parallel: bool = True) -> tuple[str, list[dict], ToolCallParser]:
    """Feed `text` cut at `pieces`; assemble deltas the way openai's stream helpers do."""
    parser = ToolCallParser(TOOLS, parallel)
    content, calls = "", []
    cuts = [0, *pieces, len(text)]
    outs = [parser.feed(text[a:b]) for a, b in zip(cuts, cuts[1:])] + [parser.finish()]
    for piece, deltas in outs:
        content += piece
        for d in deltas:
            if d["index"] == len(calls):
                assert set(d) == {"index", "id", "type", "function"} and d["function"]["arguments"] == ""
                calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls, parser


def whole(text: str):
    content, calls = parse_tool_calls(text, TOOLS)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_one_call_typed_by_schema():
    text = call("get_weather", city="Paris", days="3", metric="true", hours='[1, 2]', note="null")
    assert whole(text) == ("", [("get_weather", {"city": "Paris", "days": 3, "metric": True,
                                                 "hours": [1, 2], "note": None})])


def test_string_stays_raw_even_if_it_looks_like_json():
    text = call("get_weather", city="42", note='{"a": 1}')
    assert whole(text)[1] == [("get_weather", {"city": "42", "note": '{"a": 1}'})]


def test_template_python_literals_and_unknown_parameters():
    # Jinja's |string renders True/None; a parameter the schema does not name is text.
    text = call("get_weather", metric="True", days="None", extra="7")
    assert whole(text)[1] == [("get_weather", {"metric": True, "days": None, "extra": "7"})]


def test_several_calls_with_content_before():
    text = "Let me check.\n\n" + call("get_weather", city="Oslo") + "\n" + call("noop")
    assert whole(text) == ("Let me check.\n\n", [("get_weather", {"city": "Oslo"}), ("noop", {})])


def test_not_a_call_is_content():
    for text in ("a <tool_call> b", "<tool_call>\nplain text"):
        content, calls = whole(text)
        assert (content, calls) == (text, []), text


def test_the_start_of_a_call_at_the_end_is_not_content():
    """A call still arriving when the output ends (a partial tag, an unfinished header) is neither content
    nor a call, the second call of an output too; cut by max_tokens or not."""
    done = call("noop")
    for text, content in (("x <tool_call", "x "), ("<tool_call>\n<function", ""), ("Hi <tool_c", "Hi "),
                          (done + "\n<tool_call>\n<function=get_wea", ""), (done + "\n<tool", "")):
        for cut in (False, True):
            parser = ToolCallParser(TOOLS)
            shown, _ = parser.feed(text)
            rest, _ = parser.finish(cut)
            assert shown + rest == content and "<tool" not in shown + rest, (text, cut)
            assert [c["name"] for c in parser.calls] == (["noop"] if text.startswith(done) else []), (text, cut)


def test_a_call_cut_by_max_tokens_keeps_its_arguments_as_generated():
    """finish(cut=True): every cut of a call gives arguments that are the start of the whole call's (OpenAI's
    `length`): the value being written as far as it went, a string unclosed, no closing brace made up."""
    text = call("get_weather", city='Oslo "Nord"', days="12", metric="true")
    full = '{"city": "Oslo \\"Nord\\"", "days": 12, "metric": true}'
    assert whole(text)[1] == [("get_weather", json.loads(full))]
    seen = set()
    for n in range(text.index("<parameter="), len(text)):
        parser = ToolCallParser(TOOLS)
        content, deltas = parser.feed(text[:n])
        rest, more = parser.finish(cut=True)
        args = "".join(d["function"]["arguments"] for d in deltas + more)
        assert content + rest == "" and full.startswith(args) and args == parser.calls[0]["arguments"], (n, args)
        seen.add(args)
    assert '{"city": "Oslo \\"No' in seen and '{"city": "Oslo \\"Nord\\"", "days": 1' in seen and full in seen
    assert "{}" not in seen and "" in seen  # cut right after the header: no argument text yet


def test_plain_text_has_no_calls():
    assert whole("Hello <b>there</b> tool_call") == ("Hello <b>there</b> tool_call", [])


def test_cut_off_call_keeps_complete_parameters():
    text = call("get_weather", city="Rome", days="2")
    cut = text[:text.index("<parameter=days>") + len("<parameter=days>\n2")]
    assert whole(cut)[1] == [("get_weather", {"city": "Rome"})]


def test_missing_parameter_close_tag():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n<parameter=days>\n4\n</function>\n</tool_call>"
    assert whole(text)[1] == [("get_weather", {"city": "Bern", "days": 4})]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 13])
def test_streamed_pieces_assemble_to_the_whole(step):
    text = "Sure. " + call("get_weather", city="Lima", days="5") + "\n" + call("noop") + "\n"
    content, calls, _ = streamed(text, list(range(step, len(text), step)))
    ref_content, ref_calls = parse_tool_calls(text, TOOLS)
    assert content == ref_content == "Sure. "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ref_calls]
    assert len({c["id"] for c in calls}) == 2


def test_name_is_sent_before_the_arguments():
    text = call("get_weather", city="Kyiv")
    parser = ToolCallParser(TOOLS)
    _, deltas = parser.feed(text[:text.index("<parameter=")])
    assert deltas and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}


def test_single_call_when_not_parallel():
    text = call("noop") + "\n" + call("get_weather", city="Quito")
    content, calls, parser = streamed(text, [len(call("noop")) + 3], parallel=False)
    assert [c["name"] for c in calls] == ["noop"] and parser.done and content == ""


def test_a_call_inside_the_reasoning_is_not_a_call(tiny_ckpt):
    """The engine's own path (TextStream → Output.emit): a call written while thinking stays reasoning."""
    import queue
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ds_qwen_vision.engine.output import Output
    from ds_qwen_vision.engine.textstream import TextStream

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    inside, after = call("noop"), call("get_weather", city="Oslo")
    text = f"Maybe {inside} no.</think>\n\nOK {after}"
    seq = SimpleNamespace(stream=TextStream(tok, [], in_reasoning=True), tools=ToolCallParser(TOOLS),
                          events=queue.Queue(), index=0, sampling=SimpleNamespace(logprobs=False), fault=None)
    ids = tok(text)["input_ids"]
    for token in ids:
        Output.emit(seq, *seq.stream.add(token), final=False)
    Output.emit(seq, *seq.stream.finish(), final=True)
    events = list(seq.events.queue)
    reasoning = "".join(e["reasoning_content"] for e in events)
    content = "".join(e["content"] for e in events)
    deltas = [d for e in events for d in e.get("tool_calls", [])]
    assert reasoning == f"Maybe {inside} no."
    assert content == "OK "
    assert [d["function"]["name"] for d in deltas if "id" in d] == ["get_weather"]


def test_cut_inside_a_tag_leaves_no_content():
    text = call("get_weather", city="Rome")
    for cut in (text.index("</function>") + 2, text.index("</tool_call>") + 3, text.index("<parameter=") + 4):
        content, calls = whole(text[:cut])
        assert content == "" and [name for name, _ in calls] == ["get_weather"], (cut, content)
