"""Tensor-parallel ranks (real DeepSpeed CPU ranks, fp32) answer exactly like single-process transformers."""
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from ds_qwen_vision.model import chat_inputs, load_processor
from ranks import launch

pytestmark = pytest.mark.slow  # multi-process (pyproject.toml: the fast tier runs -m "not slow")

NEW_TOKENS = 24


def cases(image_files):
    return [
        {"name": "text", "images": [],
         "messages": [{"role": "user", "content": "Tell me a story about the sea."}]},
        {"name": "image+text", "images": image_files[:1],
         "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]},
        {"name": "two images, multi-turn", "images": image_files,
         "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First."}]},
                      {"role": "assistant", "content": "A picture."},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]},
    ]


@pytest.fixture(scope="module")
def reference(tiny_ckpt, image_files):
    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    processor = load_processor(tiny_ckpt)  # AutoProcessor where torchvision exists
    out = []
    for case in cases(image_files):
        inputs = chat_inputs(processor, case["messages"], [open(p, "rb").read() for p in case["images"]])
        with torch.inference_mode():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append({"logits": logits, "tokens": tokens[0, inputs["input_ids"].shape[1]:]})
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n.startswith(("model.language_model.", "lm_head.")))
    return out, lm_bytes


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_transformers(tp, tiny_ckpt, image_files, reference, tmp_path):
    spec = {"model": tiny_ckpt, "new_tokens": NEW_TOKENS, "out": str(tmp_path), "cases": cases(image_files)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch(tp, [str(Path(__file__).parent / "tp_worker.py"), str(tmp_path / "spec.json")])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp)]
    ref_cases, ref_lm_bytes = reference
    for i, case in enumerate(spec["cases"]):
        ref = ref_cases[i]
        assert len(set(ref["tokens"].tolist())) > 1, "degenerate reference: the test could not tell tokens apart"
        for r, result in enumerate(ranks):
            got = result["cases"][i]
            rel = ((got["logits"] - ref["logits"]).norm() / ref["logits"].norm()).item()
            assert rel <= 1e-5, f"{case['name']} rank {r}: prefill logits relative error {rel:.2e}"
            assert got["tokens"].tolist() == ref["tokens"].tolist(), f"{case['name']} rank {r}: greedy tokens differ"
            if case["images"]:
                # The vision tower is whole on every rank and sees the same bytes: bit-identical embeddings.
                assert torch.equal(got["image_embeds"], ranks[0]["cases"][i]["image_embeds"])
    # Every sharded language-model weight is 1/tp per rank; what stays whole is the small replicated norms.
    shares = [r["lm_bytes"] / ref_lm_bytes for r in ranks]
    print(f"tp={tp}: language-model bytes per rank = {[f'{s:.4f}' for s in shares]} of the whole")
    assert all(1 / tp <= s < 1 / tp + 0.02 for s in shares), shares
