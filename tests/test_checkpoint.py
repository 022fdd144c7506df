"""Tests for ds_qwen_vision.checkpoint: the tiny random Qwen3.5/3.6-VL checkpoint builder.

One tiny checkpoint is built per module (a few seconds on CPU) and every test reads it the
way the server reads a real Hub download: through transformers' from_pretrained / Auto*
classes and the safetensors index.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ds_qwen_vision import checkpoint as ckpt
from ds_qwen_vision.model import load_processor

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ckpt.build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import Qwen3_5ForConditionalGeneration

    return Qwen3_5ForConditionalGeneration.from_pretrained(tiny_dir).eval()


def _index(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(set(_index(directory)["weight_map"].values())):
        tensors.update(load_file(directory / shard))
    return tensors


# ---------------------------------------------------------------------------------------------
# Layout and weights
# ---------------------------------------------------------------------------------------------


def test_directory_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for required in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        ckpt.MARKER_FILE,
    ]:
        assert required in names, required
    # No leftovers of the temporary build directory next to the checkpoint.
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]

    shards = set(_index(tiny_dir)["weight_map"].values())
    assert len(shards) >= 3
    assert shards == {n for n in names if n.endswith(".safetensors")}
    # Whole checkpoint stays small enough for quick CPU tests.
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 16e6


def test_config_json_matches_real_schema(tiny_dir, tokenizer):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["model_type"] == "qwen3_5"
    assert config["text_config"]["model_type"] == "qwen3_5_text"
    assert config["vision_config"]["model_type"] == "qwen3_5_vision"
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert config[key] == tokenizer.convert_tokens_to_ids(token), key
    rope = config["text_config"]["rope_parameters"]
    assert rope["rope_type"] == "default" and rope["mrope_interleaved"] is True
    assert rope["partial_rotary_factor"] == 0.25 and rope["rope_theta"] == 10000000

    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == ids
    assert generation["pad_token_id"] == ids[1]
    # Qwen3.6's sampling defaults, which the server applies to requests that leave them out.
    assert (generation["do_sample"], generation["temperature"], generation["top_p"], generation["top_k"]) == \
        (True, 0.6, 0.95, 20)


def test_loads_without_missing_or_unexpected_keys(tiny_dir):
    from transformers import Qwen3_5ForConditionalGeneration

    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    stored = _all_tensors(tiny_dir)
    state = model.state_dict()
    # transformers has no module for the MTP head and ignores its keys (_keys_to_ignore_on_load_unexpected)
    mtp = {k for k in stored if k.startswith("mtp.")}
    assert set(stored) - mtp == set(state)
    # Qwen3.6-27B's names and shapes: fc [hidden, 2*hidden], three norms, one gated full-attention layer
    c = model.config.text_config
    assert c.mtp_num_hidden_layers == 1 and c.mtp_use_dedicated_embeddings is False
    assert tuple(stored["mtp.fc.weight"].shape) == (c.hidden_size, 2 * c.hidden_size)
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        assert tuple(stored[f"mtp.{name}.weight"].shape) == (c.hidden_size,)
    full = "model.language_model.layers.3."  # a full-attention layer: the MTP layer has its sub-names and shapes
    layer = {k[len(full):]: v.shape for k, v in stored.items() if k.startswith(full)}
    assert {k[len("mtp.layers.0."):]: v.shape for k, v in stored.items() if k.startswith("mtp.layers.0.")} == layer
    assert len(mtp) == 4 + len(layer)
    # Official key names, e.g. the Gated DeltaNet fused projection and the vision tower.
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in stored
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in stored
    assert "model.visual.blocks.0.attn.qkv.weight" in stored
    assert "model.visual.merger.linear_fc2.weight" in stored
    assert "lm_head.weight" in stored
    for name, tensor in stored.items():
        assert tensor.dtype == torch.float32, name
        assert name in mtp or torch.equal(state[name], tensor), name
        # Re-randomised: no constant (all zeros / all ones) parameter survives.
        assert tensor.numel() == 1 or tensor.std() > 0, name
    assert not torch.equal(stored["lm_head.weight"], stored["model.language_model.embed_tokens.weight"])


def test_same_seed_is_byte_identical_other_seed_differs(tiny_dir, tmp_path):
    same = ckpt.build_checkpoint(tmp_path / "same", preset="tiny", seed=0)
    other = ckpt.build_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    for path in tiny_dir.iterdir():
        assert path.read_bytes() == (same / path.name).read_bytes(), path.name
    shards = sorted(p.name for p in tiny_dir.glob("*.safetensors"))
    assert shards == sorted(p.name for p in other.glob("*.safetensors"))
    for name in shards:
        assert (tiny_dir / name).read_bytes() != (other / name).read_bytes(), name
    # The tokenizer does not depend on the seed.
    assert (tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_cache_reuse_and_rebuild(tmp_path):
    out = ckpt.build_checkpoint(tmp_path / "c", preset="tiny", seed=3)
    marker = out / ckpt.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    assert ckpt.build_checkpoint(out, preset="tiny", seed=3) == out
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt

    # A different seed replaces the cached build.
    ckpt.build_checkpoint(out, preset="tiny", seed=4)
    assert json.loads(marker.read_text())["seed"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c"]

    # A directory holding something else is never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ckpt.build_checkpoint(foreign, preset="tiny", seed=0)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_built_on_a_device_in_its_dtype(tiny_dir, tmp_path):
    """device=...: weights made there in the target dtype (the benchmarks' 27B-shaped checkpoints, on a
    GPU): the same files, keys, shapes and dtypes as the CPU build; its own cache entry; loads through
    the same code path."""
    from ds_qwen_vision.model import load_model

    out = ckpt.build_checkpoint(tmp_path / "dev", preset="tiny", seed=0, dtype=torch.bfloat16, device="cpu")
    ref = ckpt.build_checkpoint(tmp_path / "ref", preset="tiny", seed=0, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert json.loads((out / ckpt.MARKER_FILE).read_text())["built_on"] == "cpu"
    assert "built_on" not in json.loads((ref / ckpt.MARKER_FILE).read_text())
    for shard in sorted(ref.glob("*.safetensors")):
        a, b = load_file(out / shard.name), load_file(shard)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype == torch.bfloat16, name
            assert a[name].float().std() > 0, name
    model = load_model(str(out), 1, "cpu", torch.float32, show_progress=False)
    assert torch.isfinite(next(model.parameters())).all()


def test_cli_prints_path_and_uses_cache(tiny_dir):
    result = subprocess.run(
        [sys.executable, "-m", "ds_qwen_vision.checkpoint", "--out", str(tiny_dir), "--preset", "tiny", "--seed", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    assert result.stdout.strip() == str(tiny_dir)


# ---------------------------------------------------------------------------------------------
# Model shape: the real Qwen3.6-27B ratios
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "loadtest"])
def test_config_keeps_real_ratios(preset):
    config = ckpt.make_config(preset)
    text, vision = config.text_config, config.vision_config
    assert text.linear_num_value_heads == 3 * text.linear_num_key_heads
    assert text.num_attention_heads == 6 * text.num_key_value_heads
    assert text.layer_types == [
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(text.num_hidden_layers)
    ]
    assert text.linear_conv_kernel_dim == 4
    assert not config.tie_word_embeddings and not text.tie_word_embeddings
    rope = text.rope_parameters
    assert rope["partial_rotary_factor"] == 0.25 and rope["mrope_interleaved"]
    assert sum(rope["mrope_section"]) * 2 == int(text.head_dim * rope["partial_rotary_factor"])
    assert vision.out_hidden_size == text.hidden_size
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (16, 2, 2)
    assert int(vision.num_position_embeddings**0.5) ** 2 == vision.num_position_embeddings
    # Every sharded dimension splits evenly at tp = 2 and 4.
    for tp in (2, 4):
        for count in (
            text.num_attention_heads,
            text.num_key_value_heads,
            text.linear_num_key_heads,
            text.linear_num_value_heads,
            text.intermediate_size,
            text.vocab_size,
            vision.num_heads,
            vision.intermediate_size,
        ):
            assert count % tp == 0
    assert text.vocab_size % 64 == 0 and text.vocab_size >= ckpt.token_ids()["__len__"]


def test_tiny_preset_sizes():
    text = ckpt.make_config("tiny").text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (128, 8, 32)
    assert (text.num_attention_heads, text.num_key_value_heads) == (24, 4)
    assert (text.linear_num_key_heads, text.linear_num_value_heads) == (4, 12)


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------


def test_tokenizer(tokenizer):
    assert type(tokenizer).__name__ == "Qwen3_5Tokenizer"
    assert 1000 <= len(tokenizer) <= 2100
    assert len(tokenizer) == ckpt.token_ids()["__len__"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None

    added = [text for text, _ in ckpt.ADDED_TOKENS]
    ids = tokenizer.convert_tokens_to_ids(added)
    assert ids == list(range(ids[0], ids[0] + len(added)))  # contiguous, real order
    # Special tokens are atomic in text and dropped by skip_special_tokens; the think / tool
    # markers are plain added tokens, kept like in the real tokenizer.
    for text, special in ckpt.ADDED_TOKENS:
        encoded = tokenizer.encode(f"a{text}b", add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids(text) in encoded, text
        assert (text in tokenizer.decode(encoded, skip_special_tokens=True)) != special, text

    # Multi-byte characters: byte-level round trip, and some characters need several tokens.
    sample = "Hello wörld, 你好，世界！ naïve café 😀🎉 👨‍👩‍👧 Привет"
    encoded = tokenizer.encode(sample, add_special_tokens=False)
    assert tokenizer.decode(encoded) == sample
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("😀", add_special_tokens=False)]
    assert len(pieces) > 1 and "".join(pieces) != "😀"  # split inside the UTF-8 sequence


def test_chat_template_text(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    no_think = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == prompt + "\n</think>\n\n"
    think = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert think == prompt
    bare = tokenizer.apply_chat_template(messages, tokenize=False)
    assert bare == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"


def test_chat_template_images_and_video(tokenizer):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Compare with"},
                {"type": "image_url", "image_url": {"url": "http://example.com/b.png"}},
                {"type": "video"},
            ],
        }
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    assert prompt == f"<|im_start|>user\n{image}Compare with{image}{video}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    numbered = tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert f"Picture 1: {image}Compare withPicture 2: {image}Video 1: {video}" in numbered


def test_chat_template_multi_turn_strips_old_reasoning(tokenizer):
    messages = [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nFirst answer."},
        {"role": "user", "content": [{"type": "text", "text": "Second?"}]},
        {"role": "assistant", "content": "Second answer.", "reasoning_content": "new reasoning"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nFirst?<|im_end|>\n"
        "<|im_start|>assistant\nFirst answer.<|im_end|>\n"
        "<|im_start|>user\nSecond?<|im_end|>\n"
        # After the last user query the reasoning is kept.
        "<|im_start|>assistant\n<think>\nnew reasoning\n</think>\n\nSecond answer.<|im_end|>\n"
    )
    kept = tokenizer.apply_chat_template(messages, tokenize=False, preserve_thinking=True)
    assert "<|im_start|>assistant\n<think>\nold reasoning\n</think>\n\nFirst answer.<|im_end|>" in kept

    follow_up = messages[:2] + [{"role": "user", "content": "Again"}]
    prompt = tokenizer.apply_chat_template(follow_up, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith(
        "<|im_start|>assistant\nFirst answer.<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_chat_template_tools(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n# Tools\n")
    assert '"name": "get_weather"' in rendered and "Be brief.<|im_end|>\n" in rendered
    assert (
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    ) in rendered


# ---------------------------------------------------------------------------------------------
# Processor and model
# ---------------------------------------------------------------------------------------------


def _image_messages(*images):
    parts = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "What is in these pictures?"}]}]


def test_processor_configs(tiny_dir, processor):
    preprocessor = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert (preprocessor["patch_size"], preprocessor["temporal_patch_size"], preprocessor["merge_size"]) == (16, 2, 2)
    from transformers import Qwen3VLProcessor

    # AutoProcessor's class with torchvision, its image-only subclass without (load_processor).
    assert isinstance(processor, Qwen3VLProcessor)
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert processor.image_processor.merge_size == 2
    assert type(processor.tokenizer).__name__ == "Qwen3_5Tokenizer"


def test_auto_processor(tiny_dir):
    pytest.importorskip("torchvision", reason="every transformers video processor needs torchvision")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"


def test_processor_image_tokens_match_grid(processor, tokenizer):
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (48, 700), (10, 200, 90))]
    inputs = processor.apply_chat_template(
        _image_messages(*images), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3)
    assert inputs["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_pad).sum()) == int(grid.prod(-1).sum()) // 4
    # Small images are upscaled to min_pixels (256 x 256 = 256 patches = 64 tokens).
    assert all(int(g.prod()) >= 256 for g in grid)
    text = tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("What is in these pictures?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert text.count("<|vision_start|>") == 2


def test_image_text_forward_and_generate(model, processor):
    inputs = processor.apply_chat_template(
        _image_messages(Image.new("RGB", (256, 320), (90, 90, 200))),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # The image actually reaches the language model.
    other = dict(inputs, pixel_values=-inputs["pixel_values"])
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits[0, -1], logits[0, -1])
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("text", ["Hello", "Describe the image in detail.", "你好，世界！"])
def test_greedy_generation_is_not_degenerate(model, tokenizer, text):
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 24
    assert len(Counter(new)) > 8, new  # varied, not one token repeated
    # Never the vision placeholders or the padding rows beyond the tokenizer.
    vision = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert all(t < len(tokenizer) and t not in vision for t in new), new
