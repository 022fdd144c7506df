"""Fused projections and forwards (kernels/, tp_policy.fuse_projections) against transformers' own modules,
float32 on CPU: per layer kind, the whole model, the loader's fused weights, tp=2, and the decode-attention
kernel (Triton's interpreter on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from ds_qwen_vision.kernels.decode_attention import reference_attention
from ds_qwen_vision.kernels.layers import install_fused_forwards
from ds_qwen_vision.kernels.projections import gdn_in_proj
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.tp_policy import FUSED_PROJECTIONS, fused_weight, gdn_segments, rule_for, shard_tensor
from ranks import launch

TOL = 1e-5


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    ours = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    install_fused_forwards(ours)
    for m in (ref, ours):
        m.config.text_config._attn_implementation = "sdpa"
    return ref, ours


def layer_of(model, kind):
    return next(layer for layer in model.model.language_model.layers if hasattr(layer, kind))


def test_loader_fills_fused_weights_with_the_checkpoint(models):
    ref, ours = models
    expected = ref.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, expected[name]), name
    for layer in ours.model.language_model.layers:
        for kind, members in FUSED_PROJECTIONS.items():
            parent = getattr(layer, kind, None)
            if parent is None:
                continue
            fused = fused_weight(parent)
            assert fused is not None, kind
            assert torch.equal(fused, torch.cat([getattr(parent, m).weight for m in members]))
            # the members are its storage, not copies: a write to the fused weight is seen by the member
            first = getattr(parent, members[0]).weight
            assert first.data_ptr() == fused.data_ptr()


def test_fused_weight_refused_once_a_member_is_replaced(tiny_ckpt):
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    mlp = model.model.language_model.layers[0].mlp
    assert fused_weight(mlp) is not None
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().clone())
    assert fused_weight(mlp) is None  # the projection then runs its members one by one


@torch.no_grad()
def test_gdn_in_proj_matches_the_four_projections(models):
    ref, ours = models
    g_ref, g_ours = layer_of(ref, "linear_attn").linear_attn, layer_of(ours, "linear_attn").linear_attn
    x = torch.randn(3, 5, ref.config.text_config.hidden_size)
    got = gdn_in_proj(g_ours, x)
    want = (g_ref.in_proj_qkv(x), g_ref.in_proj_z(x), g_ref.in_proj_b(x), g_ref.in_proj_a(x))
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel(g, w) <= TOL


@torch.no_grad()
def test_mlp_matches(models):
    ref, ours = models
    x = torch.randn(2, 5, ref.config.text_config.hidden_size)
    assert rel(layer_of(ours, "mlp").mlp(x), layer_of(ref, "mlp").mlp(x)) <= TOL


@pytest.mark.parametrize("kind", ["linear_attn", "self_attn"])
@torch.no_grad()
def test_decoder_layer_matches(models, kind):
    """The whole decoder layer (fused add + RMSNorm, MLP, and for attention its fused q|k|v and gate)."""
    ref, ours = models
    lm_ref = ref.model.language_model
    x = torch.randn(2, 8, ref.config.text_config.hidden_size)
    pos = torch.arange(8).view(1, 1, -1).expand(3, 2, -1)
    emb = lm_ref.rotary_emb(x, pos)
    want = layer_of(ref, kind)(x, position_embeddings=emb)
    got = layer_of(ours, kind)(x, position_embeddings=emb)
    assert rel(got, want) <= TOL


@torch.no_grad()
def test_whole_model_logits_match(models, tiny_ckpt):
    """A prompt's logits through the fused forwards (prefill runs them too) equal transformers'."""
    ref, ours = models
    processor = load_processor(tiny_ckpt)
    from conftest import make_image
    x = chat_inputs(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
                    [make_image(40, 56)])
    from ds_qwen_vision.kernels.decode_attention import MAX_QUERY_TOKENS

    assert x["input_ids"].shape[1] > MAX_QUERY_TOKENS  # a prefill's length, past the decode kernel's
    assert rel(ours(**x).logits, ref(**x).logits) <= TOL


@pytest.mark.parametrize("t", [1, 3, 8])
def test_decode_attention_reference_matches_sdpa(t):
    """The CPU path of decode attention (1..8 query tokens, GQA, over a paged cache through a shuffled block
    table) against PyTorch's SDPA on each row's gathered contiguous keys and values, masked by position."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from ds_qwen_vision.kernels.decode_attention import PagedKV, gather_kv

    torch.manual_seed(t)
    b, hq, hkv, d, block_size, blocks = 2, 6, 2, 32, 8, 5
    q = torch.randn(b, t, hq, d).transpose(1, 2)
    key_pool, value_pool = (torch.randn(1 + b * blocks, hkv, block_size, d) for _ in range(2))
    table = (torch.randperm(b * blocks) + 1).view(b, blocks).to(torch.int32)  # block 0: the null block
    table[0, 2:] = 0  # row 0 holds 16 positions
    qpos = torch.tensor([3, 20])[:, None] + torch.arange(t)  # [b, t]
    k, v = gather_kv(key_pool, table, block_size), gather_kv(value_pool, table, block_size)  # [b, hkv, L, d]
    assert torch.equal(k[1, :, block_size:2 * block_size], key_pool[table[1, 1]])
    mask = (torch.arange(blocks * block_size) <= qpos[:, :, None])[:, None]  # [b, 1, t, L]
    want = sdpa(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask).transpose(1, 2)
    got = reference_attention(q, key_pool, value_pool, PagedKV(table, qpos, block_size), d ** -0.5)
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("script", [
    "_decode_attention_interp.py",  # decode attention (split-KV) and prefill-chunk attention against float64
    "_gdn_step_interp.py",  # the GDN step's conv update and gated delta rule against their torch reference
    "_fp8_linear_interp.py",  # the FP8 linears' activation quantization and W8A16 matmul against fp8.py's
])
def test_triton_kernels_under_interpreter(script):
    """The Triton kernels on CPU (TRITON_INTERPRET=1), each script against its reference."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_tp2_fused_forwards_and_weights(tiny_ckpt, image_files, tmp_path):
    """tp=2 DeepSpeed CPU ranks with the fused forwards: logits as single-process transformers, and each
    rank's fused weight is exactly the shard table's cut of every member, concatenated."""
    from transformers import AutoConfig

    case = {"name": "image+text", "images": image_files[:1],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]}
    spec = {"model": tiny_ckpt, "new_tokens": 4, "out": str(tmp_path), "cases": [case], "fused": True}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(2, [str(Path(__file__).parent / "tp_worker.py"), str(tmp_path / "spec.json")])
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    x = chat_inputs(load_processor(tiny_ckpt), case["messages"], [open(p, "rb").read() for p in case["images"]])
    with torch.inference_mode():
        want = ref(**x).logits
    full = ref.state_dict()
    segments = gdn_segments(AutoConfig.from_pretrained(tiny_ckpt).text_config)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert rel(result["cases"][0]["logits"], want) <= TOL
        assert result["fused"], "no fused weights reported"
        for (layer, kind), fused in result["fused"].items():
            prefix = f"model.language_model.layers.{layer}.{kind}."
            cuts = [shard_tensor(full[prefix + m + ".weight"], rule_for(prefix + m + ".weight"), 2, rank, segments)
                    for m in FUSED_PROJECTIONS[kind]]
            assert torch.equal(fused, torch.cat(cuts)), (layer, kind, rank)


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_speculative_steps_through_fused_forwards(tiny_ckpt, method):
    """fuse=True on CPU (fused forwards, their eager chains; the MTP head's layer fused too): speculative
    verify steps of T = k + 1 tokens (decode attention over 1..8 query tokens) give transformers' greedy
    tokens, with forced acceptance of every length for ngram."""
    from driver import drive

    from ds_qwen_vision.runner import ModelRunner

    n, k = 10, 3
    processor = load_processor(tiny_ckpt)
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    x = chat_inputs(processor, [{"role": "user", "content": "Say something about the sea, twice over."}], [])
    with torch.inference_mode():
        want = ref.generate(**x, max_new_tokens=n + k, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False, mtp=method == "mtp")
    runner = ModelRunner(model, torch.device("cpu"), max_slots=2, max_len=256, fuse=True,
                         speculative={"method": method, "num_tokens": k})
    if method == "mtp":
        assert fused_weight(model.mtp.layers[0].mlp) is not None
    stats = {}
    extra = {"oracle": [want], "profile": (0.88, 0.77 / 0.88, 0.66 / 0.77)} if method == "ngram" else {}
    assert drive(runner, [(0, x)], n, chunk=5, stats=stats, **extra) == [want[:n]]
    assert stats["drafts"] > 0


def test_chunked_prefill_through_fused_forwards(tiny_ckpt):
    """fuse=True on CPU: a prompt prefilled in chunks of 20 tokens (attention over the paged cache, past the
    decode kernel's 8 query tokens) through the fused forwards gives transformers' greedy tokens."""
    from driver import drive

    from ds_qwen_vision.runner import ModelRunner

    n = 8
    processor = load_processor(tiny_ckpt)
    ref = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    x = chat_inputs(processor, [{"role": "user", "content": "Tell me three things about the moon, slowly."}], [])
    assert x["input_ids"].shape[1] > 20
    with torch.inference_mode():
        want = ref.generate(**x, max_new_tokens=n, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
    model = load_model(tiny_ckpt, 1, "cpu", torch.float32, show_progress=False)
    runner = ModelRunner(model, torch.device("cpu"), max_slots=2, max_len=256, fuse=True)
    assert drive(runner, [(0, x)], n, chunk=20) == [want]
