"""Bad input against the REAL server (launch.sh: CPU ranks, the engine, the gunicorn front; the session's
hardened server, see conftest): a corpus of 200+ malformed requests, each answered with the right 4xx
and a clear message, after which the server answers a greedy request exactly as before; odd but valid
images, answered as transformers' own processor sees them; a short fuzzing run with no 5xx; and access
control: the API key, the loopback bind, no remote image fetching, limits applied before decoding.

The corpus is built from test_server_api's hand-written cases (the server is served under their model
name and limits) plus variants generated per field and per kind of damage.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
import pytest
from PIL import Image
from chat_http import answer, get, metric, post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import bomb_png, data_url, encode, jpeg, noise, odd_valid_images, png, png_chunk
from test_server_api import MALFORMED

from ds_qwen_vision.checkpoint import demo_dir
from ds_qwen_vision.config import DeployConfig
from ds_qwen_vision.model import chat_inputs, load_processor

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

SKIP = ...  # "do not check the param"


@dataclass
class Case:
    name: str
    body: dict | bytes          # bytes are sent as they are
    status: int
    code: str | None            # None: not checked
    fragment: str               # must appear in the message
    param: Any = SKIP           # the exact `param`, or SKIP
    engine: bool = False        # refused by the engine (after the front's checks), not by the front
    chunked: bool = False


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

MODEL = "fake-qwen"             # conftest.HARDENED_CONFIG
MAX_NEW = 1024
MAX_BODY = 300_000
MAX_PROMPT = 512
MAX_IMAGES = 2
MAX_N = 4                       # limits.max_n's default
VOCAB = 1344                    # the demo checkpoint's vocab_size (asserted by the `server` fixture)


def user(content) -> dict:
    return {"role": "user", "content": content}


def req(*messages, **fields) -> dict:
    return {"model": MODEL, "messages": list(messages) or [user("hi")], "max_tokens": 1, **fields}


def with_image(url, text="what is this?") -> list:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


def image_case(name: str, data: bytes, status: int = 400, code: str = "invalid_image", fragment: str = "image",
               fmt: str = "png") -> Case:
    return Case(name, req(user(with_image(data_url(data, fmt)))), status, code, fragment,
                "messages[0].content[1].image_url")


JSON_KINDS = {"a string": "x", "an integer": 7, "a number": 1.5, "a boolean": True, "an array": [1],
              "an object": {"k": 1}, "null": None}


def wrong_types() -> list[Case]:
    """Every field, with every JSON type that field does not accept: 400 invalid_type, naming the field."""
    def top(field):
        return lambda v: req(**{field: v})

    # path -> (build a request with `v` there, the JSON kinds that pass the field's type check)
    fields = {
        "model": (lambda v: {"model": v, "messages": [user("hi")]}, {"a string"}),
        "messages": (lambda v: {"model": MODEL, "messages": v}, {"an array"}),
        "max_tokens": (top("max_tokens"), {"an integer", "null"}),
        "max_completion_tokens": (lambda v: {**req(), "max_tokens": None, "max_completion_tokens": v},
                                  {"an integer", "null"}),
        "temperature": (top("temperature"), {"an integer", "a number", "null"}),
        "top_p": (top("top_p"), {"an integer", "a number", "null"}),
        "top_k": (top("top_k"), {"an integer", "null"}),
        "seed": (top("seed"), {"an integer", "null"}),
        "stop": (top("stop"), {"a string", "an array", "null"}),
        "stream": (top("stream"), {"a boolean", "null"}),
        "stream_options": (top("stream_options"), {"an object", "null"}),
        "chat_template_kwargs": (top("chat_template_kwargs"), {"an object", "null"}),
        "n": (top("n"), {"an integer", "null"}),
        "logprobs": (top("logprobs"), {"a boolean", "null"}),
        "top_logprobs": (lambda v: req(logprobs=True, top_logprobs=v), {"an integer", "null"}),
        "presence_penalty": (top("presence_penalty"), {"an integer", "a number", "null"}),
        "frequency_penalty": (top("frequency_penalty"), {"an integer", "a number", "null"}),
        "repetition_penalty": (top("repetition_penalty"), {"an integer", "a number", "null"}),
        "min_p": (top("min_p"), {"an integer", "a number", "null"}),
        "stop_token_ids": (top("stop_token_ids"), {"an array", "null"}),
        "stop_token_ids[0]": (lambda v: req(stop_token_ids=[v]), {"an integer"}),
        "ignore_eos": (top("ignore_eos"), {"a boolean", "null"}),
        "user": (top("user"), {"a string", "null"}),
        "messages[0]": (lambda v: req(v), {"an object"}),
        "messages[0].role": (lambda v: req({"role": v, "content": "hi"}), {"a string"}),
        "messages[0].content": (lambda v: req(user(v)), {"a string", "an array", "null"}),
        "messages[0].content[0]": (lambda v: req(user([v])), {"an object"}),
        "messages[0].content[0].text": (lambda v: req(user([{"type": "text", "text": v}])), {"a string"}),
        "messages[0].content[1].image_url": (
            lambda v: req(user([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": v}])),
            {"a string", "an object"}),
        "messages[0].content[1].image_url.url": (lambda v: req(user(with_image(v))), {"a string"}),
        "stream_options.include_usage": (lambda v: req(stream=True, stream_options={"include_usage": v}),
                                         {"a boolean", "null"}),
    }
    cases = []
    for path, (build, accepted) in fields.items():
        for kind, value in JSON_KINDS.items():
            if kind not in accepted:
                cases.append(Case(f"type:{path}={kind}", build(value), 400, "invalid_type", f"'{path}", SKIP))
    return cases


def bad_json() -> list[Case]:
    good = json.dumps(req()).encode()
    cases = [Case(f"json:cut@{n}", good[:n], 400, "invalid_json", "not valid JSON", None)
             for n in range(1, len(good), max(1, len(good) // 12))]
    for name, raw in [("single_quotes", b"{'model': 'fake-qwen'}"), ("trailing_comma", good[:-1] + b",}"),
                      ("two_objects", good + good), ("nul_bytes", b"\0" * 16), ("comment", b"// hi\n" + good),
                      ("utf16", json.dumps(req()).encode("utf-16")), ("bare_word", b"nul"),
                      ("unquoted_key", b'{model: "fake-qwen"}'), ("lone_brace", b"}"), ("whitespace", b"   \n")]:
        cases.append(Case(f"json:{name}", raw, 400, "invalid_json", "not valid JSON", None))
    for name, raw, got in [("null", b"null", "null"), ("number", b"42", "an integer"), ("true", b"true", "a boolean")]:
        cases.append(Case(f"json:{name}", raw, 400, "invalid_type", f"must be a JSON object, got {got}", None))
    return cases


def missing_fields() -> list[Case]:
    m = "missing_required_parameter"
    return [
        Case("missing:model", {"messages": [user("hi")]}, 400, m, "'model'", "model"),
        Case("missing:messages", {"model": MODEL}, 400, m, "'messages'", "messages"),
        Case("missing:everything", {}, 400, m, "Missing required parameter", SKIP),
        Case("missing:role", req({"content": "hi"}), 400, m, "messages[0].role", "messages[0].role"),
        Case("missing:user_content", req({"role": "user"}), 400, m, "needs 'content'", "messages[0]"),
        Case("missing:system_content", req({"role": "system"}, user("hi")), 400, m, "needs 'content'", "messages[0]"),
        Case("missing:part_type", req(user([{"text": "hi"}])), 400, m, "no 'type'", "messages[0].content[0]"),
        Case("missing:image_url", req(user([{"type": "image_url"}])), 400, m, "image_url",
             "messages[0].content[0].image_url"),
        Case("missing:url", req(user([{"type": "image_url", "image_url": {}}])), 400, m, "url",
             "messages[0].content[0].image_url.url"),
        Case("missing:text", req(user([{"type": "text"}])), 400, m, "text", "messages[0].content[0].text"),
    ]


def roles_and_conversations() -> list[Case]:
    cases = [Case(f"role:{r!r}", req({"role": r, "content": "hi"}), 400, "invalid_role", "unknown role",
                  "messages[0].role") for r in ["bot", "USER", "", "human", "model", "System", "user ", "ai"]]
    cases += [Case("role:function", req(user("hi"), {"role": "function", "content": "x"}), 400, "unsupported_role",
                   "is not supported", "messages[1].role")]
    img = [{"type": "image_url", "image_url": {"url": data_url(png())}}]
    cases += [
        Case("conv:empty_messages", {"model": MODEL, "messages": []}, 400, "invalid_value", "at least one message",
             "messages"),
        Case("conv:no_user", req({"role": "system", "content": "s"}), 400, "invalid_value",
             "at least one user message", "messages"),
        Case("conv:assistant_only", req({"role": "assistant", "content": "a"}), 400, "invalid_value",
             "at least one user message", "messages"),
        Case("conv:late_system", req(user("hi"), {"role": "system", "content": "s"}), 400, "invalid_value",
             "only be the first message", "messages"),
        Case("conv:late_developer", req(user("hi"), {"role": "developer", "content": "s"}), 400, "invalid_value",
             "only be the first message", "messages"),
        Case("conv:image_in_assistant", req(user("hi"), {"role": "assistant", "content": img}), 400,
             "invalid_value", "only allowed in user messages", "messages[1]"),
        Case("conv:image_in_system", req({"role": "system", "content": img}, user("hi")), 400, "invalid_value",
             "only allowed in user messages", "messages[0]"),
    ]
    cases += [Case(f"conv:empty_content:{r}", req(*([user("hi")] if r != "user" else []), {"role": r, "content": []},
                                                  *([user("hi")] if r == "system" else [])),
                   400, "invalid_value", "must not be an empty array", SKIP) for r in ["user", "assistant", "system"]]
    cases += [Case(f"part:{t}", req(user([{"type": t, t: {}}])), 400, "unsupported_content", "is not supported",
                   "messages[0].content[0]") for t in ["input_audio", "video_url", "file", "image", "refusal", "audio"]]
    return cases


def images() -> list[Case]:
    zero_w = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0))
    zero_h = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 0, 8, 2, 0, 0, 0))
    gif_bomb = bytearray(encode(noise(8, 8).convert("P"), "GIF"))
    gif_bomb[6:10] = struct.pack("<HH", 65535, 65535)
    jpeg_bomb = bytearray(jpeg(8, 8))
    sof = jpeg_bomb.find(b"\xff\xc0")
    jpeg_bomb[sof + 5:sof + 9] = struct.pack(">HH", 65500, 65500)
    cases = [
        image_case("bomb:png_20000x20000", bomb_png(), 413, "image_too_large", "more than 1000000 pixels"),
        image_case("bomb:png_1001x1000", encode(noise(1, 1).resize((1001, 1000)), "PNG"), 413, "image_too_large",
                   "1001x1000 = 1001000 pixels"),
        image_case("bomb:png_1x1000001", bomb_png(1, 1_000_001), 413, "image_too_large", "pixels"),
        image_case("bomb:gif_header", bytes(gif_bomb), 413, "image_too_large", "pixels", "gif"),
        image_case("bomb:jpeg_header", bytes(jpeg_bomb), 413, "image_too_large", "pixels", "jpeg"),
        image_case("zero_px:width", zero_w, fragment="image"),
        image_case("zero_px:height", zero_h, fragment="image"),
    ]
    not_images = {"text": b"just some text, not a picture", "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
                  "zip": b"PK\x03\x04" + bytes(40), "elf": b"\x7fELF\x02\x01\x01" + bytes(60),
                  "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
                  "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "ico": encode(noise(16, 16), "ICO"),
                  "png_signature_only": b"\x89PNG\r\n\x1a\n", "gif_magic_only": b"GIF89a", "jpeg_soi_only": b"\xff\xd8\xff",
                  "zeros": bytes(3), "html": b"<html><body>hi</body></html>"}
    cases += [image_case(f"not_image:{k}", v, fragment="not an image in a supported format")
              for k, v in not_images.items()]
    encoded = {"png": png(64, 64), "jpeg": jpeg(64, 64), "gif": encode(noise(64, 64).convert("P"), "GIF"),
               "webp": encode(noise(64, 64), "WEBP"), "bmp": encode(noise(64, 64), "BMP"),
               "tiff": encode(noise(64, 64), "TIFF")}
    for fmt, data in encoded.items():
        for frac in (0.05, 0.3, 0.6, 0.9, 0.99):
            cases.append(image_case(f"truncated:{fmt}@{frac}", data[: int(len(data) * frac)], fmt=fmt))
    bad_b64 = {"symbols": "iVBO$$w0KGgo=", "bad_padding": "iVBORw0KGgo", "urlsafe": "____",
               "newline": "iVBORw0KGgo=\n", "spaces": "iVBO Rw0K", "unicode": "iVBOR\u00e9w0KGgo="}
    cases += [Case(f"base64:{k}", req(user(with_image(f"data:image/png;base64,{v}"))), 400, "invalid_base64",
                   "not valid base64", "messages[0].content[1].image_url") for k, v in bad_b64.items()]
    cases.append(Case("base64:empty", req(user(with_image("data:image/png;base64,"))), 400, "invalid_image",
                      "empty", "messages[0].content[1].image_url"))
    urls = {"http": "http://example.com/cat.png", "https": "https://example.com/cat.png",
            "metadata": "http://169.254.169.254/latest/meta-data", "ftp": "ftp://example.com/cat.png",
            "file": "file:///etc/passwd", "scheme_relative": "//example.com/cat.png", "relative": "cat.png",
            "data_text": "data:text/plain;base64,aGVsbG8=", "data_no_base64": "data:image/png,abc",
            "data_no_comma": "data:image/png;base64", "javascript": "javascript:alert(1)"}
    cases += [Case(f"url:{k}", req(user(with_image(v))), 400, "invalid_image_url", "data:image/<format>;base64",
                   "messages[0].content[1].image_url") for k, v in urls.items()]
    cases.append(Case("url:allowed_prefix", req(user(with_image("https://images.example/cat.png"))), 400,
                      "unsupported_image_url", "remote image fetching is not supported",
                      "messages[0].content[1].image_url"))
    one = {"type": "image_url", "image_url": {"url": data_url(png())}}
    for n in (3, 5, 9):
        cases.append(Case(f"too_many_images:{n}", req(user([one] * n)), 400, "too_many_images",
                          f"at most {MAX_IMAGES} per request", "messages"))
    cases.append(Case("too_many_images:across_turns", req(user([one, one]), {"role": "assistant", "content": "ok"},
                                                          user([one])), 400, "too_many_images", "3 images", "messages"))
    # The front reads the processor's resize rule from the checkpoint: an image it would refuse is refused from
    # its header, before it is decoded.
    cases.append(Case("processor:aspect_500", req(user(with_image(data_url(png(2000, 4))))), 400, "invalid_image",
                      "aspect ratio is over the model's image processor's limit of 200:1",
                      "messages[0].content[1].image_url"))
    return cases


def numbers() -> list[Case]:
    v = "invalid_value"
    cases = [Case(f"max_tokens={n}", req(max_tokens=n), 400, v, frag, "max_tokens") for n, frag in [
        (0, "greater than or equal to 1"), (-1, "greater than or equal to 1"), (-(2**31), "greater than or equal"),
        (MAX_NEW + 1, f"limit of {MAX_NEW} new tokens"), (10**6, "limit of"), (2**63, "limit of"), (2**70, "limit of")]]
    cases += [Case(f"max_completion_tokens={n}", {**req(), "max_tokens": None, "max_completion_tokens": n}, 400, v,
                   "", "max_completion_tokens") for n in (0, MAX_NEW + 1)]
    cases.append(Case("max_tokens_conflict", req(max_tokens=5, max_completion_tokens=6), 400, v, "differs from",
                      "max_completion_tokens"))
    for field, values in {"temperature": [-0.01, 2.0001, 3, -1e308], "top_p": [0, -0.1, 1.01, 2],
                          "top_k": [-2, -1000], "seed": [2**63, -(2**63) - 1], "n": [0, MAX_N + 1, 100],
                          "presence_penalty": [-2.01, 2.5, 100], "frequency_penalty": [-3, 2.0001, -1e308],
                          "repetition_penalty": [0, -1, 100.5], "min_p": [-0.1, 1.01, 7]}.items():
        cases += [Case(f"{field}={x}", req(**{field: x}), 400, v, "", field) for x in values]
    cases += [Case(f"top_logprobs={x}", req(logprobs=True, top_logprobs=x), 400, v, "", "top_logprobs")
              for x in (-1, 21, 10**6)]
    cases += [Case(f"top_logprobs_without_logprobs:{lp}", req(top_logprobs=2, **({} if lp is None else {"logprobs": lp})),
                   400, v, "needs logprobs: true", "top_logprobs") for lp in (None, False)]
    cases += [Case(f"stop_token_ids={ids}", req(stop_token_ids=ids), 400, v, "", p) for ids, p in
              [([-1], "stop_token_ids[0]"), ([1, 2**31], "stop_token_ids[1]"), (list(range(65)), "stop_token_ids")]]
    # Ids past the vocabulary: only the engine knows its size.
    cases += [Case(f"stop_token_ids_past_vocab:{i}", req(stop_token_ids=[1, i]), 400, v, "past the vocabulary",
                   "stop_token_ids", engine=True) for i in (VOCAB, 2**31 - 1)]
    raw = json.dumps(req())[:-1]
    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        for lit in ("NaN", "Infinity", "-Infinity", "1e400"):
            cases.append(Case(f"{field}={lit}", f'{raw}, "{field}": {lit}}}'.encode(), 400, v, "finite number", field))
    cases += [
        Case("stop:five", req(stop=list("abcde")), 400, v, "at most 4 stop sequences", "stop"),
        Case("stop:empty_string", req(stop=[""]), 400, v, "must not be empty", "stop"),
        Case("stream_options_without_stream", req(stream_options={"include_usage": True}), 400, v,
             "only allowed when stream is true", "stream_options"),
        Case("template_kwargs:reserved", req(chat_template_kwargs={"tokenize": True}), 400, v, "cannot be set",
             "chat_template_kwargs"),
        Case("template_kwargs:bad_name", req(chat_template_kwargs={"not-an-identifier": 1}), 400, v, "cannot be set",
             "chat_template_kwargs"),
        Case("template_kwargs:nested", req(chat_template_kwargs={"x": [1]}), 400, "invalid_type",
             "string, number, boolean or null", "chat_template_kwargs"),
        Case("image_detail", req(user([{"type": "image_url", "image_url": {"url": data_url(png()), "detail": "max"}}])),
             400, v, "'auto', 'low' or 'high'", "messages[0].content[0].image_url.detail"),
    ]
    unsupported = {"functions": [{"name": "f"}], "function_call": {"name": "f"}, "logit_bias": {"1": 5}}
    cases += [Case(f"unsupported:{k}", req(**{k: x}), 400, "unsupported_parameter", "is not supported", k)
              for k, x in unsupported.items()]
    return cases


def sizes() -> list[Case]:
    too_big = "request_too_large"
    cases = [Case(f"body:{n}", req(user("x" * n)), 413, too_big, f"limit {MAX_BODY} bytes", None)
             for n in (MAX_BODY, 400_000, 1_000_000)]
    cases.append(Case("body:chunked", req(user("x" * 400_000)), 413, too_big, f"limit {MAX_BODY} bytes", None,
                      chunked=True))
    # Over the prompt limit: refused by the engine, which alone knows the token count (images included).
    long_text = "hello there " * 400
    img = {"type": "image_url", "image_url": {"url": data_url(encode(noise(1, 1).resize((600, 400)), "PNG"))}}
    for name, body in [("text", req(user(long_text))),
                       ("system", req({"role": "system", "content": long_text}, user("hi"))),
                       ("images", req(user([img, img, {"type": "text", "text": "hello there " * 120}]))),
                       ("history", req(*[user("hello there " * 30), {"role": "assistant", "content": "ok " * 30}] * 6,
                                       user("and?")))]:
        cases.append(Case(f"prompt_too_long:{name}", body, 400, "context_length_exceeded",
                          f"the limit is {MAX_PROMPT}", "messages", engine=True))
    # Images whose tokens alone are over the limit (a 1000x1000 image is 963 tokens): the front counts them from
    # their headers, so even one whose pixel data is cut off is refused for its length, never decoded.
    flat = encode(Image.new("RGB", (1000, 1000), "teal"), "PNG")
    for name, data in [("image_header", flat), ("image_header_truncated", flat[:120])]:
        cases.append(Case(f"prompt_too_long:{name}", req(user(with_image(data_url(data)))), 400,
                          "context_length_exceeded", f"963 tokens as the model's image processor resizes them; "
                          f"this server accepts at most {MAX_PROMPT} prompt tokens", "messages"))
    return cases


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tools_and_formats() -> list[Case]:
    """Tools, tool_choice, tool messages and response_format: malformed at the front, or schemas that only
    the grammar engine (on rank 0, before anything is broadcast) finds it cannot compile."""
    v, m, t = "invalid_value", "missing_required_parameter", "invalid_type"
    fn = lambda **f: [{"type": "function", "function": {"name": "f", **f}}]  # noqa: E731
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    cases = [
        Case("tools:not_list", req(tools={"type": "function"}), 400, t, "valid array", "tools"),
        Case("tools:type", req(tools=[{"type": "retrieval", "function": {"name": "f"}}]), 400, v, "'function'",
             "tools[0].type"),
        Case("tools:no_function", req(tools=[{"type": "function"}]), 400, m, "tools[0].function", "tools[0].function"),
        Case("tools:no_name", req(tools=[{"type": "function", "function": {}}]), 400, m, "name",
             "tools[0].function.name"),
        Case("tools:name_number", req(tools=fn(name=5)), 400, t, "valid string", "tools[0].function.name"),
        Case("tools:name_long", req(tools=fn(name="x" * 65)), 400, v, "not a valid function name",
             "tools[0].function.name"),
        Case("tools:name_tag", req(tools=fn(name="a>b")), 400, v, "not a valid function name", "tools[0].function.name"),
        Case("tools:duplicate", req(tools=[TOOL, TOOL]), 400, v, "two tools are named", "tools"),
        Case("tools:parameters_list", req(tools=fn(parameters=[])), 400, t, "should be an object",
             "tools[0].function.parameters"),
        Case("tools:parameters_array", req(tools=fn(parameters={"type": "array"})), 400, v, "of type 'object'",
             "tools[0].function.parameters"),
        Case("tools:properties_list", req(tools=fn(parameters={"type": "object", "properties": []})), 400, t,
             "'properties'", "tools[0].function.parameters"),
        Case("tool_choice:unknown_name", req(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
             400, v, "no tool is named 'nope'", "tool_choice"),
        Case("tool_choice:without_tools", req(tool_choice="required"), 400, v, "needs tools", "tool_choice"),
        Case("tool_choice:named_without_tools", req(tool_choice={"type": "function", "function": {"name": "f"}}),
             400, v, "needs tools", "tool_choice"),
        Case("tool_choice:bad_string", req(tools=[TOOL], tool_choice="always"), 400, None, "tool_choice", SKIP),
        Case("tool_choice:no_function", req(tools=[TOOL], tool_choice={"type": "function"}), 400, None,
             "tool_choice", SKIP),
        Case("parallel_tool_calls:string", req(tools=[TOOL], parallel_tool_calls="false"), 400, t, "valid boolean",
             "parallel_tool_calls"),
        Case("tool_message:no_id", req(user("hi"), {"role": "assistant", "content": None, "tool_calls": [call]},
                                       {"role": "tool", "content": "sunny"}), 400, m, "tool_call_id", "messages[2]"),
        Case("tool_call:arguments_object", req(user("hi"), {"role": "assistant", "tool_calls": [
            {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}), 400, t, "valid string",
            "messages[1].tool_calls[0].function.arguments"),
        Case("tool_call:arguments_array", req(user("hi"), {"role": "assistant", "tool_calls": [
            {**call, "function": {"name": "get_weather", "arguments": "[1]"}}]}), 400, v, "JSON object",
            "messages[1].tool_calls[0].function.arguments"),
        Case("tool_call:not_list", req(user("hi"), {"role": "assistant", "tool_calls": call}), 400, t, "valid array",
             "messages[1].tool_calls"),
        Case("response_format:string", req(response_format="json"), 400, t, "response_format",
             "response_format"),
        Case("response_format:type", req(response_format={"type": "json"}), 400, v, "'json_schema'",
             "response_format.type"),
        Case("response_format:no_json_schema", req(response_format={"type": "json_schema"}), 400, m,
             "needs 'json_schema'", "response_format"),
        Case("response_format:no_name", req(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
             400, m, "name", "response_format.json_schema.name"),
        Case("response_format:schema_list", req(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": [1]}}), 400, t, "should be an object", "response_format.json_schema.schema"),
    ]
    # Valid JSON, but schemas xgrammar cannot compile: refused by the engine, naming the field.
    bad_schemas = {"unknown_type": {"type": "object", "properties": {"a": {"type": "strin"}}},
                   "dangling_ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                   "type_number": {"type": "object", "properties": {"a": {"type": 7}}}}
    for name, schema in bad_schemas.items():
        cases.append(Case(f"grammar:response_format:{name}", req(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}), 400, "invalid_schema",
            "cannot compile", "response_format.json_schema.schema", engine=True))
        tools = [TOOL, {"type": "function", "function": {"name": "bad", "parameters": schema}}]
        cases.append(Case(f"grammar:tools:{name}", req(tools=tools, tool_choice="required"), 400, "invalid_schema",
                          "cannot compile", "tools[1].function.parameters", engine=True))
    return cases


def build_corpus() -> list[Case]:
    # test_server_api's cases, but for the two that depend on its max_new_tokens (64, here 1024).
    handwritten = [Case(f"api:{name}", body, status, code, fragment, param)
                   for name, body, status, code, fragment, param in MALFORMED
                   if name not in ("max_tokens_huge", "max_completion_tokens_huge")]
    corpus = handwritten + wrong_types() + bad_json() + missing_fields() + roles_and_conversations() + images() \
        + numbers() + sizes() + tools_and_formats()
    names = [c.name for c in corpus]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    return corpus


CORPUS = build_corpus()


def problem(case: Case, reply) -> str | None:
    """What is wrong with the reply to a corpus case (None: it is right)."""
    if reply.status != case.status:
        return f"status {reply.status}, expected {case.status}: {reply.body[:300]!r}"
    if not reply.headers.get("content-type", "").startswith("application/json"):
        return f"content-type {reply.headers.get('content-type')}"
    body = reply.json()
    if list(body) != ["error"] or set(body["error"]) != {"message", "type", "param", "code"}:
        return f"not an OpenAI error body: {body}"
    err = body["error"]
    if not isinstance(err["message"], str) or len(err["message"]) < 20 or case.fragment not in err["message"]:
        return f"message {err['message']!r} lacks {case.fragment!r}"
    if err["type"] != "invalid_request_error":
        return f"type {err['type']!r}"
    if case.code is not None and err["code"] != case.code:
        return f"code {err['code']!r}, expected {case.code!r} ({err['message']})"
    if case.param is not SKIP and err["param"] != case.param:
        return f"param {err['param']!r}, expected {case.param!r} ({err['message']})"
    if reply.status == 400 and not case.engine and err["param"] and f"'{err['param']}'" not in err["message"]:
        return f"the message does not name the param {err['param']!r}: {err['message']}"
    return None


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(hardened_server):
    cfg = DeployConfig.model_validate(hardened_server.config)
    # The corpus's expectations are written against these.
    assert (cfg.served_model_name, cfg.server.max_body_bytes, cfg.limits.max_new_tokens, cfg.limits.max_prompt_tokens,
            cfg.limits.max_images_per_request, cfg.limits.max_image_pixels) == \
        (MODEL, MAX_BODY, MAX_NEW, MAX_PROMPT, MAX_IMAGES, 1_000_000)
    assert cfg.limits.max_n == MAX_N
    assert json.loads((demo_dir() / "config.json").read_text())["text_config"]["vocab_size"] == VOCAB
    return hardened_server


def greedy(server) -> dict:
    reply = post(server.base_url, req(user("Describe this picture."), max_tokens=16, temperature=0), key=server.api_key)
    assert reply.status == 200, reply.body
    out = answer(reply)
    (out.get("usage") or {}).pop("prompt_tokens_details", None)  # a repeated prompt continues its earlier prefill (cached_tokens)
    return out


def engine_counts(server) -> dict[str, float]:
    text = get(server.base_url, "/metrics").body.decode()
    return {o: metric(text, "dsqv_engine_requests_total", outcome=o) for o in ("completed", "rejected", "cancelled")}


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 200, len(CORPUS)
    assert {c.status for c in CORPUS} == {400, 404, 413}
    assert sum(c.engine for c in CORPUS) >= 5


def test_every_malformed_request_gets_the_right_4xx_and_the_server_is_unchanged(server):
    before = greedy(server)
    counts = engine_counts(server)
    problems, t0 = [], time.perf_counter()
    for case in CORPUS:
        reply = post(server.base_url, case.body, key=server.api_key, chunked=case.chunked, timeout=30)
        if (p := problem(case, reply)) is not None:
            problems.append(f"{case.name}: {p}")
    elapsed = time.perf_counter() - t0
    print(f"\n{len(CORPUS)} malformed requests answered in {elapsed:.1f} s")
    assert not problems, f"{len(problems)} of {len(CORPUS)} answered wrongly:\n" + "\n".join(problems)
    # Only the cases meant for the engine reached it, and none of them generated anything.
    after_counts = engine_counts(server)
    assert after_counts["rejected"] - counts["rejected"] == sum(c.engine for c in CORPUS)
    assert after_counts["completed"] == counts["completed"]
    assert greedy(server) == before


ODD_IMAGES = {**odd_valid_images(), "796x4": png(796, 4), "4x796_jpeg": jpeg(4, 796)}
del ODD_IMAGES["2000x4"], ODD_IMAGES["4x2000_jpeg"]  # beyond the processor's aspect-ratio limit (in the corpus)


@pytest.fixture(scope="module")
def processor():
    return load_processor(str(demo_dir()))  # the checkpoint the demo server serves


@pytest.mark.parametrize("name", ODD_IMAGES)
def test_odd_but_valid_images_are_seen_as_transformers_sees_them(server, processor, name):
    data = ODD_IMAGES[name]
    reply = post(server.base_url, req(user(with_image(data_url(data))), max_tokens=1, temperature=0),
                 key=server.api_key)
    assert reply.status == 200, reply.body
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image"}]}]
    expected = chat_inputs(processor, messages, [data])["input_ids"].shape[1]
    assert reply.json()["usage"]["prompt_tokens"] == expected


def test_generation_config_defaults_can_be_turned_off(server):
    """This server runs with sampling.generation_config_defaults false: an omitted temperature / top_p /
    top_k is OpenAI's (1, 1, off), not the checkpoint's (0.6, 0.95, 20)."""
    def text(seed: int, **kw) -> str:
        reply = post(server.base_url, req(user("Tell me a story."), max_tokens=8, seed=seed,
                                          chat_template_kwargs={"enable_thinking": False}, **kw), key=server.api_key)
        assert reply.status == 200, reply.body
        return reply.json()["choices"][0]["message"]["content"]

    seeds = range(4)
    omitted = [text(s) for s in seeds]
    assert omitted == [text(s, temperature=1.0, top_p=1.0, top_k=-1) for s in seeds]
    assert omitted != [text(s, temperature=0.6, top_p=0.95, top_k=20) for s in seeds]


# ---- fuzzing ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def mostly(valid, other=json_values):
    """A valid value 9 times in 10 (so that requests get deep into the server), else anything at all."""
    # (Not one_of(valid, ..., other): Hypothesis favours the ends of a range, so mid-range values pick.)
    return st.integers(0, 99).flatmap(lambda i: other if i % 10 == 3 else valid)


seed_images = [png(16, 16), jpeg(16, 16), encode(noise(16, 16).convert("P"), "GIF")]
image_bytes = st.one_of(  # valid images, odd ones too; damaged ones; random bytes
    st.sampled_from(list(odd_valid_images().values())),
    st.builds(lambda img, cut: img[:cut], st.sampled_from(seed_images), st.integers(0, 2000)),
    st.builds(lambda img, i, b: img[:i] + bytes([b]) + img[i + 1:],  # one byte changed
              st.sampled_from(seed_images), st.integers(0, 700), st.integers(0, 255)),
    st.builds(lambda img, i, junk: img[:i] + junk + img[i:],  # bytes inserted
              st.sampled_from(seed_images), st.integers(0, 700), st.binary(min_size=1, max_size=8)),
    st.binary(max_size=64))
image_urls = mostly(st.builds(data_url, image_bytes), st.text(max_size=40) | st.sampled_from(
    ["https://images.example/x.png", "data:image/png;base64,!!", "http://127.0.0.1/x.png", "data:image/png;base64,"]))
text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": mostly(st.text(max_size=40))})
image_parts = st.fixed_dictionaries({"type": st.just("image_url"),
                                     "image_url": mostly(st.fixed_dictionaries({"url": image_urls}), image_urls)})
turns = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["developer", "tool", "bot"])),
     "content": mostly(st.text(max_size=40) | st.lists(text_parts, min_size=1, max_size=2))})
# The last turn is the user's: some text and up to two images (the server's limit), or anything.
last_turns = st.fixed_dictionaries({"role": st.just("user"), "content": mostly(
    st.tuples(text_parts, st.integers(0, 2).flatmap(lambda n: st.lists(image_parts, min_size=n, max_size=n)))
    .map(lambda t: [t[0], *t[1]]))})
chat_requests = st.fixed_dictionaries(
    # max_tokens is always small or invalid: a long generation would only slow the run down.
    {"model": mostly(st.just(MODEL)),
     "messages": mostly(st.tuples(st.lists(turns, max_size=2), last_turns).map(lambda t: [*t[0], t[1]])),
     "max_tokens": mostly(st.integers(1, 3), st.integers(-2, 0) | st.sampled_from(["3", 2.5, True, [], {}, None]))
                   .filter(lambda v: v is not None)},
    optional={"temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0.01, 1)),
              "top_k": mostly(st.integers(-1, 50)), "seed": mostly(st.integers(0, 2**63 - 1)),
              "stop": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=4) | st.text(min_size=1, max_size=3)),
              "stream": mostly(st.booleans()), "n": mostly(st.integers(1, 2)), "user": mostly(st.text(max_size=10)),
              "chat_template_kwargs": mostly(st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()})),
              "logprobs": mostly(st.booleans()), "top_logprobs": mostly(st.integers(0, 20)),
              "presence_penalty": mostly(st.floats(-2, 2)), "frequency_penalty": mostly(st.floats(-2, 2)),
              "repetition_penalty": mostly(st.floats(0.01, 3)), "min_p": mostly(st.floats(0, 1)),
              "stop_token_ids": mostly(st.lists(st.integers(0, 2 * VOCAB), max_size=3)),
              "tools": mostly(st.just([]))})
FUZZ = {"deadline": None, "derandomize": True, "database": None,  # the same examples on every run
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}


def assert_no_server_error(server, body: bytes):
    reply = post(server.base_url, body, key=server.api_key, timeout=30)
    assert reply.status in (200, 400, 404, 413), (reply.status, reply.body[:300], body[:300])
    if reply.status == 200:
        if reply.headers["content-type"].startswith("text/event-stream"):
            assert not any("error" in e for e in reply.sse() if e != "[DONE]"), reply.body[-300:]
        else:
            assert reply.json()["object"] == "chat.completion"
    else:
        err = reply.error
        assert isinstance(err["message"], str) and len(err["message"]) >= 20, err


@settings(max_examples=100, **FUZZ)
@given(body=mostly(chat_requests.map(lambda r: json.dumps(r).encode()), st.binary(max_size=200)))
def test_fuzzing_requests_never_gets_a_server_error(server, body):
    assert_no_server_error(server, body)


@settings(max_examples=40, **FUZZ)
@given(images=st.lists(image_bytes, min_size=1, max_size=2))
def test_fuzzing_images_never_gets_a_server_error(server, images):
    parts = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
    assert_no_server_error(server, json.dumps(req(user([{"type": "text", "text": "what?"}, *parts]))).encode())


def test_still_healthy_after_the_fuzzing(server):
    reply = get(server.base_url, "/health")
    assert reply.status == 200 and reply.json()["engine"]["in_flight"] == 0


# ---- access ------------------------------------------------------------------------------------


def test_the_api_key_is_required_and_checked(server):
    base, key = server.base_url, server.api_key
    body = req(max_tokens=1, temperature=0)
    for headers, fragment in [({}, "Missing API key"), ({"Authorization": "Bearer sk-wrong"}, "Incorrect API key"),
                              ({"Authorization": f"Bearer {key}x"}, "Incorrect API key"),
                              ({"Authorization": f"Bearer {key[:-1]}"}, "Incorrect API key"),
                              ({"Authorization": f"Basic {key}"}, "Missing API key"),
                              ({"Authorization": f"bearer{key}"}, "Missing API key"),
                              ({"Authorization": "Bearer \u00e9t\u00e9"}, "Incorrect API key")]:
        reply = post(base, body, headers=headers)
        assert reply.status == 401 and reply.error["code"] == "invalid_api_key", (headers, reply.body)
        assert fragment in reply.error["message"] and reply.headers["www-authenticate"] == "Bearer"
    assert get(base, "/v1/models").status == 401
    assert get(base, "/no/such/route").status == 401  # routes do not reveal themselves without the key
    assert post(base, body, key=key).status == 200
    assert post(base, body, headers={"Authorization": f"bearer   {key}  "}).status == 200  # scheme is case-free
    # Probes and scrapers need no key.
    assert get(base, "/health").status == 200 and get(base, "/metrics").status == 200


def front_processes(server) -> tuple[psutil.Process, list[psutil.Process]]:
    """The gunicorn master under launch.sh, and its workers."""
    masters = [p for p in psutil.Process(server.proc.pid).children() if "gunicorn" in " ".join(p.cmdline())]
    assert len(masters) == 1
    return masters[0], masters[0].children()


def test_binds_to_loopback_only(server):
    assert DeployConfig().server.host == "127.0.0.1"  # the default, unless configured
    master, _ = front_processes(server)
    listening = [c.laddr for c in master.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" and a.port == server.port for a in listening), listening
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, server.port), timeout=2).close()


def test_remote_image_urls_are_never_fetched(server):
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png())

        def log_message(self, *args):
            pass

    bait = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=bait.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{bait.server_address[1]}/cat.png"
        with urllib.request.urlopen(url, timeout=5) as r:  # the bait works
            assert r.status == 200
        hits.clear()
        for image_url, code in [(url, "invalid_image_url"), (url.replace("http", "https"), "invalid_image_url"),
                                ("https://images.example/cat.png", "unsupported_image_url")]:
            reply = post(server.base_url, req(user(with_image(image_url))), key=server.api_key)
            assert reply.status == 400 and reply.error["code"] == code, reply.body
        time.sleep(0.5)
        assert hits == []
    finally:
        bait.shutdown()
        bait.server_close()


def test_limits_are_enforced_before_the_image_is_decoded(server):
    _, workers = front_processes(server)
    rss_before = sum(w.memory_info().rss for w in workers)
    bomb = bomb_png(20000, 20000)  # 400 M pixels (400 MB decoded) in ~50 KB
    assert len(bomb) < 100_000
    for _ in range(3):
        reply = post(server.base_url, req(user(with_image(data_url(bomb)))), key=server.api_key)
        assert reply.status == 413 and reply.error["code"] == "image_too_large", reply.body
        assert reply.seconds < 2.0, reply.seconds  # decoding it would take seconds
    assert sum(w.memory_info().rss for w in workers) - rss_before < 100 * 2**20
    # The body limit holds whether or not the client says how long the body is.
    big = req(user("x" * (MAX_BODY + 1)))
    for chunked in (False, True):
        reply = post(server.base_url, big, key=server.api_key, chunked=chunked)
        assert reply.status == 413 and reply.error["code"] == "request_too_large", (chunked, reply.body)
