"""Paged KV: admission by free blocks, blocks shared by prefix snapshots, and the memory planner.

* A pool too small for every slot at once: sequences wait for blocks, blocks come back in another order
  than they went (tables that are not contiguous), prefixes are restored from shared blocks -- and every
  answer is still transformers' greedy `generate` (tests/test_prefix_cache.py's reference).
* A property test of admission over the engine's own plan(): random arrivals, lengths and cancellations
  never over-commit a block, never deadlock, and every block is free again at the end.
* The planner's arithmetic against sums written out by hand from the checkpoint's config, its refusal of a
  deployment that cannot hold one request, and the 400 at the edge for a request the cache cannot hold.
"""
from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import OneRank, answers_together
from ds_qwen_vision.config import CacheConfig, LimitsConfig, MemoryConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.engine.block_manager import BlockPool
from ds_qwen_vision.model import load_model, load_processor
from ds_qwen_vision.plan import StepPlan
from ds_qwen_vision.runner import ModelRunner
from ds_qwen_vision.runner.memory import PlanError, plan_memory
from test_prefix_cache import IMG_A, IMG_B, Harness, Reference, assistant, engine_request, img, metrics, user


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


def test_block_pool_counts_holders():
    pool = BlockPool(5, 16)
    assert pool.capacity == 4 and pool.blocks_for(33) == 3
    a = pool.allocate(3)
    assert 0 not in a and pool.used == 3
    pool.share(a[:2])  # a snapshot holds the first two
    pool.release(a)
    assert pool.used == 2 and sorted(pool.free) == sorted({1, 2, 3, 4} - set(a[:2]))
    pool.release(a[:2])
    assert pool.used == 0
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_a_small_pool_serves_exact_answers(tiny_ckpt, ref):
    """Three slots over 16 blocks of 16 tokens (256 tokens of KV): fewer sequences fit than slots, so some wait
    for blocks; the blocks they get are the ones others gave back, in any order; later turns restore their
    prefix from shared blocks. Every answer is transformers'."""
    h = Harness(tiny_ckpt, ref.processor, CacheConfig(prefix_bytes=1 << 30, image_bytes=1 << 28), slots=3,
                chunk=32, num_blocks=17, block_size=16)
    try:
        turn1 = [user(img(IMG_A), "What is in this picture?")]
        turn2 = turn1 + [assistant("A small painting of noise."), user("And this one?", img(IMG_B))]
        others = [[user(f"Count to {n} in words, please. " * 4)] for n in range(4)]  # 78 tokens each
        text, _ = h.ask(turn1)
        assert text == ref.answer(turn1)
        # turn 2 continues turn 1's snapshot (its full blocks shared, the last one copied) while the others
        # wait for blocks and evict what they can
        out = h.ask_together([turn2, *others])
        for (text, usage), conv in zip(out, [turn2, *others], strict=True):
            assert text == ref.answer(conv), conv
        assert out[0][1]["prompt_tokens_details"]["cached_tokens"] == ref.reusable(turn1, turn2) > 16
        m = metrics(h.engine)
        pool = h.engine.blocks
        held = {b for blocks in h.engine.prefix_cache.blocks.values() for b in blocks}
        assert pool.used == len(held)  # what is still held is the snapshots' alone: nothing leaked
        assert m["dsqv_kv_blocks_used"] == pool.used and m["dsqv_waiting_for_memory"] == 0
        assert (m["dsqv_kv_capacity_tokens"], m["dsqv_max_sequences"]) == (16 * 16, 3)  # what the pool holds
        assert m["dsqv_memory_waits_total"] >= 1  # the pool did run short: a sequence waited for blocks
        assert h.engine.idle()
    finally:
        h.stop()


class PoolRunner:
    """The runner's interface over a pool of blocks and no model: every stepped slot picks `token`. Each
    step checks the engine's block bookkeeping: no block held by two sequences, each sequence holding its
    whole reservation, the pool's count of what is held."""

    def __init__(self, engine_ref, token: int, slots: int, num_blocks: int, block_size: int):
        text = SimpleNamespace(max_position_embeddings=4096)
        self.model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[token + 1]),
                                     config=SimpleNamespace(text_config=text))
        self.max_slots, self.max_len, self.kv_len = slots, 4096, 4096
        self.state = SimpleNamespace(num_blocks=num_blocks, block_size=block_size)
        self.engine_ref, self.token, self.steps, self.most = engine_ref, token, 0, 0
        self.rng = random.Random(1)

    def run(self, plan: StepPlan, pixels=None) -> dict[int, torch.Tensor]:
        self.steps += 1
        engine = self.engine_ref[0]
        seqs = list(engine.running.values())
        held = [b for seq in seqs for b in seq.blocks]
        assert len(held) == len(set(held)), "a block held by two sequences"
        assert 0 not in held
        for seq in seqs:
            assert len(seq.blocks) == engine.blocks.blocks_for(seq.reserve), "a sequence without its reservation"
        assert engine.blocks.used == len(held) and engine.blocks.used <= engine.blocks.capacity
        self.most = max(self.most, len(seqs))
        time.sleep(self.rng.random() * 0.002)
        row = torch.zeros(self.token + 2)
        row[self.token] = 1.0
        return {slot: row for slot in [p.slot for p in plan.prefill if p.end in (None, len(p.input_ids))]
                + [s for s, _ in plan.decode]}

    def feed(self, slots, picks) -> None:
        pass

    def status(self) -> dict:
        return {"rank": 0, "ready": True}


def test_admission_never_overcommits_deadlocks_or_leaks(tiny_ckpt):
    """60 requests of random prompt lengths and max_tokens, a third of them cancelled at a random moment,
    over 4 slots and a pool that holds about two of them: each gets its terminal event, and at the end every
    block is free."""
    processor = load_processor(tiny_ckpt)
    token = processor.tokenizer.encode("a")[0]
    box = [None]
    runner = PoolRunner(box, token, slots=4, num_blocks=1 + 12, block_size=16)
    engine = box[0] = Engine(runner, OneRank(), processor, LimitsConfig(max_queue=64, max_new_tokens=64,
                                                                        prefill_chunk_tokens=48))
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    rng = random.Random(0)
    finished, errors = [], []

    def client(i):
        words = " ".join(["hello"] * rng.randrange(1, 40))
        request = {"messages": [{"role": "user", "content": [{"type": "text", "text": words}]}],
                   "max_tokens": rng.randrange(1, 64), "temperature": 0.0, "chat_template_kwargs": {}}
        cancel_after = rng.randrange(1, 20) if i % 3 == 0 else None
        gen = engine.generate(request)
        n = 0
        for event in gen:
            if event is None:
                continue
            n += 1
            if event["event"] == "error":
                errors.append(event)
                return
            if event["event"] == "done" or (cancel_after is not None and n >= cancel_after):
                gen.close()  # a client going away (cancel), or the end
                finished.append(i)
                return
        finished.append(i)

    threads = []
    for i in range(60):
        t = threading.Thread(target=client, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(rng.random() * 0.01)
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors[:3]
        assert len(finished) == 60, "a request never ended (deadlock)"
        deadline = time.monotonic() + 10
        while not engine.idle() or engine.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.blocks.used == 0 and len(engine.blocks.free) == engine.blocks.capacity
        assert all(r == 0 for r in engine.blocks.refs)
        assert runner.most >= 2  # sequences did share the pool
    finally:
        engine.stop()
        loop.join(10)


def test_a_request_the_cache_cannot_hold_is_a_400(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    token = processor.tokenizer.encode("a")[0]
    box = [None]
    runner = PoolRunner(box, token, slots=2, num_blocks=1 + 4, block_size=16)  # 64 tokens of KV
    engine = Engine(runner, OneRank(), processor, LimitsConfig(max_new_tokens=64))
    request = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi " * 30}]}],
               "max_tokens": 60, "temperature": 0.0, "chat_template_kwargs": {}}
    events = [e for e in engine.generate(request) if e is not None]
    assert events[0]["event"] == "error" and events[0]["status"] == 400, events
    assert events[0]["code"] == "context_length_exceeded" and "KV cache" in events[0]["message"]
    assert not engine.scheduler.queued()  # refused before anything was queued
    request["messages"][0]["content"][0]["text"] = "hi " * 200
    events = [e for e in engine.generate(request) if e is not None]
    assert events[0]["status"] == 400 and events[0]["code"] == "context_length_exceeded"


def _hand_sums(model, spec_tokens: int, mtp: bool):
    """KV bytes per token and fixed bytes per sequence, from the checkpoint's config (float32 tiny model)."""
    text = model.config.text_config
    kinds = text.layer_types
    attn = sum(k == "full_attention" for k in kinds) + (text.mtp_num_hidden_layers if mtp else 0)
    per_token = attn * 2 * text.num_key_value_heads * text.head_dim * 4
    gdn = sum(k == "linear_attention" for k in kinds)
    conv = (2 * text.linear_num_key_heads * text.linear_key_head_dim
            + text.linear_num_value_heads * text.linear_value_head_dim) * text.linear_conv_kernel_dim * 4
    rec = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4
    t = spec_tokens + 1
    per_slot = gdn * (conv + rec) + text.vocab_size * 5
    per_row = (gdn * (conv + rec) * t + t * text.hidden_size * 4) if spec_tokens else 0
    return per_token, per_slot, per_row


@pytest.mark.parametrize("spec_tokens", [0, 3])
def test_planner_arithmetic(tiny_ckpt, spec_tokens):
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=spec_tokens > 0)
    like = SimpleNamespace(model=model, device=torch.device("cpu"), dtype=torch.float32)
    per_token, per_slot, per_row = _hand_sums(model, spec_tokens, spec_tokens > 0)
    budget, cache = 64 << 20, CacheConfig(prefix_bytes=4 << 20, image_bytes=2 << 20)
    limits = LimitsConfig(max_new_tokens=256)
    plan = plan_memory(like, limits, MemoryConfig(cpu_cache_bytes=budget, block_size=32), cache, spec_tokens,
                       spec_tokens > 0)
    assert (plan.per_token_bytes, plan.per_slot_bytes, plan.per_row_bytes) == (per_token, per_slot, per_row)
    left = budget - (6 << 20)
    slots = min(64, left // 4 // per_slot)
    rows = max(1, min(slots, left // 4 // per_row)) if spec_tokens else 0
    assert (plan.max_slots, plan.spec_rows) == (slots, rows)
    blocks = (left - slots * per_slot - rows * per_row) // (per_token * 32)
    assert plan.num_blocks == blocks and plan.kv_tokens == (blocks - 1) * 32
    assert plan.max_len == min(plan.kv_tokens - spec_tokens - 1, model.config.text_config.max_position_embeddings)
    assert plan.max_prompt_tokens == plan.max_len - 256
    # fixed limits: the prompt limit as configured, the length from it
    fixed = plan_memory(like, LimitsConfig(max_prompt_tokens=1000, max_new_tokens=256, max_concurrent=3),
                        MemoryConfig(cpu_cache_bytes=budget, block_size=32), cache, spec_tokens, spec_tokens > 0)
    assert (fixed.max_slots, fixed.max_prompt_tokens, fixed.max_len) == (3, 1000, 1256)
    assert fixed.num_blocks == (left - 3 * per_slot - fixed.spec_rows * per_row) // (per_token * 32)
    # a deployment that cannot hold one request of its own limits refuses to start, with the numbers
    with pytest.raises(PlanError, match="needs 1,2"):
        plan_memory(like, LimitsConfig(max_prompt_tokens=1000, max_new_tokens=256),
                    MemoryConfig(cpu_cache_bytes=(6 << 20) + 3 * per_slot + per_row, block_size=32), cache, spec_tokens,
                    spec_tokens > 0)


def test_speculation_with_fewer_verify_rows_than_slots(tiny_ckpt, ref):
    """MTP with verify buffers for 2 of 4 slots: sequences in slots 0-1 verify drafts, those in 2-3 decode one
    token a step in a forward of their own, in the same steps. Every answer is transformers' greedy one."""
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=True)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=4, max_len=512,
                         speculative={"method": "mtp", "num_tokens": 2, "rows": 2})
    assert runner.spec.rows == 2 and runner.state.conv_steps.shape[1] == 2
    engine = Engine(runner, OneRank(), load_processor(tiny_ckpt), LimitsConfig(max_new_tokens=64))
    steps = []
    run = runner.run

    def recording(plan, pixels=None):
        steps.append((sorted(s for s, _ in plan.verify), sorted(s for s, _ in plan.decode)))
        return run(plan, pixels)

    runner.run = recording
    convs = [[user(f"Tell me about the number {n}, briefly.")] for n in range(4)]
    assert answers_together(engine, [engine_request(c) for c in convs]) == [ref.answer(c) for c in convs]
    # steps where both kinds ran: verify rows below 2, plain decode rows at 2 and above
    both = [(v, d) for v, d in steps if v and d]
    assert both and all(max(v) < 2 <= min(d) for v, d in both)
