"""Speculative decoding: the multi-token GDN forward, greedy speculation (ngram, forced acceptance, MTP)
token for token equal to transformers' generate and to no speculation, the MTP head's drafts against a
whole-sequence computation, speculative sampling's distribution, the n-gram index, refusals."""
import random

import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from conftest import make_image
from ds_qwen_vision.checkpoint import build_checkpoint
from ds_qwen_vision.engine.speculative import NgramIndex, accept_greedy, accept_sampled
from ds_qwen_vision.kernels.gdn import gdn_multi_token
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.runner import ModelRunner
from driver import drive

N = 12
K = 3
PROMPTS = [
    ([{"role": "user", "content": "Hello there, how are you? Hello there, how are you?"}], []),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], [make_image(64, 48)]),
    ([{"role": "user", "content": "A different question, longer than the first one by far, with more words."}], []),
]
# Forced acceptance: the drafter is handed the true continuation; draft i is right with these probabilities
# (conditional on the earlier ones), so rows accept 0 .. k drafts at every position.
PROFILES = {"none": (0.0,), "half": (0.5,), "88/77/66": (0.88, 0.77 / 0.88, 0.66 / 0.77), "all": (1.0,)}


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    processor = load_processor(tiny_ckpt)
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    inputs, expected, long = [], [], []
    for messages, images in PROMPTS:
        x = chat_inputs(processor, messages, images)
        with torch.inference_mode():
            out = reference.generate(**x, max_new_tokens=N + K, do_sample=False)
        long.append(out[0, x["input_ids"].shape[1]:].tolist())
        expected.append(long[-1][:N])
        inputs.append(x)
    return reference, inputs, expected, long


def runner_for(ckpt, method: str, k: int = K, slots: int = 4):
    model = load_model(ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=method == "mtp")
    return ModelRunner(model, torch.device("cpu"), max_slots=slots, max_len=256,
                       speculative={"method": method, "num_tokens": k})


@pytest.fixture(scope="module")
def ngram_runner(tiny_ckpt):
    return runner_for(tiny_ckpt, "ngram")


@pytest.fixture(scope="module")
def mtp_runner(tiny_ckpt):
    return runner_for(tiny_ckpt, "mtp")


# 0 in slot 0; 1 (an image) joins at step 1; 2 joins at step 3, prefilled 5 tokens a step while the others
# verify; when 0 ends, 0 again takes its slot (no state may leak), an idle row inside the batch meanwhile.
def jobs(x):
    return [(0, x[0]), (1, x[1]), (3, x[2]), (("after", 0), x[0])]


def test_gdn_multi_token_matches_transformers(tiny_ckpt):
    """kernels/gdn.py over T tokens from a cached state == transformers' GDN forward (its chunked path over
    the T tokens, and its one-token decode path for the state after each position)."""
    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    gdn = model.model.language_model.layers[0].linear_attn

    class Cache:  # the part of transformers' cache interface its GDN forward uses
        def __init__(self, conv, rec):
            self.conv, self.rec = conv.clone(), rec.clone()

        def is_recording_past(self, layer_idx):
            return False

        def get_conv_state(self, layer_idx, state_idx=0):
            return self.conv

        def get_recurrent_state(self, layer_idx, state_idx=0):
            return self.rec

        def update_conv_state(self, new, layer_idx, conv_kernel_size=None, **kw):
            full = torch.cat([self.conv, new], -1)
            self.conv = full[..., -self.conv.shape[-1]:].clone()
            return full

        def update_recurrent_state(self, new, layer_idx, **kw):
            self.rec = new

    g = torch.Generator().manual_seed(0)
    b, t = 2, 5
    hidden = torch.randn(b, t, model.config.text_config.hidden_size, generator=g)
    conv = torch.randn(b, gdn.conv_dim, gdn.conv_kernel_size, generator=g)
    rec = torch.randn(b, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim, generator=g) * 0.3
    conv_states = torch.zeros(b, t + 1, *conv.shape[1:])  # step buffers longer than T, as the runner's
    rec_states = torch.zeros(b, t + 1, *rec.shape[1:])
    with torch.inference_mode():
        conv_in, rec_in = conv.clone(), rec.clone()
        out = gdn_multi_token(gdn, hidden, conv_in, rec_in, conv_steps=conv_states, rec_steps=rec_states)
        assert torch.equal(conv_in, conv) and torch.equal(rec_in, rec)  # verify leaves the slot's state alone
        whole = Cache(conv, rec)
        torch.testing.assert_close(out, gdn(hidden, cache_params=whole), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rec_states[:, t - 1], whole.rec, rtol=1e-4, atol=1e-4)
        assert not rec_states[:, t:].any()  # nothing written past T
        step = Cache(conv, rec)
        for i in range(t):
            torch.testing.assert_close(out[:, i:i + 1], gdn(hidden[:, i:i + 1], cache_params=step), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(conv_states[:, i], step.conv, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rec_states[:, i], step.rec, rtol=1e-5, atol=1e-5)
        # decode: one token, the new state in place in the active rows only
        conv_in, rec_in = conv.clone(), rec.clone()
        active = torch.tensor([False, True])
        one = gdn_multi_token(gdn, hidden[:, :1], conv_in, rec_in, active=active)
        torch.testing.assert_close(one, out[:, :1], rtol=1e-5, atol=1e-5)
        assert torch.equal(conv_in[0], conv[0]) and torch.equal(rec_in[0], rec[0])
        torch.testing.assert_close(conv_in[1], conv_states[1, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rec_in[1], rec_states[1, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("profile", PROFILES)
def test_greedy_forced_acceptance_matches_transformers(setup, ngram_runner, profile):
    """Every accepted length at every draft position, rows joining/leaving, chunked prefill in the same steps."""
    _, x, expected, long = setup
    stats = {}
    got = drive(ngram_runner, jobs(x), N, chunk=5, stats=stats, oracle=[long[0], long[1], long[2], long[0]],
                profile=PROFILES[profile])
    assert got == [expected[i] for i in (0, 1, 2, 0)]
    assert stats["drafts"] > 0
    if profile == "none":
        assert stats["accepted"] == 0
    if profile == "all":  # fewer steps than the same schedule with every draft rejected
        rejected = {}
        drive(ngram_runner, jobs(x), N, chunk=5, stats=rejected, oracle=[long[0], long[1], long[2], long[0]],
              profile=(0.0,))
        assert stats["accepted"] > 0.8 * stats["drafts"] and stats["steps"] < rejected["steps"]


def test_greedy_ngram_matches_plain_and_transformers(setup, ngram_runner, tiny_ckpt):
    _, x, expected, _ = setup
    plain = runner_for(tiny_ckpt, "none")
    assert drive(plain, jobs(x), N, chunk=5) == [expected[i] for i in (0, 1, 2, 0)]
    assert drive(ngram_runner, jobs(x), N, chunk=5) == [expected[i] for i in (0, 1, 2, 0)]


def test_greedy_mtp_matches_transformers(setup, mtp_runner):
    _, x, expected, _ = setup
    stats = {}
    assert drive(mtp_runner, jobs(x), N, chunk=5, stats=stats) == [expected[i] for i in (0, 1, 2, 0)]
    assert stats["drafts"] > 0


def test_mtp_drafts_match_whole_sequence_head(setup, tiny_ckpt):
    """The MTP drafts of every step == the head run over the whole sequence at once (no cache): pairs
    (h_i after the final norm, embed(token_{i+1})) at position i, then its own output with its draft."""
    reference, x, _, _ = setup
    runner = runner_for(tiny_ckpt, "mtp", k=2, slots=2)
    seen = []
    original = runner.spec.verify

    def spy(items):
        out = original(items)
        seen.append({slot: (runner.length[slot], list(tokens)) for slot, tokens in out[1].items()})
        return out

    runner.spec.verify = spy
    prompt = x[1]  # an image: M-RoPE positions differ from text positions
    tokens = drive(runner, [(0, prompt)], N, chunk=7)[0]
    ids = torch.cat([prompt["input_ids"], torch.tensor([tokens])], 1)
    mtp = runner.model.mtp
    inner = reference.model
    with torch.inference_mode():
        mm = (ids == reference.config.image_token_id).int()
        out = inner(input_ids=ids, pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
                    mm_token_type_ids=mm)
        h = out.last_hidden_state  # after the final norm
        embeds = inner.get_input_embeddings()(ids)
        image = torch.cat(inner.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"],
                                                   return_dict=True).pooler_output)
        mask, _ = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image)
        embeds = embeds.masked_scatter(mask, image)
        positions, _ = inner.get_rope_index(ids, mm, image_grid_thw=prompt["image_grid_thw"])
        rotary, head = inner.language_model.rotary_emb, reference.lm_head
        for step in seen:
            length, verified = step[0]  # the only sequence: slot 0
            # pairs 0 .. length - 1 (the fed token verified[0] sits at `length`)
            e = torch.cat([embeds[:, 1:length], inner.get_input_embeddings()(torch.tensor([[verified[0]]]))], 1)
            pos = positions[:, :, :length]
            o = mtp(e, h[:, :length], rotary(h, pos), None, pos, None)
            d1 = int(head(o[:, -1]).argmax())
            assert verified[1] == d1
            # the second draft: the head's own output with d1, one position on
            e2 = torch.cat([e, inner.get_input_embeddings()(torch.tensor([[d1]]))], 1)
            h2 = torch.cat([h[:, :length], o[:, -1:]], 1)
            pos2 = torch.cat([pos, pos[:, :, -1:] + 1], 2)
            o2 = mtp(e2, h2, rotary(h2, pos2), None, pos2, None)
            assert verified[2] == int(head(o2[:, -1]).argmax())
    assert len(seen) >= N // 3


def chi_square_ok(counts: dict, expected: dict, n: int) -> bool:
    cells = [c for c in expected if expected[c] * n >= 5]  # pool the rare cells
    stat = sum((counts.get(c, 0) - expected[c] * n) ** 2 / (expected[c] * n) for c in cells)
    rest_e = n - sum(expected[c] * n for c in cells)
    rest_o = n - sum(counts.get(c, 0) for c in cells)
    if rest_e >= 5:
        stat += (rest_o - rest_e) ** 2 / rest_e
        cells.append(None)
    df = len(cells) - 1  # chi-square survival function: the regularised upper incomplete gamma
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64))) > 1e-3


@pytest.mark.parametrize("drafter", ["deterministic", "sampled"])
def test_speculative_sampling_follows_the_target(drafter):
    """Three-token continuations of a Markov-chain 'target' (vocab 4) through speculative sampling with a
    different drafter, k = 2, against their exact probabilities (chi-square over 64 cells)."""
    v, k, n = 4, 2, 12000
    g = torch.Generator().manual_seed(1)
    P = torch.softmax(torch.randn(v, v, generator=g, dtype=torch.float64) * 1.5, -1)  # target p(next | prev)
    Q = torch.softmax(torch.randn(v, v, generator=g, dtype=torch.float64) * 1.5, -1)  # drafter q(next | prev)
    start = 0
    counts = {}
    for _ in range(n):
        seq = [start]
        while len(seq) < 4:
            drafts, qs, prev = [], [], seq[-1]
            for _ in range(k):
                if drafter == "sampled":
                    d = int(torch.multinomial(Q[prev], 1, generator=g))
                    qs.append(Q[prev])
                else:
                    d = int(Q[prev].argmax())
                drafts.append(d)
                prev = d
            probs = torch.stack([P[t] for t in [seq[-1]] + drafts])
            seq += accept_sampled(drafts, probs, g, torch.stack(qs) if qs else None)
        key = tuple(seq[1:4])
        counts[key] = counts.get(key, 0) + 1
    expected = {(a, b, c): float(P[start, a] * P[a, b] * P[b, c]) for a in range(v) for b in range(v) for c in range(v)}
    assert chi_square_ok(counts, expected, n)
    # The test can fail: the drafter's own distribution is far from the target's.
    wrong = {(a, b, c): float(Q[start, a] * Q[a, b] * Q[b, c]) for a in range(v) for b in range(v) for c in range(v)}
    assert not chi_square_ok(counts, wrong, n)


def test_sampled_speculation_runs_through_the_runner(setup, ngram_runner):
    """Temperature > 0 with forced-acceptance drafts: every row gets its tokens, drafts are accepted."""
    from ds_qwen_vision.engine.sampling import Sampling

    _, x, _, long = setup
    stats = {}
    out = drive(ngram_runner, jobs(x)[:2], N, chunk=5, sampling=Sampling(max_tokens=N, temperature=0.7),
                stats=stats, oracle=[long[0], long[1]], profile=(1.0,))
    assert [len(o) for o in out] == [N, N] and stats["drafts"] > 0


def test_accept_greedy():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_greedy([5], [4, 1]) == [4]
    assert accept_greedy([], [3]) == [3]


def test_ngram_index_matches_brute_force():
    def brute(tokens, k):
        for n in range(min(3, len(tokens)), 0, -1):
            suffix = tokens[len(tokens) - n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    return tokens[start + n:start + n + k]
        return []

    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(5) for _ in range(rng.randrange(1, 30))]
        index = NgramIndex(tokens[:3])
        for i in range(3, len(tokens)):
            index.extend([tokens[i]])
            assert index.draft(3) == brute(tokens[:i + 1], 3), tokens[:i + 1]


def test_config_refusals():
    from ds_qwen_vision.config import ConfigError, load_config_json

    assert load_config_json('{"speculative": {"method": "mtp", "num_tokens": 3}}').speculative.num_tokens == 3
    for bad, word in [('{"speculative": {"method": "eagle"}}', "method"),
                      ('{"speculative": {"method": "ngram", "num_tokens": 0}}', "num_tokens"),
                      ('{"speculative": {"method": "ngram", "k": 2}}', "k")]:
        with pytest.raises(ConfigError, match=word):
            load_config_json(bad)


def test_checkpoint_without_mtp_serves_plain_and_refuses_mtp(tmp_path, setup):
    from ds_qwen_vision.loading import CheckpointError, has_mtp_weights

    _, x, expected, _ = setup
    bare = str(build_checkpoint(tmp_path / "bare", preset="tiny", seed=0, mtp=False))
    assert not has_mtp_weights(bare)
    for method in ("none", "ngram"):
        assert drive(runner_for(bare, method), [(0, x[0])], N) == [expected[0]]  # same main weights
    with pytest.raises(CheckpointError, match="mtp"):
        load_model(bare, 1, "cpu", torch.float32, show_progress=False, mtp=True)
    model = load_model(bare, 1, "cpu", torch.float32, show_progress=False)
    with pytest.raises(ValueError, match="mtp"):
        ModelRunner(model, torch.device("cpu"), max_slots=1, max_len=64, speculative={"method": "mtp", "num_tokens": 2})


def test_tp2_speculation_matches_transformers(setup, tiny_ckpt, image_files, tmp_path):
    """Real DeepSpeed ranks at tp=2: the MTP head sharded by the table, drafts identical on both ranks (the
    verify would desync otherwise), greedy tokens with mtp and ngram equal to transformers' generate; and
    without speculation, with mixed prefill + decode steps, the same tokens; with the inexact cache options,
    mtp gives the plain decode's tokens."""
    import json
    from pathlib import Path

    from ranks import launch

    reference = setup[0]
    processor = load_processor(tiny_ckpt)
    cases = [{"images": [], "messages": [{"role": "user", "content": "Tell me a story about the sea."}]},
             {"images": image_files[:1], "messages": [{"role": "user", "content": [{"type": "image"},
                                                                                  {"type": "text", "text": "What?"}]}]},
             {"images": [], "messages": [{"role": "user", "content": "First."}, {"role": "assistant", "content": "Yes."},
                                         {"role": "user", "content": "And then?"}]}]
    expected, oracle = [], []
    for c in cases:
        x = chat_inputs(processor, c["messages"], [open(p, "rb").read() for p in c["images"]])
        with torch.inference_mode():
            out = reference.generate(**x, max_new_tokens=N + K, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
        oracle.append(out)
        expected.append(out[:N])
    spec = {"model": tiny_ckpt, "new_tokens": N, "out": str(tmp_path), "cases": cases, "oracle": oracle}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(2, [str(Path(__file__).parent / "spec_worker.py"), str(tmp_path / "spec.json")],
           cwd=str(Path(__file__).parent))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["mtp"] == expected and r["ngram"] == expected
        assert r["ngram_stats"]["accepted"] > 0 and r["mtp_stats"]["drafts"] > 0
        # the same ranks without speculation, prefill chunks riding in the decode rows' forward
        assert r["mixed"] == expected and "prefill-graph-mixed" in r["mixed_shapes"]
        # FP8 KV and bf16 states at tp=2: speculation stays exact to the plain decode on the same cache
        assert r["options_mtp"] == r["options_plain"] and all(r["options_plain"])
    assert ranks[0]["options_mtp"] == ranks[1]["options_mtp"]
    # MTP drafting over a draft vocabulary at tp=2: the sharded head's drafts exact, the answers too
    assert all(r["draft_head_exact"] and r["mtp_draft_vocab"] == expected for r in ranks)
    assert ranks[0]["mtp_draft_vocab_stats"]["drafts"] > 0
    c = reference.config.text_config
    q = ranks[0]["mtp_params"]["mtp.layers.0.self_attn.q_proj.weight"]
    assert q[0] == 2 * c.num_attention_heads * c.head_dim // 2  # whole heads per rank
    assert ranks[0]["mtp_params"]["mtp.fc.weight"] == [c.hidden_size, 2 * c.hidden_size]  # replicated


def test_server_with_mtp_speculation_answers_like_transformers(tmp_path_factory):
    """launch.sh with speculative mtp (tp=2): two concurrent greedy chats (one multi-turn, one streamed)
    answer transformers' generate; /metrics counts drafts per position."""
    import concurrent.futures
    import json
    import urllib.request

    from ds_qwen_vision.checkpoint import demo_dir
    from server_fixture import start_server

    server = start_server(tmp_path_factory.mktemp("spec-server"),
                          {"speculative": {"method": "mtp", "num_tokens": 2}, "limits": {"max_concurrent": 2}})
    try:
        processor = load_processor(str(demo_dir()))
        reference = Qwen3_5ForConditionalGeneration.from_pretrained(str(demo_dir()), dtype=torch.float32).eval()
        chats = [[{"role": "user", "content": "Tell me about the sea."}],
                 [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Count to five."}]]
        expected = []
        for messages in chats:
            x = chat_inputs(processor, messages, [], {"enable_thinking": False})
            with torch.inference_mode():
                out = reference.generate(**x, max_new_tokens=N, do_sample=False)[0, x["input_ids"].shape[1]:]
            expected.append(processor.tokenizer.decode(out.tolist(), skip_special_tokens=True))

        def ask(messages):
            body = {"model": "ds-qwen-vision-demo", "messages": messages, "max_tokens": N, "temperature": 0,
                    "chat_template_kwargs": {"enable_thinking": False}}
            req = urllib.request.Request(f"{server.base_url}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, chats)) == expected
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        assert 'dsqv_spec_position_drafts_total{position="2"}' in metrics
        assert "dsqv_spec_draft_tokens_total" in metrics
    finally:
        assert server.stop() == 0, server.log()


def test_a_sequence_whose_drafts_fail_stops_drafting(setup, ngram_runner):
    """At 0% acceptance the row verifies STOP_EARLY times, then decodes one token a step (plain steps);
    at a low but non-zero acceptance it verifies STOP_AFTER times."""
    from ds_qwen_vision.engine.speculative import STOP_AFTER, STOP_EARLY

    _, x, expected, long = setup
    n = STOP_AFTER + 6
    with torch.inference_mode():
        ref = setup[0].generate(**x[0], max_new_tokens=n + K, do_sample=False)[0, x[0]["input_ids"].shape[1]:].tolist()
    stats = {}
    assert drive(ngram_runner, [(0, x[0])], n, stats=stats, oracle=[ref], profile=(0.0,)) == [ref[:n]]
    assert stats["drafts"] == STOP_EARLY * K and stats["accepted"] == 0
    stats = {}
    # the first draft right, the others wrong: one accepted per verify, above STOP_BELOW: it keeps drafting
    assert drive(ngram_runner, [(0, x[0])], n, stats=stats, oracle=[ref], profile=(1.0, 0.0)) == [ref[:n]]
    assert stats["accepted"] > 0 and stats["drafts"] > STOP_EARLY * K


def test_launch_refuses_mtp_on_a_checkpoint_without_it(tmp_path):
    """launch.sh: exit 2 (a config error) before any rank starts."""
    import json
    import subprocess
    from pathlib import Path

    bare = build_checkpoint(tmp_path / "bare", preset="tiny", seed=0, mtp=False)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": str(bare), "device": "cpu", "speculative": {"method": "mtp", "num_tokens": 2},
                               "server": {"ipc_socket": str(tmp_path / "s.sock")}}))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([str(repo / "launch.sh"), "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no mtp.* weights" in proc.stderr, proc.stderr


def test_shard_table_covers_every_mtp_key_once(tiny_ckpt):
    from test_shard_policy import checkpoint_shapes

    from ds_qwen_vision.tp_policy import rules_for

    keys = [k for k in checkpoint_shapes(tiny_ckpt) if k.startswith("mtp.")]
    assert len(keys) > 10
    for key in keys:
        assert len(rules_for(key)) == 1, key


def test_a_reused_prefix_brings_the_mtp_heads_kv(tiny_ckpt):
    """The MTP head's KV lives in blocks with the same ids as the model's (one block table for both pools): a
    prompt continued from a snapshot -- the prefix's full blocks shared, its partial last block copied -- has
    the same head KV (and so the same drafts) as one prefilled whole."""
    from ds_qwen_vision.kernels.decode_attention import gather_kv
    from ds_qwen_vision.plan import Prefill, StepPlan

    runner = runner_for(tiny_ckpt, "mtp")
    state, head = runner.state, runner.spec.mtp_state.kv
    assert state.extra_kv is head and head
    p = state.block_size
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(100, 1000, (p + 40,), generator=g).tolist()  # one full block and a partial one
    # both go on with the same token after the snapshot, as every chat turn goes on with <|im_start|> after
    # the previous prompt's (the head's row at L - 1 pairs h(L - 1) with the token at L)
    a = shared + [7] + torch.randint(100, 1000, (9,), generator=g).tolist()
    b = shared + [7] + torch.randint(100, 1000, (13,), generator=g).tolist()
    L, full = len(shared), len(shared) // p
    runner.run(StepPlan(prefill=[Prefill(0, a, end=L, save=7)]))  # slot 0 in its own blocks
    runner.run(StepPlan(prefill=[Prefill(0, a, start=L)]))
    zero, one = state.static_blocks(0), state.static_blocks(1)
    runner.run(StepPlan(prefill=[Prefill(1, b, start=L, restore=7, blocks=zero[:full] + one[full:],
                                         copy_blocks=[(zero[full], one[full])])]))  # b from the snapshot
    runner.run(StepPlan(prefill=[Prefill(2, b)]))  # b whole
    n = len(b) - 1  # the head's pairs (h_i, token_i+1) over the prompt
    for pools in head.values():
        for pool in pools:
            x1, x2 = (gather_kv(pool, state.table[r:r + 1], p)[0, :, :n] for r in (1, 2))
            # fp32; the two prefills cut the GDN chunks at other places, so their sums round apart (~1e-5)
            assert torch.allclose(x1, x2, atol=1e-4)
            assert not torch.equal(x1[:, :L], torch.zeros_like(x1[:, :L]))
    first = runner.run(StepPlan(prefill=[Prefill(3, b)]))[3].argmax()
    drafts = {}
    for slot in (1, 2):
        runner.run(StepPlan(verify=[(slot, [int(first)])]))
        drafts[slot] = runner.verified[slot]
    assert drafts[1] == drafts[2]


def test_steps_without_drafts_run_overlapped(tiny_ckpt):
    """With MTP configured, a step whose sequences do not draft -- a request asking for logprobs never does; on
    random weights the others stop after STOP_EARLY failed verifies -- is a plain step: its picks fed on the
    device (StepPlan.hold off, the next rows FROM_DEVICE) and read while the next step runs. The answers are
    the engine's without speculation."""
    from conftest import OneRank, answers_together
    from ds_qwen_vision.config import LimitsConfig
    from ds_qwen_vision.engine import Engine
    from ds_qwen_vision.plan import FROM_DEVICE
    from test_prefix_cache import engine_request, user

    class Recording(OneRank):
        def __init__(self):
            self.plans = []

        def broadcast(self, plan=None):
            self.plans.append(plan)
            return plan

    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=True)
    requests = [engine_request([user(f"Count from {n}, slowly.")]) | {"max_tokens": 30} for n in range(2)]
    requests.append(engine_request([user("Say something.")]) | {"max_tokens": 20, "logprobs": True})
    answers, plans = {}, {}
    for method in ("none", "mtp"):
        spec = {"method": "mtp", "num_tokens": 2} if method == "mtp" else None
        runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256, speculative=spec)
        channel = Recording()
        engine = Engine(runner, channel, load_processor(tiny_ckpt), LimitsConfig(max_new_tokens=40))
        answers[method] = answers_together(engine, requests)
        plans[method] = [p for p in channel.plans if p.decode or p.verify]
    assert answers["mtp"] == answers["none"] and all(answers["mtp"])
    steps = plans["mtp"]
    assert any(p.verify and p.hold for p in steps)  # drafting, before it stopped
    overlapped = [p for p in steps if p.decode and not p.hold]
    assert overlapped and any(token == FROM_DEVICE for p in overlapped for _, token in p.decode)
    assert not any(p.hold for p in plans["none"])


def test_which_steps_hold_their_tokens():
    """StepPlan.hold (Speculator.holds): a step holds its tokens for the host when it verifies or when a sequence
    in it will draft; a sequence that stopped drafting, or sits in a slot without verify buffers, does not."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from ds_qwen_vision.engine.speculative import SeqSpec, Speculator
    from ds_qwen_vision.plan import FROM_DEVICE, Prefill, StepPlan

    spec = Speculator("mtp", 2, CollectorRegistry(), rows=1)
    running = {0: SimpleNamespace(spec=SeqSpec(drafting=True)), 1: SimpleNamespace(spec=SeqSpec(drafting=True)),
               2: SimpleNamespace(spec=SeqSpec(drafting=False))}
    assert spec.holds(StepPlan(verify=[(0, [5])]), running)
    assert spec.holds(StepPlan(prefill=[Prefill(0, [1, 2, 3])]), running)  # its first token starts its drafts
    assert not spec.holds(StepPlan(prefill=[Prefill(0, [1, 2, 3], end=2)]), running)  # no token yet
    assert not spec.holds(StepPlan(decode=[(1, FROM_DEVICE), (2, FROM_DEVICE)]), running)  # slot 1: no buffers
    assert not spec.holds(StepPlan(decode=[(2, 7)], prefill=[Prefill(1, [1, 2])]), running)
    assert spec.holds(StepPlan(decode=[(0, 7), (2, 7)]), running)


def test_a_draft_vocabulary_drafts_within_it_and_keeps_greedy_exact(setup, tiny_ckpt):
    """speculative.draft_vocab (mtp.DraftHead): the draft is the best of lm_head's rows of its ids (the same
    logits as the whole head's, restricted), the vocabulary is the lowest ids and every added token, and a
    runner drafting from a small one still answers transformers' greedy tokens token for token."""
    from ds_qwen_vision.config import load_config_json
    from ds_qwen_vision.mtp import attach_draft_head, draft_vocabulary

    _, x, expected, _ = setup
    tokenizer = load_processor(tiny_ckpt).tokenizer
    runner = runner_for(tiny_ckpt, "mtp")
    model = runner.model
    vocab = model.config.text_config.vocab_size
    ids = draft_vocabulary(tokenizer, 200, vocab)
    added = sorted(tokenizer.added_tokens_decoder)
    assert ids == list(range(200)) + added and tokenizer.eos_token_id in ids
    assert attach_draft_head(model, tokenizer, tokenizer.vocab_size, "cpu") is not None  # the whole base: refused
    assert attach_draft_head(model, tokenizer, 200, "cpu") is None
    head = model.mtp.draft_head
    h = torch.randn(3, 2, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model.lm_head(h)
        assert torch.equal(head(h), torch.tensor(ids)[full[..., ids].argmax(-1)])
    drafted = []
    head.register_forward_hook(lambda m, a, out: drafted.extend(out.flatten().tolist()))
    stats = {}
    try:
        assert drive(runner, jobs(x), N, chunk=5, stats=stats) == [expected[i] for i in (0, 1, 2, 0)]
    finally:
        del model.mtp.draft_head
    assert stats["drafts"] > 0 and drafted and set(drafted) <= set(ids)
    with pytest.raises(ValueError, match="draft_vocab"):
        load_config_json('{"speculative": {"method": "ngram", "draft_vocab": 1000}}')


@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_a_held_steps_text_goes_out_while_the_next_step_runs(tiny_ckpt, method):
    """A held step's tokens are read and accepted in the step (the next plan needs them), and their text goes
    out after the next step is launched (Engine.deliver_held): every token of a verify is delivered after
    the runner was called for the following step, when there is one. The answers stay the engine's without
    speculation -- with max_tokens counted over tokens not yet delivered, and a stop string that ends a
    sequence in a delivery after its next verify was already launched."""
    from conftest import OneRank, answers_together
    from ds_qwen_vision.config import LimitsConfig
    from ds_qwen_vision.engine import Engine
    from test_prefix_cache import engine_request, user

    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=method == "mtp")
    processor = load_processor(tiny_ckpt)

    def engine_for(spec):
        runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256, speculative=spec)
        return Engine(runner, OneRank(), processor, LimitsConfig(max_new_tokens=40))

    requests = [engine_request([user(f"Repeat after me: one two three, {n}.")]) | {"max_tokens": 33} for n in range(2)]
    plain = answers_together(engine_for(None), requests)
    stop = plain[0][len(plain[0]) // 2:][:3]  # a stop string from the middle of the first answer
    requests.append(requests[0] | {"stop": [stop]})
    plain += answers_together(engine_for(None), requests[2:])
    assert stop not in plain[2] and plain[0].startswith(plain[2])

    engine = engine_for({"method": method, "num_tokens": 3})
    steps, delivered = 0, []  # (the step whose verified tokens, the last step launched when they went out)
    run, accept, deliver_held = engine.runner.run, engine.accept, engine.deliver_held

    def logged_run(plan, pixels=None):
        nonlocal steps
        steps += 1
        return run(plan, pixels)

    def logged_accept(plan, logits):
        held = accept(plan, logits)
        if held is not None:
            held.step = steps
        return held

    def logged_deliver_held():
        if engine.held is not None and engine.held.verified:
            delivered.append((engine.held.step, steps))
        deliver_held()

    engine.runner.run, engine.accept, engine.deliver_held = logged_run, logged_accept, logged_deliver_held
    answers = answers_together(engine, requests)
    assert answers == plain
    assert delivered and all(out > step for step, out in delivered if step != steps), delivered
