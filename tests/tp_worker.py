"""One tensor-parallel rank for the equivalence tests (started by tests/ranks.py under the deepspeed launcher).

Loads the checkpoint through the product's own path (model.load_model), runs the prompts given in a
JSON spec, and saves what the test compares with single-process transformers: prefill logits, a greedy
continuation, the image embeddings, and this rank's bytes of language-model weights.
"""
import json
import sys

import torch

from ds_qwen_vision.model import chat_inputs, init_distributed, load_model, load_processor
from ds_qwen_vision.tp_policy import is_language_model


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    rank, world = init_distributed("cpu")
    model = load_model(spec["model"], world, "cpu", torch.float32)
    fused = {}
    if spec.get("fused"):  # test_fused.py: the fused forwards, and this rank's fused weights to check
        from ds_qwen_vision.kernels import layers
        from ds_qwen_vision.tp_policy import FUSED_PROJECTIONS, fused_weight

        layers.install_fused_forwards(model)  # the prompt's logits through them too
        for i, layer in enumerate(model.model.language_model.layers):
            for kind in FUSED_PROJECTIONS:
                if hasattr(layer, kind):
                    fused[(i, kind)] = fused_weight(getattr(layer, kind)).clone()
    processor = load_processor(spec["model"])
    result = {"lm_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                              if is_language_model(n)),
              "cases": [], "fused": fused}
    for case in spec["cases"]:
        images = [open(path, "rb").read() for path in case["images"]]
        inputs = chat_inputs(processor, case["messages"], images)
        with torch.inference_mode():
            logits = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=spec["new_tokens"], do_sample=False)
            image_embeds = None
            if images:
                image_embeds = torch.cat(model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        result["cases"].append({"logits": logits, "tokens": out[0, inputs["input_ids"].shape[1]:],
                                "image_embeds": image_embeds})
    torch.save(result, f"{spec['out']}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
