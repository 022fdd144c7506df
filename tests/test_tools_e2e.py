"""Tool calling and structured output through the real server (the session's hardened server, see
conftest) and the official ``openai`` client, on the demo checkpoint's random weights.

Random weights never mean to call a tool, so what these tests show is the machinery: a forced call
(``tool_choice`` required / named) always parses and its arguments validate against the tool's schema
(jsonschema, not our code), a ``json_schema`` answer validates, the streamed deltas assemble (by the
client's own stream helper) to the non-streamed answer, and a whole round trip (call → ``tool`` message
→ answer) is rendered by the checkpoint's chat template exactly as transformers renders it. Schemas
have bounded values (enums, ranges, short strings) so that a random model finishes them in few tokens.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from ds_qwen_vision.checkpoint import demo_dir
from ds_qwen_vision.model import load_processor

MODEL = "fake-qwen"  # conftest.HARDENED_CONFIG
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
# Small: the hardened server's prompt limit is 512 tokens, and the tiny tokenizer spends ~240 on the
# template's tool preamble and ~100 on each tool.
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(hardened_server):
    return openai.OpenAI(base_url=f"{hardened_server.base_url}/v1", api_key=hardened_server.api_key, max_retries=0)


def valid_calls(message) -> list[tuple[str, dict]]:
    """The message's calls as (name, arguments); each must name a tool and validate against its schema."""
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


# Each long request costs ~20 s on the 2-core CI box: the forced-call cases are spread over the tests below
# (required + parallel, greedy, here; a named function, sampled, in the streaming test; required with
# parallel_tool_calls=false, sampled, in the round trip).
@pytest.mark.parametrize("choice,parallel,temperature", [("required", True, 0.0)])
def test_forced_tool_calls_always_parse_and_validate(client, choice, parallel, temperature):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=parallel, temperature=temperature, seed=3,
                                       max_tokens=120, extra_body=NO_THINKING)
    choice_ = r.choices[0]
    assert choice_.message.content is None, choice_  # the grammar allows nothing but calls
    if not parallel or isinstance(choice, dict):
        assert choice_.finish_reason == "tool_calls", choice_
        calls = valid_calls(choice_.message)
        assert len(calls) == 1
    else:
        # Parallel calls: a random model may go on calling until max_tokens cuts its last call.
        assert choice_.finish_reason in ("tool_calls", "length"), choice_
        complete = choice_.message.tool_calls[:-1] if choice_.finish_reason == "length" else None
        if complete is not None:
            choice_.message.tool_calls = complete
        calls = valid_calls(choice_.message)
    if isinstance(choice, dict):
        assert calls[0][0] == "weather"


def test_streamed_deltas_assemble_to_the_same_call(client):
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "extra_body": NO_THINKING,
              "tool_choice": {"type": "function", "function": {"name": "weather"}}, "temperature": 1.0, "seed": 3}
    whole = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        names = [e.name for e in stream if e.type == "tool_calls.function.arguments.done"]
        streamed = stream.get_final_completion()
    assert names == ["weather"]
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content is None
    assert valid_calls(streamed.choices[0].message) == valid_calls(whole.choices[0].message)
    assert len(whole.choices[0].message.tool_calls) == 1 and names == ["weather"]


def test_round_trip_is_rendered_as_transformers_renders_it(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=200, extra_body=NO_THINKING)
    assert first.choices[0].finish_reason == "tool_calls" and len(valid_calls(first.choices[0].message)) == 1
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=4, extra_body=NO_THINKING)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The reference: the checkpoint's template through transformers, arguments as the mapping it reads.
    ref_history = ASK + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": call.id, "type": "function", "function": {"name": call.function.name,
                                                        "arguments": json.loads(call.function.arguments)}}]},
                         {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."}]
    processor = load_processor(demo_dir())
    text = processor.apply_chat_template(ref_history, tools=[WEATHER], add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    assert "<tools>" in text and f"<function={call.function.name}>" in text and "<tool_response>" in text
    assert second.usage.prompt_tokens == len(processor.tokenizer(text)["input_ids"])


def test_tool_choice_none_and_auto_answer_in_text(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=6, extra_body=NO_THINKING)
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


RESULT = {"type": "object", "properties": {"ok": {"type": "boolean"}, "grade": {"enum": ["a", "b", "c"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "grade", "n"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [1.0])
def test_json_schema_answers_validate(client, temperature):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=temperature, seed=5, max_tokens=200, extra_body=NO_THINKING,
        response_format={"type": "json_schema", "json_schema": {"name": "result", "schema": RESULT, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), RESULT)
