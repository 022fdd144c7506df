"""The inexact cache options (memory.kv_cache_dtype "fp8_e4m3", memory.gdn_state_dtype "bfloat16"): what they store,
how close they stay to the exact cache, what the planner counts for them, and that they serve through the
engine (prefix reuse, speculation). The GPU kernels' FP8 reads are checked in tests/_decode_attention_interp.py;
benchmarks/bench_cache_options.py measures the cost at the 27B's widths.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import OneRank, answers_together
from ds_qwen_vision.config import CacheConfig, LimitsConfig, MemoryConfig
from ds_qwen_vision.engine import Engine
from ds_qwen_vision.kernels.decode_attention import Fp8Pool, gather_kv
from ds_qwen_vision.model import load_model, load_processor
from ds_qwen_vision.plan import Prefill, StepPlan
from ds_qwen_vision.runner import ModelRunner
from ds_qwen_vision.runner.memory import plan_memory
from ds_qwen_vision.runner.slot_state import SlotState, write_kv
from test_prefix_cache import IMG_A, Harness, Reference, assistant, engine_request, img, user

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=True)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_fp8_pool_stores_each_vector_with_its_scale(model):
    """Written through a block table, read back through it: within e4m3's rounding (3 mantissa bits) of what
    was written, each vector to its own range (one tiny, one large); a block copy (a restored prefix's partial
    block) copies data and scales exactly."""
    state = SlotState(model, 2, 64, torch.device("cpu"), torch.float32, num_blocks=9, block_size=16, kv_fp8=True)
    layer = next(iter(state.kv))
    pools = state.kv[layer]
    assert all(isinstance(p, Fp8Pool) and p.data.dtype == torch.float8_e4m3fn for p in pools)
    heads, dim = pools[0].shape[1], pools[0].shape[-1]
    key = torch.randn(1, heads, 40, dim) * torch.logspace(-3, 3, 40)[None, None, :, None]
    value = torch.randn(1, heads, 40, dim)
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    write_kv(pools, 16, table, torch.arange(40)[None], key, value)
    for pool, x in zip(pools, (key, value)):
        got = gather_kv(pool, table, 16)[:, :, :40]
        err = ((got - x).abs() / x.abs().amax(-1, keepdim=True)).amax()
        assert 0 < err <= 2 ** -4 + 1e-6  # half an e4m3 step at the top of each vector's range
    state.copy_blocks([(7, 3)])
    for pool in pools:
        assert torch.equal(pool.data[3].view(torch.uint8), pool.data[7].view(torch.uint8))
        assert torch.equal(pool.scale[3], pool.scale[7])


def test_options_stay_close_to_the_exact_cache(model):
    """The same prompt (in chunks, as served), then 24 greedy tokens fed to both (teacher forcing): the options'
    logits stay within a few percent of the exact cache's, and the log-probability they give the exact cache's
    token stays within 0.1 of its own (a near-tie may still pick another token); they do change the result
    (an option silently ignored would not), and they take the memory they claim."""
    kw = dict(max_slots=1, max_len=200, cuda_graphs=False, prefill_graph_tokens=0)
    exact = ModelRunner(model, torch.device("cpu"), **kw)
    both = ModelRunner(model, torch.device("cpu"), kv_fp8=True, state_dtype=BF16, **kw)
    assert both.state.rec_all.dtype == BF16 and exact.state.rec_all.dtype == torch.float32
    assert both.state.kv_bytes_per_block() < 0.3 * exact.state.kv_bytes_per_block()  # 1 byte + scales vs 4
    prompt = torch.randint(100, 1200, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = {}
    for name, runner in (("exact", exact), ("both", both)):
        for start in range(0, 120, 48):
            out = runner.run(StepPlan(prefill=[Prefill(0, prompt, start=start, end=min(120, start + 48))]))
        logits[name] = out[0]
    errs, dlogprob, agree = [], [], 0
    for _ in range(24):
        errs.append(rel(logits["both"], logits["exact"]))
        token = int(logits["exact"].argmax())
        lp = {name: torch.log_softmax(x.float(), -1)[token] for name, x in logits.items()}
        dlogprob.append(abs(float(lp["both"] - lp["exact"])))
        agree += int(logits["both"].argmax()) == token
        logits = {name: r.run(StepPlan(decode=[(0, token)]))[0] for name, r in (("exact", exact), ("both", both))}
    print(f"logits rel err max {max(errs):.2e}, |dlogprob| max {max(dlogprob):.2e}, agreement {agree}/24")
    assert 1e-5 < max(errs) < 0.05 and max(dlogprob) < 0.1 and agree >= 20, (errs, dlogprob, agree)


def test_planner_counts_the_options(model):
    """Per token and per sequence, the bytes the planner counts are what SlotState allocates; on the same budget
    the options hold more than 1.8x the tokens and sequences."""
    like = SimpleNamespace(model=model, device=torch.device("cpu"), dtype=torch.float32)
    limits, cache = LimitsConfig(max_new_tokens=128), CacheConfig(prefix_bytes=1 << 20, image_bytes=1 << 20)
    plans = {}
    for fp8, state_dtype in ((False, "float32"), (True, "bfloat16")):
        memory = MemoryConfig(cpu_cache_bytes=48 << 20, block_size=32, kv_cache_dtype="fp8_e4m3" if fp8 else "auto",
                              gdn_state_dtype=state_dtype)
        plan = plan_memory(like, limits, memory, cache, 0, False)
        state = SlotState(model, 1, 64, torch.device("cpu"), torch.float32, num_blocks=3, block_size=32, kv_fp8=fp8,
                          state_dtype=getattr(torch, state_dtype))
        assert plan.per_token_bytes * 32 == state.kv_bytes_per_block()
        vocab = model.config.text_config.vocab_size
        assert plan.per_slot_bytes == state.conv_all[:, 0].nbytes + state.rec_all[:, 0].nbytes + vocab * 5
        plans[fp8] = plan
    assert plans[True].kv_tokens > 1.8 * plans[False].kv_tokens
    assert plans[True].max_slots > 1.5 * plans[False].max_slots


def test_fp8_kv_on_a_gpu_without_e4m3_is_a_config_error(model, monkeypatch):
    """An Ampere card (8.0) cannot read e4m3 in the attention kernels: the planner refuses at start (exit 2)."""
    from ds_qwen_vision.runner.memory import PlanError

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    like = SimpleNamespace(model=model, device=torch.device("cuda"), dtype=torch.float32)
    with pytest.raises(PlanError, match="fp8_e4m3 needs a GPU of compute capability 8.9 or newer"):
        plan_memory(like, LimitsConfig(), MemoryConfig(kv_cache_dtype="fp8_e4m3"), CacheConfig(), 0, False)


def test_served_with_the_options(tiny_ckpt, ref):
    """Both options through the engine: a conversation and its next turn restored from the prefix cache (shared
    FP8 blocks, the partial one copied with its scales; the bf16 GDN snapshot), three at once in a pool that
    makes them wait for blocks. On this checkpoint the options keep transformers' greedy answers."""
    h = Harness(tiny_ckpt, ref.processor, CacheConfig(prefix_bytes=1 << 30, image_bytes=1 << 28), slots=3, chunk=32,
                num_blocks=17, block_size=16, kv_fp8=True, state_dtype=BF16)
    try:
        turn1 = [user(img(IMG_A), "What is in this picture?")]
        turn2 = turn1 + [assistant("A small painting of noise."), user("Describe it once more.")]
        assert h.ask(turn1)[0] == ref.answer(turn1)
        out = h.ask_together([turn2, [user("Count to three in words.")], [user("Say hello twice.")]])
        for (text, usage), conv in zip(out, [turn2, [user("Count to three in words.")], [user("Say hello twice.")]]):
            assert text == ref.answer(conv), conv
        assert out[0][1]["prompt_tokens_details"]["cached_tokens"] > 16
        assert h.engine.idle()
    finally:
        h.stop()


def test_speculation_with_the_options(tiny_ckpt, ref, model):
    """MTP speculation over FP8 KV (the head's pool too) and bf16 verify states: greedy-exact against the same
    runner without speculation (the options on both), two sequences at once."""
    answers = {}
    for spec in (None, {"method": "mtp", "num_tokens": 2}):
        runner = ModelRunner(model, torch.device("cpu"), max_slots=2, max_len=256, speculative=spec, kv_fp8=True,
                             state_dtype=BF16)
        if spec:
            assert isinstance(next(iter(runner.state.extra_kv.values()))[0], Fp8Pool)
            assert runner.state.rec_steps.dtype == BF16
        engine = Engine(runner, OneRank(), load_processor(tiny_ckpt), LimitsConfig(max_new_tokens=40))
        convs = [[user(f"Tell me about the number {n}, briefly.")] for n in range(2)]
        answers[spec is not None] = answers_together(engine, [engine_request(c) for c in convs])
    assert answers[True] == answers[False] and all(answers[True])
