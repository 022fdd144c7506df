"""The real server, end to end: ``launch.sh`` starts two CPU ranks at tp=2 under the deepspeed
launcher and the gunicorn front, on the demo checkpoint, once for this module; the official
``openai`` client (and plain ``requests`` where it cannot say what we need: raw bytes, other
methods, the SSE framing) drives it.

Every greedy answer is checked against single-process transformers on the same checkpoint
(`Reference`), so the tensor-parallel ranks, the engine's sampling, the incremental detokenizer
and the reasoning split are all measured against ground truth, not against themselves.  The
random weights produce gibberish: prompts with the properties a test needs (a ``</think>`` in
the output, a multi-byte character) are picked from a fixed list by the reference model, and the
property is asserted so that the test cannot silently lose its point.
"""
from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from server_fixture import start_server
from test_protocol import encode, noise, png

from ds_qwen_vision.checkpoint import demo_dir
from ds_qwen_vision.config import DEMO_SERVED_NAME
from ds_qwen_vision.model import chat_inputs, load_processor

MODEL = DEMO_SERVED_NAME
MAX_PROMPT_TOKENS = 512
MAX_NEW_TOKENS = 64
MAX_IMAGES = 3
MAX_IMAGE_PIXELS = 1_000_000
MAX_BODY = 300_000
CONFIG = {
    "server": {"max_body_bytes": MAX_BODY},
    "limits": {"max_prompt_tokens": MAX_PROMPT_TOKENS, "max_new_tokens": MAX_NEW_TOKENS,
               "max_images_per_request": MAX_IMAGES, "max_image_pixels": MAX_IMAGE_PIXELS},
}
N = 12  # max_tokens of most requests: long enough for gibberish with a few multi-byte characters
NO_THINKING = {"enable_thinking": False}
REPLACEMENT = "\ufffd"


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def user(content) -> dict:
    return {"role": "user", "content": content}


IMG_A = png(64, 48)       # upscaled to the processor's minimum: 64 image tokens
IMG_B = png(160, 100)     # another grid
IMG_C = encode(noise(40, 96, seed=3), "PNG")

CASES = {
    "text": [{"role": "system", "content": "You are a helpful assistant."}, user("Tell me about the weather.")],
    # An earlier answer with its reasoning in the content: the template drops it from the history.
    "text_multi_turn": [user("Hi!"), {"role": "assistant", "content": "The user greets me.</think>\n\nHello!"},
                        user("What is 12 plus 30?")],
    "one_image": [user([text("Describe the image."), image(IMG_A)])],
    # Several images in one message and across turns, an assistant turn, a system message.
    "images_multi_turn": [
        {"role": "system", "content": "Answer briefly."},
        user([image(IMG_A), text("What is shown in the picture?")]),
        {"role": "assistant", "content": "A cat is sleeping on the window sill."},
        user([text("And these two?"), image(IMG_B), image(IMG_C)]),
    ],
}
N_IMAGES = {"text": 0, "text_multi_turn": 0, "one_image": 1, "images_multi_turn": 3}


def hf_messages(messages: list[dict]) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> transformers' chat format (+ the image bytes in order), done independently
    of the server's protocol module."""
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image_url":
                    images.append(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out, images


# ---------------------------------------------------------------------------------------------
# Fixtures: the server, the clients, the single-process reference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    # Short: the IPC socket lives here and a Unix socket path must fit in 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="dsqv-e2e-", dir="/tmp"))
    try:
        srv = start_server(workdir, CONFIG)  # a failure to start raises with the log's tail
        try:
            yield srv
        finally:
            srv.stop()  # SIGTERM: launch.sh drains and exits 0 (asserted, with the log's tail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.base_url


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


class Reference:
    """Single-process transformers on the demo checkpoint: the ground truth for greedy answers."""

    def __init__(self, model_dir: str):
        from transformers import Qwen3_5ForConditionalGeneration

        self.model = Qwen3_5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = load_processor(model_dir)
        self._cache: dict[str, tuple[int, list[int], str]] = {}

    def inputs(self, messages: list[dict], template_kwargs: dict | None = None) -> dict:
        msgs, images = hf_messages(messages)
        return chat_inputs(self.processor, msgs, images, template_kwargs)

    def generate(self, messages: list[dict], max_tokens: int = N, template_kwargs: dict | None = None):
        """(prompt tokens, new token ids, their text decoded with special tokens skipped)."""
        key = json.dumps([messages, max_tokens, template_kwargs])
        if key not in self._cache:
            inputs = self.inputs(messages, template_kwargs)
            with torch.inference_mode():
                out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
            n_prompt = inputs["input_ids"].shape[1]
            new = out[0, n_prompt:].tolist()
            self._cache[key] = (n_prompt, new, self.processor.tokenizer.decode(new, skip_special_tokens=True))
        return self._cache[key]


@pytest.fixture(scope="module")
def ref(server) -> Reference:
    return Reference(str(demo_dir()))  # built by launch.sh, hence after `server`


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = N, template_kwargs: dict | None = None,
          extra_body: dict | None = None, **kw):
    extra_body = {"chat_template_kwargs": template_kwargs or {}, **(extra_body or {})}
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          extra_body=extra_body, **kw)


def greedy(client, messages, max_tokens: int = N, template_kwargs: dict | None = None, **kw):
    return chat(client, messages, max_tokens, template_kwargs, temperature=0, **kw)


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


def split_thinking(decoded: str) -> tuple[str, str]:
    """What the server must answer for a thinking-on generation decoded in one piece: reasoning is
    the text before the first </think>; the blank lines the model puts after the tag are dropped."""
    if "</think>" not in decoded:
        return decoded, ""
    reasoning, content = decoded.split("</think>", 1)
    return reasoning, content.lstrip("\n")


# Prompts for the properties a test needs; the first one that has it (per the reference) is used.
# (Ordered so that, with today's demo checkpoint, the first one or two have them all.)
CANDIDATES = ["What is the capital of France?", "How many legs does a spider have?", "Describe the image.", "Hello",
              "你好，世界！", "Tell me a story.", "café crème", "Weather report:"]


def has_multibyte(s: str) -> bool:
    return any(ord(ch) > 127 and ch != REPLACEMENT for ch in s)


@pytest.fixture(scope="module")
def thinking_prompt(ref) -> list[dict]:
    """A prompt whose greedy thinking-on output closes its thinking block within N tokens, with
    reasoning before the tag and content after it (and non-ASCII text: the hardest stream)."""
    for prompt in CANDIDATES:
        messages = [user(prompt)]
        decoded = ref.generate(messages)[2]
        reasoning, content = split_thinking(decoded)
        if "</think>" in decoded and reasoning.strip() and content.strip() and has_multibyte(decoded):
            return messages
    pytest.fail("no candidate prompt closes its thinking block within N tokens; extend CANDIDATES")


@pytest.fixture(scope="module")
def multibyte_prompt(ref) -> list[dict]:
    """A prompt whose greedy thinking-off output holds a real multi-byte character."""
    for prompt in CANDIDATES:
        messages = [user(prompt)]
        if has_multibyte(ref.generate(messages, template_kwargs=NO_THINKING)[2]):
            return messages
    pytest.fail("no candidate prompt yields a multi-byte character; extend CANDIDATES")


# ---------------------------------------------------------------------------------------------
# Models, health
# ---------------------------------------------------------------------------------------------


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_health_reports_every_rank(base):
    r = requests.get(f"{base}/health", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["engine"]["ready"] is True and body["engine"]["alive"] is True
    ranks = body["engine"]["ranks"]
    assert sorted(rank["rank"] for rank in ranks) == [0, 1]  # tp=2
    for rank in ranks:
        assert rank["ready"] is True and rank["device"] == "cpu"
        assert isinstance(rank["rss_bytes"], int) and rank["rss_bytes"] > 50 * 2**20, rank  # a loaded model


# ---------------------------------------------------------------------------------------------
# Greedy answers = single-process transformers; usage = the checkpoint's own processor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(client, ref, case):
    messages = CASES[case]
    resp = greedy(client, messages, template_kwargs=NO_THINKING)
    n_prompt, new, decoded = ref.generate(messages, template_kwargs=NO_THINKING)
    choice = resp.choices[0]
    assert decoded.strip(), "the reference generated no visible text: the comparison would be empty"
    assert choice.message.content == decoded
    assert reasoning_of(choice.message) is None  # thinking off: nothing goes to reasoning_content
    # usage: the checkpoint's processor counts image placeholders expanded to their patch tokens.
    ids = ref.inputs(messages, NO_THINKING)["input_ids"][0]
    image_tokens = int((ids == ref.model.config.image_token_id).sum())
    assert (image_tokens >= 64 * N_IMAGES[case]) and (image_tokens > 0) == (N_IMAGES[case] > 0)
    assert resp.usage.prompt_tokens == n_prompt == len(ids)
    eos = new[-1] in ref.model.generation_config.eos_token_id
    assert resp.usage.completion_tokens == len(new)
    assert resp.usage.total_tokens == n_prompt + len(new)
    assert choice.finish_reason == ("stop" if eos else "length")


def test_thinking_split_matches_transformers(client, ref, thinking_prompt):
    resp = greedy(client, thinking_prompt)  # default template: thinking on
    reasoning, content = split_thinking(ref.generate(thinking_prompt)[2])
    message = resp.choices[0].message
    assert reasoning_of(message) == reasoning and message.content == content
    # ... and with thinking off the same request is all content.
    off = greedy(client, thinking_prompt, template_kwargs=NO_THINKING).choices[0].message
    assert off.content == ref.generate(thinking_prompt, template_kwargs=NO_THINKING)[2] != ""
    assert reasoning_of(off) is None


def test_default_is_thinking(client, ref):
    """Without chat_template_kwargs the template opens a thinking block: the output is reasoning
    until the model closes it."""
    messages = CASES["one_image"]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0)
    reasoning, content = split_thinking(ref.generate(messages)[2])
    assert reasoning and reasoning_of(resp.choices[0].message) == reasoning
    assert resp.choices[0].message.content == content


def test_max_tokens_is_length(client, ref):
    messages = CASES["text"]
    _, new, decoded = ref.generate(messages, max_tokens=5, template_kwargs=NO_THINKING)
    assert len(new) == 5 and new[-1] not in ref.model.generation_config.eos_token_id
    resp = greedy(client, messages, max_tokens=5, template_kwargs=NO_THINKING)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    assert resp.choices[0].message.content == decoded
    # max_completion_tokens is the same limit under its new name.
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0,
                                          extra_body={"chat_template_kwargs": NO_THINKING})
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def sse(base: str, body: dict) -> list:
    """The data payloads of a streamed response, JSON-decoded, the final [DONE] as is."""
    r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    payload = r.content.decode("utf-8")
    assert payload.endswith("data: [DONE]\n\n"), payload[-300:]
    frames = payload.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


@pytest.mark.parametrize("which", ["thinking", "multibyte"])
def test_stream_equals_non_stream(client, base, ref, request, which):
    if which == "thinking":
        messages, kwargs = request.getfixturevalue("thinking_prompt"), {}
        reasoning, content = split_thinking(ref.generate(messages)[2])
    else:
        messages, kwargs = request.getfixturevalue("multibyte_prompt"), NO_THINKING
        reasoning, content = "", ref.generate(messages, template_kwargs=kwargs)[2]
    assert has_multibyte(reasoning + content), "the stream has no multi-byte character to split"
    full = greedy(client, messages, template_kwargs=kwargs)

    # The openai client: deltas, a finish_reason, then a usage chunk without choices.
    chunks = list(chat(client, messages, template_kwargs=kwargs, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                                 for c in chunks if c.choices)
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    assert (reasoning_of(full.choices[0].message) or "", full.choices[0].message.content) == (reasoning, content)
    texts = [c for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].delta.model_extra)]
    assert len(texts) > 1  # streamed piece by piece, not in one lump
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])

    # The wire: the same, every chunk with "usage": null, then [DONE].
    events = sse(base, {"model": MODEL, "messages": messages, "max_tokens": N, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, "chat_template_kwargs": kwargs})
    assert events[-1] == "[DONE]"
    *deltas, usage_chunk, _ = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full.usage.model_dump(exclude_none=True)
    assert all("usage" in e and e["usage"] is None for e in deltas)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in deltas) == content
    assert "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for e in deltas) == reasoning
    assert len({e["id"] for e in events[:-1]}) == 1


@pytest.fixture(scope="module")
def split_character(ref) -> tuple[list[dict], int]:
    """A prompt and a max_tokens that end its greedy thinking-off output in the middle of a
    multi-byte character: one the next token would have completed."""
    decode = ref.processor.tokenizer.decode
    for prompt in CANDIDATES:
        messages = [user(prompt)]
        new = ref.generate(messages, 24, NO_THINKING)[1]
        texts = [decode(new[:k], skip_special_tokens=True) for k in range(len(new) + 1)]
        for k in range(2, len(new)):
            cut, more = texts[k], texts[k + 1]
            if cut.endswith(REPLACEMENT) and len(more) >= len(cut) and more[len(cut) - 1] != REPLACEMENT:
                return messages, k
    pytest.fail("no candidate output splits a character across tokens; extend CANDIDATES")


def test_output_cut_inside_a_character(client, base, ref, split_character):
    """Generation that ends (max_tokens) between the bytes of a character: the answer is still the
    whole decoded output, with the incomplete character as U+FFFD like a plain decode, streamed or not."""
    messages, k = split_character
    expected = ref.generate(messages, k, NO_THINKING)[2]
    assert expected.endswith(REPLACEMENT)
    resp = greedy(client, messages, k, NO_THINKING)
    assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "length"
    chunks = list(chat(client, messages, k, NO_THINKING, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# ---------------------------------------------------------------------------------------------
# Stop strings, seeds
# ---------------------------------------------------------------------------------------------


def test_stop_strings(client, ref):
    messages = CASES["text"]
    unstopped = greedy(client, messages, max_tokens=24, template_kwargs=NO_THINKING)
    full = unstopped.choices[0].message.content
    assert full == ref.generate(messages, max_tokens=24, template_kwargs=NO_THINKING)[2]

    def first_at(s: str, start: int) -> bool:
        return REPLACEMENT not in s and not s.isspace() and full.find(s) == start

    # A string: a 3-character piece from the middle, at its first occurrence.
    mid = next((i for i in range(len(full) // 3, len(full) - 3) if first_at(full[i:i + 3], i)), None)
    assert mid is not None, f"no usable stop string in {full!r}"
    resp = greedy(client, messages, max_tokens=24, template_kwargs=NO_THINKING, stop=full[mid:mid + 3])
    assert resp.choices[0].message.content == full[:mid] and full.startswith(resp.choices[0].message.content)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < unstopped.usage.completion_tokens

    # A list: two stop strings that end at the same character complete at the same token; the
    # earlier one wins whatever the list order (["b", "ab"] must cut before "a").
    at = next((i for i in range(1, len(full) - 2) if first_at(full[i:i + 2], i) and first_at(full[i + 1], i + 1)),
              None)
    assert at is not None, f"no usable pair of stop strings in {full!r}"
    resp = greedy(client, messages, max_tokens=24, template_kwargs=NO_THINKING,
                  stop=[full[at + 1], "never appears \u2603", full[at:at + 2]])
    assert resp.choices[0].message.content == full[:at]
    assert resp.choices[0].finish_reason == "stop"

    # Streaming stops at the same place.
    chunks = list(chat(client, messages, 24, NO_THINKING, temperature=0, stream=True, stop=[full[mid:mid + 3]]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[:mid]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_seeds(client):
    messages = [user("Tell me a story.")]

    def sample(seed: int) -> str:
        resp = chat(client, messages, 8, NO_THINKING, temperature=0.8, seed=seed)
        assert resp.usage.completion_tokens > 0
        return resp.choices[0].message.content

    first = sample(1234)
    assert first and sample(1234) == first  # same seed, same text
    others = {sample(seed) for seed in (1, 2, 3, 4)}
    assert len(others | {first}) >= 3  # different seeds: different samples (8 tokens at T=0.8)


def test_tiny_temperature_is_greedy_and_harmless(client, base):
    """Any temperature > 0 is valid, however small: in effect greedy, and never a NaN distribution
    (which fails the engine, and every request in it, for good)."""
    messages = CASES["text"]
    expected = greedy(client, messages, 6, NO_THINKING).choices[0].message.content
    for temperature in (1e-300, 1e-40, 1e-6):
        resp = chat(client, messages, 6, NO_THINKING, temperature=temperature, seed=1, top_p=0.5,
                    extra_body={"top_k": 5})
        assert resp.choices[0].message.content == expected, temperature
    assert requests.get(f"{base}/health", timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------------
# Malformed requests against the real server
# ---------------------------------------------------------------------------------------------

THIN = png(1, 300)  # valid PNG, but an aspect ratio the image processor refuses (> 200)
FLAT_OVER_LIMIT = encode(Image.new("L", (1001, 1000)), "PNG")  # ~1 KB, 1001000 pixels


def body(*messages, **fields) -> dict:
    out = {"model": MODEL, "messages": list(messages) or [user("hi")], "max_tokens": 4}
    out.update(fields)
    return out


# (id, method, path, body: dict -> JSON, bytes -> raw, None -> none; status, code or None)
MALFORMED = [
    ("invalid_json", "POST", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_json"),
    ("empty_body", "POST", "/v1/chat/completions", b"", 400, "invalid_json"),
    ("bad_utf8", "POST", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400, "invalid_json"),
    ("json_array", "POST", "/v1/chat/completions", b"[]", 400, "invalid_type"),
    ("missing_model", "POST", "/v1/chat/completions", {"messages": [user("hi")]}, 400, "missing_required_parameter"),
    ("missing_messages", "POST", "/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("model_not_string", "POST", "/v1/chat/completions", body(model=5), 400, "invalid_type"),
    ("unknown_model", "POST", "/v1/chat/completions", body(model="gpt-4o"), 404, "model_not_found"),
    ("messages_not_list", "POST", "/v1/chat/completions", body(messages="hi"), 400, "invalid_type"),
    ("empty_messages", "POST", "/v1/chat/completions", body(messages=[]), 400, "invalid_value"),
    ("unknown_role", "POST", "/v1/chat/completions", body({"role": "bot", "content": "hi"}), 400, "invalid_role"),
    ("tool_message_without_tool_call_id", "POST", "/v1/chat/completions",
     body(user("hi"), {"role": "tool", "content": "x"}), 400, "missing_required_parameter"),
    ("content_number", "POST", "/v1/chat/completions", body(user(7)), 400, "invalid_type"),
    ("content_part_audio", "POST", "/v1/chat/completions", body(user([{"type": "input_audio"}])), 400,
     "unsupported_content"),
    ("system_not_first", "POST", "/v1/chat/completions", body(user("hi"), {"role": "system", "content": "x"}), 400,
     "invalid_value"),
    ("no_user_message", "POST", "/v1/chat/completions", body({"role": "system", "content": "x"}), 400,
     "invalid_value"),
    ("image_in_system", "POST", "/v1/chat/completions",
     body({"role": "system", "content": [image(IMG_A)]}, user("hi")), 400, "invalid_value"),
    ("bad_base64", "POST", "/v1/chat/completions",
     body(user([text("x"), {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO$$=="}}])), 400,
     "invalid_base64"),
    ("non_image_bytes", "POST", "/v1/chat/completions",
     body(user([text("x"), {"type": "image_url", "image_url": {"url": data_url(b"plain text, not a picture")}}])),
     400, "invalid_image"),
    ("truncated_png", "POST", "/v1/chat/completions", body(user([text("x"), image(png(64, 64)[:600])])), 400,
     "invalid_image"),
    ("remote_image_url", "POST", "/v1/chat/completions",
     body(user([text("x"), {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}])), 400,
     "invalid_image_url"),
    ("too_many_images", "POST", "/v1/chat/completions", body(user([image(IMG_A)] * (MAX_IMAGES + 1))), 400,
     "too_many_images"),
    ("image_too_many_pixels", "POST", "/v1/chat/completions", body(user([image(FLAT_OVER_LIMIT)])), 413,
     "image_too_large"),
    # Passes the front's checks; the checkpoint's image processor refuses it (before any rank sees it).
    ("image_aspect_ratio", "POST", "/v1/chat/completions", body(user([text("x"), image(THIN)])), 400, "invalid_image"),
    ("max_tokens_zero", "POST", "/v1/chat/completions", body(max_tokens=0), 400, "invalid_value"),
    ("max_tokens_negative", "POST", "/v1/chat/completions", body(max_tokens=-3), 400, "invalid_value"),
    ("max_tokens_huge", "POST", "/v1/chat/completions", body(max_tokens=10**12), 400, "invalid_value"),
    ("max_tokens_over_limit", "POST", "/v1/chat/completions", body(max_tokens=MAX_NEW_TOKENS + 1), 400,
     "invalid_value"),
    ("max_tokens_string", "POST", "/v1/chat/completions", body(max_tokens="4"), 400, "invalid_type"),
    ("temperature_too_high", "POST", "/v1/chat/completions", body(temperature=2.5), 400, "invalid_value"),
    ("temperature_negative", "POST", "/v1/chat/completions", body(temperature=-0.5), 400, "invalid_value"),
    ("top_p_zero", "POST", "/v1/chat/completions", body(top_p=0), 400, "invalid_value"),
    ("top_p_too_high", "POST", "/v1/chat/completions", body(top_p=1.01), 400, "invalid_value"),
    ("n_over_limit", "POST", "/v1/chat/completions", body(n=5), 400, "invalid_value"),
    ("top_logprobs_too_many", "POST", "/v1/chat/completions", body(logprobs=True, top_logprobs=21), 400,
     "invalid_value"),
    ("presence_penalty_too_high", "POST", "/v1/chat/completions", body(presence_penalty=2.5), 400, "invalid_value"),
    ("stop_token_ids_past_vocab", "POST", "/v1/chat/completions", body(stop_token_ids=[10**6]), 400,
     "invalid_value"),
    ("seed_too_big", "POST", "/v1/chat/completions", body(seed=2**64), 400, "invalid_value"),
    ("stop_too_many", "POST", "/v1/chat/completions", body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    ("stream_options_without_stream", "POST", "/v1/chat/completions",
     body(stream_options={"include_usage": True}), 400, "invalid_value"),
    ("tool_choice_without_tools", "POST", "/v1/chat/completions", body(tool_choice="required"), 400,
     "invalid_value"),
    ("template_kwargs_reserved", "POST", "/v1/chat/completions",
     body(chat_template_kwargs={"tokenize": True}), 400, "invalid_value"),
    ("prompt_too_long", "POST", "/v1/chat/completions", body(user("hello " * (MAX_PROMPT_TOKENS + 10))), 400,
     "context_length_exceeded"),
    ("prompt_too_long_streaming", "POST", "/v1/chat/completions",
     body(user("hello " * (MAX_PROMPT_TOKENS + 10)), stream=True), 400, "context_length_exceeded"),
    ("body_too_large", "POST", "/v1/chat/completions", body(user("x" * MAX_BODY)), 413, "request_too_large"),
    ("get_completions", "GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("post_models", "POST", "/v1/models", body(), 405, "method_not_allowed"),
    ("delete_health", "DELETE", "/health", None, 405, "method_not_allowed"),
    ("unknown_route", "GET", "/v1/completions/nope", None, 404, "not_found"),
    ("unknown_model_card", "GET", "/v1/models/gpt-4o", None, 404, "model_not_found"),
]


def chunked(data: bytes, size: int = 64 * 1024):
    """A generator body: requests sends it with Transfer-Encoding: chunked, no Content-Length."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def assert_openai_error(r: requests.Response, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"] == "application/json", r.headers
    payload = r.json()
    assert list(payload) == ["error"] and set(payload["error"]) == {"message", "type", "param", "code"}, payload
    err = payload["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 15, err
    assert err["type"] == "invalid_request_error", err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_malformed_requests_leave_the_server_as_it_was(client, base, ref):
    assert len(MALFORMED) >= 30
    messages = CASES["one_image"]
    before = greedy(client, messages, template_kwargs=NO_THINKING).choices[0].message.content
    assert before == ref.generate(messages, template_kwargs=NO_THINKING)[2]

    for name, method, path, payload, status, code in MALFORMED:
        kw = {"data": payload, "headers": {"Content-Type": "application/json"}} if isinstance(payload, bytes) \
            else {"json": payload} if payload is not None else {}
        # A fresh connection each: after a refused large body gunicorn closes the connection.
        with requests.Session() as s:
            r = s.request(method, base + path, timeout=60, **kw)
        try:
            err = assert_openai_error(r, status, code)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        if name.startswith("prompt_too_long"):
            assert err["param"] == "messages" and str(MAX_PROMPT_TOKENS) in err["message"], err

    # A chunked body has no Content-Length: over the limit it is still a 413, not truncated JSON.
    big = json.dumps(body(user("x" * MAX_BODY))).encode()
    r = requests.post(f"{base}/v1/chat/completions", data=chunked(big), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, "request_too_large")
    small = json.dumps(body(user("hi"), max_tokens=2, temperature=0)).encode()
    r = requests.post(f"{base}/v1/chat/completions", data=chunked(small, 7), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text

    # The openai client sees typed errors with the OpenAI fields.
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [user("hello " * (MAX_PROMPT_TOKENS + 10))], temperature=0)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])

    # Still serving, every rank ready, and the same answer as before the corpus.
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    assert greedy(client, messages, template_kwargs=NO_THINKING).choices[0].message.content == before


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    r = requests.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics(client, base):
    def front(m: dict, status: str) -> float:
        return m.get(("dsqv_front_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"),
                                                    ("status", status))), 0.0)

    before = scrape(base)
    for name in ("dsqv_queue_depth", "dsqv_in_flight"):
        assert before[(name, ())] == 0.0  # idle
    resp = greedy(client, [user("Count to three.")], max_tokens=6, template_kwargs=NO_THINKING)
    with pytest.raises(openai.BadRequestError):
        greedy(client, [user("hi")], max_tokens=MAX_NEW_TOKENS + 1)
    after = scrape(base)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert delta[("dsqv_generated_tokens_total", ())] == resp.usage.completion_tokens
    assert delta[("dsqv_time_to_first_token_seconds_count", ())] == 1
    assert 0 < delta[("dsqv_time_to_first_token_seconds_sum", ())] < 30
    assert delta[("dsqv_inter_token_seconds_count", ())] == resp.usage.completion_tokens - 1 > 0
    assert 0 < delta[("dsqv_inter_token_seconds_sum", ())] < 30
    assert delta[("dsqv_engine_requests_total", (("outcome", "completed"),))] == 1
    assert front(after, "200") - front(before, "200") == 1
    assert front(after, "400") - front(before, "400") == 1
    for name in ("dsqv_queue_depth", "dsqv_in_flight"):
        assert (name, ()) in after


def test_client_disconnect_cancels_the_request(base):
    """A streaming client that goes away frees its sequence at once instead of generating to the end."""
    before = scrape(base)
    body = {"model": MODEL, "messages": [user("Tell me a story.")], "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
            "stream": True, "chat_template_kwargs": NO_THINKING}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)][2].startswith(b"data: ")  # role chunk, blank, first delta
    deadline = time.monotonic() + 10
    while requests.get(f"{base}/health", timeout=30).json()["engine"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = scrape(base)
    outcome = {o: after.get(("dsqv_engine_requests_total", (("outcome", o),)), 0.0)
               - before.get(("dsqv_engine_requests_total", (("outcome", o),)), 0.0) for o in ("cancelled", "completed")}
    assert outcome == {"cancelled": 1, "completed": 0}
    assert after[("dsqv_generated_tokens_total", ())] - before[("dsqv_generated_tokens_total", ())] < MAX_NEW_TOKENS


# ---------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------


def test_concurrent_requests_answer_as_sequential(client, ref):
    requests_ = [(CASES["text"], NO_THINKING), (CASES["one_image"], NO_THINKING), ([user("Hello")], {}),
                 (CASES["images_multi_turn"], {})]

    def ask(messages, kwargs):
        resp = greedy(client, messages, template_kwargs=kwargs)
        u = resp.usage  # cached_tokens left out: the second time round the prompts continue the first's
        return reasoning_of(resp.choices[0].message) or "", resp.choices[0].message.content, \
            (u.prompt_tokens, u.completion_tokens, u.total_tokens), u.prompt_tokens_details.cached_tokens

    sequential = [ask(m, k) for m, k in requests_]
    assert len({s[:2] for s in sequential}) == len(requests_)  # four different answers
    for (messages, kwargs), (reasoning, content, *_) in zip(requests_, sequential, strict=True):
        expected = ref.generate(messages, template_kwargs=kwargs)[2]
        assert (reasoning, content) == (split_thinking(expected) if kwargs == {} else ("", expected))

    barrier = threading.Barrier(len(requests_))

    def together(messages, kwargs):
        barrier.wait(timeout=60)  # all four in flight at once
        return ask(messages, kwargs)

    with ThreadPoolExecutor(len(requests_)) as pool:
        concurrent = list(pool.map(lambda r: together(*r), requests_))
    assert [c[:3] for c in concurrent] == [s[:3] for s in sequential]
    assert all(c[3] > 0 for c in concurrent)  # each prompt was held from its sequential run


# ---------------------------------------------------------------------------------------------
# Sampling parameters and logprobs (against transformers; the checkpoint's generation_config)
# ---------------------------------------------------------------------------------------------

LOGPROB_TOL = 1e-4


def raw_logprobs(ref: Reference, messages: list[dict], new: list[int], template_kwargs: dict | None = None):
    """log_softmax of transformers' logits at each generated position: [len(new), V]."""
    inputs = ref.inputs(messages, template_kwargs)
    n_prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([new[:-1]], dtype=torch.long)], dim=1)
    with torch.inference_mode():
        logits = ref.model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0]
    return torch.log_softmax(logits[n_prompt - 1:].double(), dim=-1)


def assert_logprobs_match(entries, expected, new: list[int], k: int) -> None:
    assert len(entries) == len(new)
    for entry, row, token in zip(entries, expected, new):
        assert abs(entry.logprob - float(row[token])) < LOGPROB_TOL
        top = row.topk(k)
        assert len(entry.top_logprobs) == k
        got = [t.logprob for t in entry.top_logprobs]
        assert max(abs(a - float(b)) for a, b in zip(got, top.values)) < LOGPROB_TOL, (got, top.values)
        assert got == sorted(got, reverse=True)


def test_logprobs_match_transformers(client, ref, multibyte_prompt):
    """Every generated token's logprob and its top 5 alternatives equal log_softmax of transformers' logits
    for the same prompt (within 1e-4), streamed and not; the tokens' bytes spell the answer's text."""
    messages, k = multibyte_prompt, 5
    resp = greedy(client, messages, template_kwargs=NO_THINKING, logprobs=True, top_logprobs=k)
    _, new, decoded = ref.generate(messages, template_kwargs=NO_THINKING)
    expected = raw_logprobs(ref, messages, new, NO_THINKING)
    entries = resp.choices[0].logprobs.content
    assert_logprobs_match(entries, expected, new, k)
    assert entries[-1].logprob < 0 and all(e.logprob <= 0 for e in entries)
    # The greedy pick is the most likely token, so its entry leads its own top list.
    assert all(e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token for e in entries)
    tokenizer = ref.processor.tokenizer
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}  # what decode skips
    text_tokens = [e for e, t in zip(entries, new) if t not in special]
    # (Random weights write stray continuation bytes too: decoded, like the tokenizer, with U+FFFD for them.)
    spelled = bytes(b for e in text_tokens for b in e.bytes).decode(errors="replace")
    assert spelled == decoded == resp.choices[0].message.content
    # Streamed: the same entries, spread over the chunks.
    chunks = list(greedy(client, messages, template_kwargs=NO_THINKING, logprobs=True, top_logprobs=k, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]
    # logprobs without top_logprobs: the chosen tokens only.
    plain = greedy(client, messages, template_kwargs=NO_THINKING, logprobs=True).choices[0].logprobs.content
    assert [(e.token, e.top_logprobs) for e in plain] == [(e.token, []) for e in entries]
    assert greedy(client, messages, template_kwargs=NO_THINKING).choices[0].logprobs is None


def test_logprobs_are_raw_when_sampling(client, ref):
    """With temperature, top-k and a penalty the logprobs are still the model's raw distribution (the
    first position's, which depends on the prompt alone)."""
    messages = CASES["text"]
    resp = chat(client, messages, 4, NO_THINKING, temperature=0.3, seed=3, presence_penalty=1.5, logprobs=True,
                top_logprobs=3, extra_body={"top_k": 4})
    first = resp.choices[0].logprobs.content[0]
    row = raw_logprobs(ref, messages, [0], NO_THINKING)[0]
    assert max(abs(t.logprob - float(v)) for t, v in zip(first.top_logprobs, row.topk(3).values)) < LOGPROB_TOL
    assert float((row - first.logprob).abs().min()) < LOGPROB_TOL


class _OpenAIPenalties:
    """A transformers LogitsProcessor: OpenAI's presence / frequency penalties over the generated tokens,
    written out as a loop (independent of the server's batched version)."""

    def __init__(self, n_prompt: int, presence: float, frequency: float):
        self.n_prompt, self.presence, self.frequency = n_prompt, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        generated = input_ids[0, self.n_prompt:].tolist()
        for token in set(generated):
            scores[0, token] -= self.frequency * generated.count(token) + self.presence
        return scores


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.8}, {"presence_penalty": 2.0},
                                     {"frequency_penalty": 1.5}, {"presence_penalty": 1.0, "frequency_penalty": 0.5}])
def test_penalties_match_transformers(client, ref, penalty):
    from transformers import LogitsProcessorList

    messages, n = [user("Tell me a story.")], 16
    inputs = ref.inputs(messages, NO_THINKING)
    n_prompt = inputs["input_ids"].shape[1]
    kwargs: dict = {"repetition_penalty": penalty["repetition_penalty"]} if "repetition_penalty" in penalty else {
        "logits_processor": LogitsProcessorList([_OpenAIPenalties(n_prompt, penalty.get("presence_penalty", 0),
                                                                  penalty.get("frequency_penalty", 0))])}
    with torch.inference_mode():
        out = ref.model.generate(**inputs, do_sample=False, max_new_tokens=n, **kwargs)
    expected = ref.processor.tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
    plain = ref.generate(messages, n, NO_THINKING)[2]
    assert expected != plain, "the penalty changes nothing here: the test would not see it"
    resp = greedy(client, messages, n, NO_THINKING, extra_body=penalty) if "repetition_penalty" in penalty else \
        greedy(client, messages, n, NO_THINKING, **penalty)
    assert resp.choices[0].message.content == expected


def test_stop_token_ids(client, ref):
    messages = [user("Tell me a story.")]
    _, new, _ = ref.generate(messages, N, NO_THINKING)
    i = 3
    stop = new[i]
    first = new.index(stop)
    resp = greedy(client, messages, template_kwargs=NO_THINKING, extra_body={"stop_token_ids": [stop, 0]})
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == first + 1
    assert resp.choices[0].message.content == ref.processor.tokenizer.decode(new[:first], skip_special_tokens=True)


def test_n_choices_each_with_its_own_seed(client, base):
    """n=3 with seed S: three choices, choice i the same as one request with seed S + i; streamed, the
    chunks carry each choice's index and assemble into the same three."""
    messages = [user("Tell me a story.")]
    kw = dict(temperature=1.0, max_tokens=8, template_kwargs=NO_THINKING)
    resp = chat(client, messages, n=3, seed=100, **kw)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert texts == [chat(client, messages, seed=100 + i, **kw).choices[0].message.content for i in range(3)]
    assert len(set(texts)) >= 2
    assert resp.usage.completion_tokens == sum(
        chat(client, messages, seed=100 + i, **kw).usage.completion_tokens for i in range(3))
    streamed = ["", "", ""]
    finishes = {}
    for chunk in chat(client, messages, n=3, seed=100, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert streamed == texts and set(finishes) == {0, 1, 2}
    # Without a seed the choices still differ from each other.
    unseeded = chat(client, messages, n=4, **kw)
    assert len({c.message.content for c in unseeded.choices}) >= 2
    assert requests.get(f"{base}/health", timeout=30).json()["engine"]["in_flight"] == 0


def test_generation_config_defaults_apply_and_are_overridable(client, base):
    """Omitted sampling parameters are the demo checkpoint's generation_config.json (Qwen3.6's values:
    temperature 0.6, top_p 0.95, top_k 20); a request's own values win."""
    messages = [user("Tell me a story.")]
    checkpoint = json.loads((demo_dir() / "generation_config.json").read_text())
    assert (checkpoint["temperature"], checkpoint["top_p"], checkpoint["top_k"]) == (0.6, 0.95, 20)

    def text(seed: int, **kw) -> str:
        return chat(client, messages, 8, NO_THINKING, seed=seed, **kw).choices[0].message.content

    seeds = range(5)
    omitted = [text(s) for s in seeds]
    assert omitted == [text(s, temperature=0.6, top_p=0.95, extra_body={"top_k": 20}) for s in seeds]
    assert omitted != [text(s, temperature=1.0, top_p=1.0, extra_body={"top_k": -1}) for s in seeds]


# ---------------------------------------------------------------------------------------------
# Multi-turn: prefix reuse and the image embedding cache (on in the default config), at tp=2
# ---------------------------------------------------------------------------------------------


def test_multi_turn_reuses_the_previous_turn(client, base, ref):
    """Each turn continues from the previous turn's prompt (cached_tokens = what the two prompts share up
    to the previous one's generation prompt, from the reference processor's ids); answers = transformers';
    an edited image gets no hit. Turn 1 thinks (the template's default), later turns do not: the reused
    prefix ends before the generation prompt, where the two differ."""
    x, y = encode(noise(64, 48, seed=21), "PNG"), encode(noise(48, 64, seed=22), "PNG")
    black = encode(Image.new("RGB", (64, 48)), "PNG")  # x's size: the same token ids, other pixels
    turn1 = [user([image(x), text("Name the colours you see.")])]
    turn2 = turn1 + [{"role": "assistant", "content": "Grey, mostly."}, user([text("And here?"), image(y)])]
    turn3 = turn2 + [{"role": "assistant", "content": "Blue."}, user("Which one is darker?")]
    edited = [user([image(black), text("Name the colours you see.")])] + turn2[1:]
    im_start = ref.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")

    def shared(previous, kw_previous, messages) -> int:
        old = ref.inputs(previous, kw_previous)["input_ids"][0].tolist()
        new = ref.inputs(messages, NO_THINKING)["input_ids"][0].tolist()
        b = max(i for i, t in enumerate(old) if t == im_start)
        return b if new[:b] == old[:b] else 0

    before = scrape(base)
    resp = greedy(client, turn1)
    assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == \
        split_thinking(ref.generate(turn1)[2])
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    for previous, kw, messages in ((turn1, None, turn2), (turn2, NO_THINKING, turn3)):
        stream = greedy(client, messages, template_kwargs=NO_THINKING, stream=True,
                        stream_options={"include_usage": True})
        chunks = list(stream)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == ref.generate(messages, template_kwargs=NO_THINKING)[2]
        cached = shared(previous, kw, messages)
        assert cached > 64 and chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert ref.generate(edited, template_kwargs=NO_THINKING)[2] != ref.generate(turn2, template_kwargs=NO_THINKING)[2]
    resp = greedy(client, edited, template_kwargs=NO_THINKING)
    assert resp.choices[0].message.content == ref.generate(edited, template_kwargs=NO_THINKING)[2]
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    after = scrape(base)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert delta[("dsqv_prefix_cache_hits_total", ())] == 2
    assert delta[("dsqv_image_cache_hits_total", ())] == 1  # y in the edited turn; x was inside reused prefixes
    assert delta[("dsqv_image_cache_misses_total", ())] == 3  # x, y, black
