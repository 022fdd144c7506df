"""Prefix reuse and the image embedding cache, in process at tp=1: the real Engine (prepare, plan, the
prefix cache's decisions) over the real ModelRunner (snapshots, image cache), Engine.run on a thread.

Every answer is checked against transformers' greedy `generate` on the same conversation; `cached_tokens`
against what the previous turn's prompt shares with this one up to its generation prompt, computed from
the checkpoint's processor alone. tp=2 (real ranks): tests/test_server_e2e.py::test_multi_turn_reuse.
"""
from __future__ import annotations

import base64
import io
import threading
import time

import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from transformers import Qwen3_5ForConditionalGeneration

from conftest import OneRank, generate_text, make_image
from ds_qwen_vision.config import CacheConfig, LimitsConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.engine.prefix_cache import Lru
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.runner import ModelRunner

N = 8
NO_THINKING = {"enable_thinking": False}


def solid(colour, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


IMG_A, IMG_B = make_image(64, 48, seed=11), make_image(48, 80, seed=13)
IMG_A2 = solid((0, 0, 0))  # IMG_A's size (the same token ids), content far enough from it to change the answer


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def img(data: bytes) -> dict:
    return {"type": "image", "bytes": data}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def engine_request(messages) -> dict:
    """The engine's request format (what server/protocol.py hands it)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "data_b64": base64.b64encode(p["bytes"]).decode()} if p["type"] == "image"
                       else p for p in content]
        out.append({"role": m["role"], "content": content})
    return {"messages": out, "max_tokens": N, "temperature": 0.0, "chat_template_kwargs": NO_THINKING}


def hf(messages) -> tuple[list[dict], list[bytes]]:
    """transformers' chat format and the image bytes in order, independently of the engine."""
    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p["type"] == "image":
                    images.append(p["bytes"])
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            content = parts
        out.append({"role": m["role"], "content": content})
    return out, images


class Reference:
    def __init__(self, ckpt):
        self.model = Qwen3_5ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.processor = load_processor(ckpt)
        self.im_start = self.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.memo = {}

    def ids(self, messages) -> list[int]:
        return chat_inputs(self.processor, *hf(messages), NO_THINKING)["input_ids"][0].tolist()

    def answer(self, messages) -> str:
        key = repr(messages)
        if key not in self.memo:
            x = chat_inputs(self.processor, *hf(messages), NO_THINKING)
            with torch.inference_mode():
                out = self.model.generate(**x, max_new_tokens=N, do_sample=False)
            self.memo[key] = self.processor.tokenizer.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
        return self.memo[key]

    def reusable(self, previous, messages) -> int:
        """Tokens of `messages`' prompt held from `previous`'s: up to previous's last <|im_start|>, if the
        new prompt starts with that much of it (ids, and the same images)."""
        old, new = self.ids(previous), self.ids(messages)
        b = max(i for i, t in enumerate(old) if t == self.im_start)
        return b if new[:b] == old[:b] else 0


def metrics(engine) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(engine.metrics()) for s in f.samples}


class CountingImageProcessor:
    """The checkpoint's image processor, counting the images it is asked to process."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def __call__(self, images, **kwargs):
        self.images += len(images)
        return self.inner(images=images, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Harness:
    def __init__(self, ckpt, processor, cache: CacheConfig, slots: int = 2, chunk: int = 2048, **runner_kw):
        processor = load_processor(ckpt)  # its own: the reference's processor is not counted
        processor.image_processor = self.counter = CountingImageProcessor(processor.image_processor)
        model = load_model(ckpt, 1, "cpu", torch.float32, show_progress=False)
        self.runner = ModelRunner(model, torch.device("cpu"), max_slots=slots, max_len=512, **runner_kw)
        limits = LimitsConfig(max_prompt_tokens=400, max_new_tokens=64, max_concurrent=slots, prefill_chunk_tokens=chunk)
        self.engine = Engine(self.runner, OneRank(), processor, limits, cache=cache)
        self.loop = threading.Thread(target=self.engine.run, daemon=True)
        self.loop.start()

    def ask(self, messages) -> tuple[str, dict]:
        text, done = generate_text(self.engine, engine_request(messages))
        return text, done["usage"]

    def ask_together(self, conversations) -> list[tuple[str, dict]]:
        out = [None] * len(conversations)

        def one(i):
            out[i] = self.ask(conversations[i])
            time.sleep(0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(conversations))]
        for t in threads:
            t.start()
            time.sleep(0.05)  # in this order into the queue
        for t in threads:
            t.join(120)
        return out

    def stop(self):
        self.engine.stop()
        self.loop.join(30)


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


@pytest.fixture(scope="module")
def roomy(tiny_ckpt, ref):
    h = Harness(tiny_ckpt, ref.processor, CacheConfig(prefix_bytes=1 << 30, image_bytes=1 << 28))
    yield h
    h.stop()


TURN1 = [user(img(IMG_A), "What is in this picture?")]
TURN2 = TURN1 + [assistant("A small painting of noise."), user("And this one?", img(IMG_B))]
TURN3 = TURN2 + [assistant("Another one, taller."), user("Which of the two is brighter?")]


def test_multi_turn_reuses_the_previous_turn(roomy, ref):
    before = metrics(roomy.engine)
    previous = None
    for turn in (TURN1, TURN2, TURN3):
        text, usage = roomy.ask(turn)
        assert text == ref.answer(turn)
        expected = ref.reusable(previous, turn) if previous else 0
        assert usage["prompt_tokens_details"]["cached_tokens"] == expected
        assert usage["prompt_tokens"] == len(ref.ids(turn))
        previous = turn
    assert ref.reusable(TURN1, TURN2) > 60 and ref.reusable(TURN2, TURN3) > ref.reusable(TURN1, TURN2)
    after = metrics(roomy.engine)
    assert roomy.counter.images == 2  # IMG_A in turn 1, IMG_B in turn 2: held embeddings are not processed again
    # turns 2 and 3 continued a snapshot: theirs were taken after them, in the slot they left
    assert after["dsqv_prefix_cache_snapshot_jobs_total"] - before.get("dsqv_prefix_cache_snapshot_jobs_total", 0) == 2
    assert after["dsqv_prefix_cache_hits_total"] - before.get("dsqv_prefix_cache_hits_total", 0) == 2
    assert after["dsqv_prefix_cache_cached_tokens_total"] - before.get("dsqv_prefix_cache_cached_tokens_total", 0) \
        == ref.reusable(TURN1, TURN2) + ref.reusable(TURN2, TURN3)
    # the same turn again (a regenerate): its own snapshot
    text, usage = roomy.ask(TURN3)
    assert text == ref.answer(TURN3)
    assert usage["prompt_tokens_details"]["cached_tokens"] == ref.reusable(TURN3, TURN3)
    assert roomy.counter.images == 2


def test_prompt_ids_of_held_images_are_the_processors(roomy, ref):
    """A prompt whose images are partly held (IMG_A, IMG_B after the multi-turn test) and partly new, one of
    them twice: the ids the prefix cache expands equal the processor's own call on all the images."""
    roomy.ask(TURN2)
    messages = TURN3 + [assistant("Hard to say."), user(img(IMG_A2), "and", img(IMG_A), "once more")]
    msgs, images = hf(messages)
    prompt = ref.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **NO_THINKING)
    out = roomy.engine.prefix_cache.process(roomy.engine.processor, prompt, images, {})
    expected = chat_inputs(ref.processor, msgs, images, NO_THINKING)
    assert out["input_ids"].tolist() == expected["input_ids"].tolist()
    assert out["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert [p is None for p in out["prefix"].pixels] == [True, True, False, True]  # only IMG_A2 processed
    rows = expected["pixel_values"].split([g[0] * g[1] * g[2] for g in expected["image_grid_thw"].tolist()])
    torch.testing.assert_close(out["prefix"].pixels[2], rows[2], rtol=0, atol=0)


def test_an_edited_history_gets_no_false_hit(roomy, ref):
    for turn in (TURN1, TURN2):
        roomy.ask(turn)
    before = metrics(roomy.engine)
    edited_text = [user(img(IMG_A), "What is in this image?")] + TURN2[1:]
    edited_image = [user(img(IMG_A2), "What is in this picture?")] + TURN2[1:]
    # Only the pixels differ: the same token ids, so matching must look at the image's content.
    assert ref.ids(edited_image) == ref.ids(TURN2) and ref.answer(edited_image) != ref.answer(TURN2)
    for turn in (edited_text, edited_image):
        text, usage = roomy.ask(turn)
        assert text == ref.answer(turn)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    after = metrics(roomy.engine)
    # the edited text reuses both images' embeddings (held since TURN2); A2 is new and encoded
    assert after["dsqv_image_cache_hits_total"] - before["dsqv_image_cache_hits_total"] == 3
    assert after["dsqv_image_cache_misses_total"] - before["dsqv_image_cache_misses_total"] == 1
    assert after["dsqv_prefix_cache_misses_total"] - before["dsqv_prefix_cache_misses_total"] == 2


def test_eviction_while_sequences_run_keeps_answers_exact(tiny_ckpt, ref):
    """Budgets for about two snapshots and one image: every new prompt evicts what others restored, while
    those still decode; prompts are prefilled 16 tokens a step so evictions land mid-generation."""
    h = Harness(tiny_ckpt, ref.processor, CacheConfig(prefix_bytes=1, image_bytes=1), slots=2, chunk=16)
    # two snapshots: their GDN state, whatever their length (their KV blocks are the paged cache's, shared)
    budget = int(2.5 * h.runner.snapshots.nbytes())
    h.engine.prefix_cache.snapshots.budget = budget
    grids = chat_inputs(ref.processor, *hf(TURN2), NO_THINKING)["image_grid_thw"].tolist()  # IMG_A, IMG_B
    h.engine.prefix_cache.images.budget = int(1.5 * max(map(h.runner.images.nbytes, grids)))
    try:
        other1 = [user(img(IMG_B), "Describe it in one word.")]
        other2 = other1 + [assistant("Noise."), user("Again, in two words.")]
        for turns in ([TURN1, other1], [TURN2, other2], [TURN3, other2, TURN2]):
            for turn, (text, usage) in zip(turns, h.ask_together(turns), strict=True):
                assert text == ref.answer(turn), turn
        m = metrics(h.engine)
        assert m["dsqv_prefix_cache_evictions_total"] >= 2 and m["dsqv_image_cache_evictions_total"] >= 1
        assert m["dsqv_prefix_cache_hits_total"] >= 1
        assert h.engine.prefix_cache.snapshots.used <= budget
        assert h.engine.prefix_cache.images.used <= h.engine.prefix_cache.images.budget
        assert set(h.runner.snapshots.snapshots) == set(h.engine.prefix_cache.prefixes)  # rank 0's view = the store
        assert set(h.runner.images.entries) == set(h.engine.prefix_cache.images.sizes)
    finally:
        h.stop()


def test_caches_off_is_the_plain_path(tiny_ckpt, ref):
    h = Harness(tiny_ckpt, ref.processor, CacheConfig(prefix_bytes=0, image_bytes=0))
    try:
        for turn in (TURN1, TURN2):
            text, usage = h.ask(turn)
            assert text == ref.answer(turn) and usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert not h.runner.snapshots.snapshots and not h.runner.images.entries
    finally:
        h.stop()


def test_lru_never_evicts_what_the_plan_pinned():
    lru = Lru(100)
    assert lru.admit("a", 40) == [] and lru.admit("b", 40) == []
    lru.pinned.clear()
    lru.touch("a")                        # used by the plan being built: "b" is now the oldest unpinned
    assert lru.admit("c", 50) == ["b"]
    assert lru.admit("d", 50) is None     # only pinned entries left to evict: refused, nothing changed
    assert list(lru.sizes) == ["a", "c"] and lru.used == 90
    assert lru.admit("e", 101) is None
