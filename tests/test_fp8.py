"""Qwen's block-wise FP8 checkpoints (ds_qwen_vision/fp8.py): loaded at tp=1 and tp=2 through the product's path,
against transformers running the same checkpoint with its weights dequantized here, independently (float32).

Checkpoints: the tiny bf16-format one quantized block-wise as Qwen's files are (checkpoint.quantize_fp8_checkpoint,
modules_to_not_convert named in full): blocks of 64 (every tp=2 cut of the tiny widths falls on a block
boundary), and blocks of 128 with an MLP of 320 (a partial last block; its tp=2 cut of 160 falls inside a
block, which is refused).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen3_5ForConditionalGeneration

from ds_qwen_vision.checkpoint import PRESETS, build_checkpoint, quantize_fp8_checkpoint
from ds_qwen_vision.fp8 import FP8, Fp8Format, scale_cut
from ds_qwen_vision.kernels.projections import fused_projection
from ds_qwen_vision.loading import CheckpointError, checkpoint_files
from ds_qwen_vision.model import chat_inputs, load_model, load_processor
from ds_qwen_vision.tp_policy import FUSED_PROJECTIONS, fused_weight
from ranks import launch

TOL = 1e-5
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj",
           "down_proj"}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequantized_state(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 checkpoint in float32, each FP8 weight multiplied by its scale block by block
    (written here as the format defines it, not with the product's code)."""
    tensors = {}
    for path in checkpoint_files(ckpt):
        tensors.update(load_file(path))
    block = json.loads((ckpt / "config.json").read_text())["quantization_config"]["weight_block_size"]
    out = {}
    for key, t in tensors.items():
        if key.endswith(".weight_scale_inv"):
            continue
        t = t.float()
        scale = tensors.get(key.removesuffix(".weight") + ".weight_scale_inv")
        if scale is not None:
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    t[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale[i, j]
        out[key] = t
    return out


def reference(ckpt, tmp):
    """transformers on the dequantized weights: a float32 checkpoint without quantization_config."""
    ref_dir = tmp / f"{ckpt.name}-dequantized"
    if not ref_dir.exists():
        shutil.copytree(ckpt, ref_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
        cfg = json.loads((ref_dir / "config.json").read_text())
        del cfg["quantization_config"]
        (ref_dir / "config.json").write_text(json.dumps(cfg))
        state = dequantized_state(ckpt)
        save_file(state, ref_dir / "model.safetensors", metadata={"format": "pt"})
    model = Qwen3_5ForConditionalGeneration.from_pretrained(ref_dir, dtype=torch.float32).eval()
    return model, ref_dir


@pytest.fixture(scope="module")
def fp8_ckpts(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    PRESETS.setdefault("tiny-mlp320", copy.deepcopy(PRESETS["tiny"]))["text"]["intermediate_size"] = 320
    wide = build_checkpoint(tmp / "tiny-mlp320", preset="tiny-mlp320", seed=1)
    return {64: quantize_fp8_checkpoint(tiny_ckpt, tmp / "tiny-fp8-64", block=(64, 64)),
            128: quantize_fp8_checkpoint(wide, tmp / "tiny-mlp320-fp8-128", block=(128, 128)), "tmp": tmp}


def case(image_files):
    return {"name": "image+text", "images": image_files[:1],
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]}


@pytest.mark.parametrize("block", [64, 128])
def test_tp1_equals_transformers_on_the_dequantized_weights(fp8_ckpts, image_files, block):
    """Every converted linear (and only those) holds e4m3 and its scales, gives the dequantized weight's output,
    and the whole model's logits and greedy tokens are transformers' on the dequantized checkpoint."""
    ckpt = fp8_ckpts[block]
    ours = load_model(str(ckpt), 1, "cpu", torch.float32, show_progress=False, mtp=True)
    ref, _ = reference(ckpt, fp8_ckpts["tmp"])
    state = dequantized_state(ckpt)
    converted = {n for n, p in ours.named_parameters() if p.dtype == FP8}
    assert {n.split(".")[-2] for n in converted} == LINEARS
    assert any(n.startswith("mtp.layers.0.") for n in converted)  # the MTP head's linears too, with their scales
    for name in converted:  # every converted module against its dequantized weight
        w, x = state[name], torch.randn(3, 5, state[name].shape[1])
        assert rel(ours.get_submodule(name.removesuffix(".weight"))(x), x @ w.T) <= TOL, name
    # the decode step's fused projections: the attention's q|k|v and the MLP's gate|up are one FP8 weight and
    # scale each, whose rows are the members' own (not the GDN group, with bf16 in_proj_b / in_proj_a, nor the
    # MLP of 320 rows in blocks of 128: a member ending inside a block)
    for layer in ours.model.language_model.layers:
        for kind, members in FUSED_PROJECTIONS.items():
            parent = getattr(layer, kind, None)
            if parent is None:
                continue
            fused = fused_weight(parent)
            whole = all(getattr(parent, m).weight.shape[0] % block == 0 for m in members)
            assert (fused is None) == (kind == "linear_attn" or not whole), (kind, block)
            if fused is not None:
                assert fused.dtype == FP8
                x = torch.randn(2, 1, fused.shape[1])
                for got, m in zip(fused_projection(parent, x, members), members):
                    assert rel(got, getattr(parent, m)(x)) <= TOL
    processor = load_processor(str(ckpt))
    c = case(image_files)
    inputs = chat_inputs(processor, c["messages"], [open(p, "rb").read() for p in c["images"]])
    with torch.inference_mode():
        assert rel(ours(**inputs).logits, ref(**inputs).logits) <= TOL
        mine = ours.generate(**inputs, max_new_tokens=8, do_sample=False)
        want = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(mine, want)


def test_tp2_equals_transformers_on_the_dequantized_weights(fp8_ckpts, image_files, tmp_path):
    """Two DeepSpeed CPU ranks: each rank's FP8 shard and its scales cut in block units, the row-parallel
    layers' partial outputs all-reduced: logits and greedy tokens as single-process transformers on the
    dequantized checkpoint."""
    ckpt = fp8_ckpts[64]
    c = case(image_files)
    spec = {"model": str(ckpt), "new_tokens": 6, "out": str(tmp_path), "cases": [c]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(2, [str(Path(__file__).parent / "tp_worker.py"), str(tmp_path / "spec.json")])
    ref, _ = reference(ckpt, fp8_ckpts["tmp"])
    inputs = chat_inputs(load_processor(str(ckpt)), c["messages"], [open(p, "rb").read() for p in c["images"]])
    with torch.inference_mode():
        want = ref(**inputs).logits
        tokens = ref.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert rel(result["cases"][0]["logits"], want) <= TOL
        assert torch.equal(result["cases"][0]["tokens"], tokens)


def test_a_tp_that_cuts_a_block_is_refused(fp8_ckpts):
    """The MLP of 320 in blocks of 128: tp=2 would cut at 160, inside a scale block."""
    model = load_model(str(fp8_ckpts[128]), 1, "cpu", torch.float32, show_progress=False)
    name = "model.language_model.layers.0.mlp.gate_proj.weight"
    assert scale_cut(model, name, 1, 0, (128, 128)) == (None, None)
    with pytest.raises(ValueError, match="falls inside a 128-wide FP8 scale block"):
        scale_cut(model, name, 2, 0, (128, 128))
    # the blocks of 64 split the tiny widths at tp=2: the GDN projection per segment, in block units
    small = load_model(str(fp8_ckpts[64]), 1, "cpu", torch.float32, show_progress=False)
    assert scale_cut(small, "model.language_model.layers.0.linear_attn.in_proj_qkv.weight", 2, 1, (64, 64)) == \
        (0, [(1, 2), (3, 4), (7, 10)])  # rows [64,128) [192,256) [448,640)


def test_the_launcher_refuses_a_tp_that_cuts_a_block(fp8_ckpts):
    """Before any rank starts (launch.sh's checks, exit 2): the blocks of 128 do not split the MLP of 320 at tp=2,
    nor the 128 rows of k/v (64 a rank), but do split q (768 a rank); the blocks of 64 split the tiny widths;
    an unserved format is named."""
    from ds_qwen_vision.launcher import heads_problems

    problems = heads_problems(fp8_ckpts[128], 2)
    assert problems and all("falls inside a 128-wide FP8 scale block" in p for p in problems)
    assert any("mlp.gate_proj" in p for p in problems) and any("self_attn.k_proj" in p for p in problems)
    assert not any("q_proj" in p for p in problems)
    assert heads_problems(fp8_ckpts[128], 1) == [] and heads_problems(fp8_ckpts[64], 2) == []
    cfg = json.loads((fp8_ckpts[64] / "config.json").read_text())
    bad = fp8_ckpts["tmp"] / "static-scheme"
    bad.mkdir(exist_ok=True)
    cfg["quantization_config"]["activation_scheme"] = "static"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert any("activation_scheme 'static'" in p for p in heads_problems(bad, 1))


def test_format_and_loader_traps(fp8_ckpts, tmp_path):
    """What the config must say, and what the files must hold: a scale left out, or a converted weight whose
    module the config keeps in bf16, is an error naming the tensor (never an FP8 weight read without its scale)."""
    config = AutoConfig.from_pretrained(fp8_ckpts[64])
    fmt = Fp8Format.from_config(config)
    assert fmt.block == (64, 64) and not fmt.converts("model.language_model.layers.0.linear_attn.in_proj_a")
    assert fmt.converts("model.language_model.layers.0.linear_attn.in_proj_qkv")
    for bad, match in (({"quant_method": "awq"}, "quant_method"),
                       ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size"),
                       ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
                        "activation_scheme")):
        config.quantization_config = bad
        with pytest.raises(ValueError, match=match):
            Fp8Format.from_config(config)
    # a scale left out of the files
    broken = shutil.copytree(fp8_ckpts[64], tmp_path / "no-scale")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    key = "model.language_model.layers.1.mlp.down_proj.weight_scale_inv"
    shard = broken / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensors: .*down_proj.weight_scale_inv"):
        load_model(str(broken), 1, "cpu", torch.float32, show_progress=False)
    # the config keeps a converted module in bf16: its FP8 weight is never cast without its scale
    lying = shutil.copytree(fp8_ckpts[64], tmp_path / "lying")
    cfg = json.loads((lying / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].append("model.language_model.layers.0.mlp.gate_proj")
    (lying / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layers.0.mlp.gate_proj.weight is stored as F8_E4M3"):
        load_model(str(lying), 1, "cpu", torch.float32, show_progress=False)


def test_served_from_an_fp8_checkpoint(fp8_ckpts):
    """Through the engine (chunked prefill, decode graphs' CPU path, prefix reuse): transformers' greedy answers
    on the dequantized checkpoint."""
    from test_prefix_cache import IMG_A, Harness, Reference, assistant, img, user

    from ds_qwen_vision.config import CacheConfig

    _, ref_dir = reference(fp8_ckpts[64], fp8_ckpts["tmp"])
    ref = Reference(str(ref_dir))
    h = Harness(str(fp8_ckpts[64]), ref.processor, CacheConfig(prefix_bytes=1 << 30, image_bytes=1 << 28), chunk=32)
    try:
        turn1 = [user(img(IMG_A), "What is in this picture?")]
        turn2 = turn1 + [assistant("Noise."), user("Say it again.")]
        assert h.ask(turn1)[0] == ref.answer(turn1)
        text, usage = h.ask(turn2)
        assert text == ref.answer(turn2) and usage["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        h.stop()


def test_the_shipped_fp8_config_starts_with_its_memory_plan(fp8_ckpts, tmp_path_factory):
    """ds_config/qwen3.6-27b-fp8-2gpu.json as shipped (tp=2, MTP speculation), changed only where a CPU test must
    (the tiny FP8 checkpoint, CPU ranks in float32, no API key, limits that keep warm-up small): launch.sh starts
    it, rank 0 logs the memory planner's capacity, and a greedy request is answered as on the bf16 path."""
    from chat_http import chat, get, post
    from server_fixture import start_server

    shipped = json.loads((Path(__file__).parents[1] / "ds_config" / "qwen3.6-27b-fp8-2gpu.json").read_text())
    del shipped["server"]["ipc_socket"], shipped["server"]["port"]  # the fixture's own, per test
    config = shipped | {"model": str(fp8_ckpts[64]), "device": "cpu", "dtype": "float32",
                        "security": shipped["security"] | {"api_key_env": None},
                        "limits": shipped["limits"] | {"max_prompt_tokens": 512, "max_new_tokens": 16}}
    server = start_server(tmp_path_factory.mktemp("fp8-shipped"), config)
    try:
        assert server.config["tensor_parallel"]["tp_size"] == 2 and server.config["speculative"]["method"] == "mtp"
        plan = [line for line in server.log(None).splitlines() if "[rank 0] memory plan: KV capacity:" in line]
        assert plan, server.log()
        print(plan[-1])
        model = json.loads(get(server.base_url, "/v1/models").body)["data"][0]["id"]
        reply = post(server.base_url, chat(model, "Hello there.", max_tokens=8, temperature=0, ignore_eos=True))
        assert reply.status == 200, reply.body
        assert json.loads(reply.body)["usage"]["completion_tokens"] == 8
    finally:
        assert server.stop() == 0, server.log()


def test_quantizing_in_place_of_the_source(tiny_ckpt, tmp_path):
    """consume=True (a disk that cannot hold both): the source stops being a checkpoint before its shards go, one
    by one; the copy is complete, loads, and a second call reuses it."""
    import shutil as sh

    from ds_qwen_vision.checkpoint import MARKER_FILE

    src = tmp_path / "bf16"
    sh.copytree(tiny_ckpt, src)
    out = quantize_fp8_checkpoint(src, tmp_path / "fp8", block=(64, 64), consume=True)
    assert not (src / MARKER_FILE).exists() and not list(src.glob("*.safetensors"))
    assert (out / MARKER_FILE).exists()
    keep = quantize_fp8_checkpoint(tiny_ckpt, tmp_path / "fp8-kept", block=(64, 64))
    for a, b in zip(sorted(out.glob("*.safetensors")), sorted(keep.glob("*.safetensors"))):
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k].view(torch.uint8) if x[k].dtype == FP8 else x[k],
                                                        y[k].view(torch.uint8) if y[k].dtype == FP8 else y[k])
                                            for k in x)
    stamp = (keep / "config.json").stat().st_mtime_ns
    assert quantize_fp8_checkpoint(tiny_ckpt, keep, block=(64, 64)) == keep  # reused, not written again
    assert (keep / "config.json").stat().st_mtime_ns == stamp
    model = load_model(str(out), 1, "cpu", torch.float32, show_progress=False)
    assert model is not None


def test_steps_take_the_w8a16_kernel_where_the_block_scaled_gemm_does_not_serve(fp8_ckpts, monkeypatch):
    """A card whose cuBLASLt lacks the 128 x 128 recipe (Blackwell's block scaling is MXFP8) may still run the
    W8A16 Triton kernel: the two probes decide apart (fp8.probe_gemm, use_gemm), so steps of up to 16 rows read
    FP8 weights there and longer ones dequantize. Here the probe's answers are given and the kernel is a
    recording stand-in with the reference arithmetic (CPU has no Triton kernel)."""
    from ds_qwen_vision import fp8
    from ds_qwen_vision.fp8 import CHOSEN, converted_linears, use_gemm
    from ds_qwen_vision.kernels import fp8_linear

    model = load_model(str(fp8_ckpts[128]), 1, "cpu", torch.bfloat16, show_progress=False)
    names = converted_linears(model, Fp8Format.from_config(model.config))
    calls = []

    def stand_in(x2d, weight, scale_inv, tiles=None):
        calls.append(x2d.shape[0])
        return x2d @ fp8.dequantize(weight, scale_inv, (128, 128), x2d.dtype).T

    monkeypatch.setattr(fp8, "probe_gemm", lambda device, dtype: ("no 128 x 128 recipe on this card", None))
    monkeypatch.setattr(fp8_linear, "w8a16_matmul", stand_in)
    monkeypatch.setattr(CHOSEN, "w8a16", False)
    use_gemm(model, names)
    assert CHOSEN.w8a16 is True and not any(m.fp8_gemm for m in names.values())
    layer = next(iter(names.values()))
    want = fp8.dequantize(layer.weight, layer.weight_scale_inv, (128, 128), torch.bfloat16)
    for rows, through_kernel in ((1, True), (16, True), (17, False)):
        calls.clear()
        x = torch.randn(1, rows, layer.weight.shape[1], dtype=torch.bfloat16)
        assert torch.equal(layer(x), x @ want.T), rows
        assert calls == ([rows] if through_kernel else []), (rows, calls)
    monkeypatch.setattr(fp8, "probe_gemm", lambda device, dtype: ("no 128 x 128 recipe", "no e4m3 in this Triton"))
    use_gemm(model, names)
    assert CHOSEN.w8a16 is False
