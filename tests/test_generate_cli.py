"""The offline generate command on a checkpoint the project did not build: transformers' own save_pretrained."""
import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from ds_qwen_vision.checkpoint import make_config
from ds_qwen_vision.model import chat_inputs, load_processor
from ranks import launch


@pytest.fixture(scope="module")
def foreign_ckpt(tiny_ckpt, tmp_path_factory):
    """Other shapes than our builder's (2 kv heads, GDN 2/4 heads, tied embeddings as in the small
    Qwen3.5 models), transformers' default init, saved by transformers itself with its processor files."""
    config = make_config("tiny")
    t = config.text_config
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = 12, 2, 16
    t.rope_parameters["mrope_section"] = [1, 1, 0]
    t.linear_num_key_heads, t.linear_num_value_heads = 2, 4
    t.num_hidden_layers, t.layer_types = 4, ["linear_attention"] * 3 + ["full_attention"]
    config.tie_word_embeddings = t.tie_word_embeddings = True
    torch.manual_seed(1)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers' init is near-silent at this size; widen it so tokens differ
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
    path = tmp_path_factory.mktemp("foreign") / "ckpt"
    model.save_pretrained(path, max_shard_size="1MB")
    load_processor(tiny_ckpt).save_pretrained(path)
    return str(path), model


def test_generate_prints_what_transformers_generates(foreign_ckpt, image_files):
    path, model = foreign_ckpt
    prompt = "Describe the picture in one line."
    processor = load_processor(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = chat_inputs(processor, messages, [open(image_files[0], "rb").read()])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    proc = launch(2, ["--module", "ds_qwen_vision.generate", "--model", path, "--prompt", prompt,
                      "--image", image_files[0], "--max-new-tokens", "16", "--device", "cpu"])
    # The deepspeed launcher logs on stdout around the ranks; the rank prints exactly one completion line.
    completion = [line for line in proc.stdout.splitlines() if not line.startswith("[20")]  # launcher lines
    assert completion == [expected], (completion, expected)
