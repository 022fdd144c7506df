"""`ignore_eos`: an end-of-sequence token ends a choice unless the request asks to generate through it.

The tiny random checkpoint seldom writes its real end-of-sequence token, so the engine is told that a token
transformers' greedy answer writes early is one (Output.eos_ids, what the engine reads from generation_config)."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import OneRank, generate_text
from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

from ds_qwen_vision.config import LimitsConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.model import load_model, load_processor
from ds_qwen_vision.runner import ModelRunner

N = 12
TEXT = "Tell me a story."


@pytest.fixture(scope="module")
def greedy_ids(tiny_ckpt) -> list[int]:
    """transformers' greedy answer (its own chat template and generate), token ids."""
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True,
                                  enable_thinking=False, return_tensors="pt", return_dict=True)["input_ids"]
    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=N, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=2, max_len=256)
    e = Engine(runner, OneRank(), load_processor(tiny_ckpt), LimitsConfig(max_prompt_tokens=128, max_new_tokens=64))
    e.phase = "ready"
    loop = threading.Thread(target=e.run, daemon=True)
    loop.start()
    yield e
    e.stop()
    loop.join(30)


def ask(engine, **extra) -> tuple[str, str, int]:
    request = {"messages": [{"role": "user", "content": [{"type": "text", "text": TEXT}]}], "max_tokens": N,
               "temperature": 0.0, "chat_template_kwargs": {"enable_thinking": False}, **extra}
    text, done = generate_text(engine, request)
    return text, done["finish_reason"], done["usage"]["completion_tokens"]


def test_ignore_eos_generates_through_end_of_sequence(engine, greedy_ids, tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    eos = greedy_ids[3]
    first = greedy_ids.index(eos)
    saved = engine.output.eos_ids
    engine.output.eos_ids = saved | {eos}
    try:
        text, finish, tokens = ask(engine)
        assert (finish, tokens) == ("stop", first + 1)
        assert text == tok.decode(greedy_ids[:first], skip_special_tokens=True)
        text, finish, tokens = ask(engine, ignore_eos=True)
        assert (finish, tokens) == ("length", N)
        assert text == tok.decode(greedy_ids, skip_special_tokens=True)
        # stop_token_ids still end it
        text, finish, tokens = ask(engine, ignore_eos=True, stop_token_ids=[eos])
        assert (finish, tokens) == ("stop", first + 1)
    finally:
        engine.output.eos_ids = saved
