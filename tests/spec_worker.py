"""One tensor-parallel rank for the speculative-decoding test (started by tests/ranks.py under the deepspeed
launcher): loads the checkpoint with its MTP head through the product's path, and on the same ranks runs
the same jobs with ngram (forced acceptance) and mtp speculation, and without speculation with mixed
prefill + decode steps (runner/prefill_graphs.py); saves each run's greedy tokens."""
import json
import sys

import torch

from ds_qwen_vision.model import chat_inputs, init_distributed, load_model, load_processor
from ds_qwen_vision.runner import ModelRunner
from driver import drive


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    rank, world = init_distributed("cpu")
    model = load_model(spec["model"], world, "cpu", torch.float32, mtp=True, show_progress=False)
    processor = load_processor(spec["model"])
    x = [chat_inputs(processor, c["messages"], [open(p, "rb").read() for p in c["images"]]) for c in spec["cases"]]
    jobs = [(0, x[0]), (1, x[1]), (("after", 0), x[2])]
    result = {}
    for method in ("mtp", "ngram"):
        runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256,
                             speculative={"method": method, "num_tokens": 3})
        oracle = spec["oracle"] if method == "ngram" else None
        stats = {}
        result[method] = drive(runner, jobs, spec["new_tokens"], chunk=6, stats=stats, oracle=oracle,
                               profile=(0.88, 0.77 / 0.88, 0.66 / 0.77))
        result[method + "_stats"] = stats
    # no speculation, prefill from the graphs' buffers (eager on CPU) with mixed steps: a chunk and the
    # decode rows in one forward, all-reduces included, on both ranks alike
    runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256, prefill_graph_tokens=64,
                         mixed_prefill=True)
    result["mixed"] = drive(runner, jobs, spec["new_tokens"], chunk=6)
    result["mixed_shapes"] = sorted({c[0] for c in runner.shapes})
    # the inexact cache options (FP8 KV, the head's pool too; bf16 GDN and verify states): MTP speculation
    # against the plain decode on the same options, both ranks alike
    for name, spec_cfg in (("options_plain", None), ("options_mtp", {"method": "mtp", "num_tokens": 3})):
        runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256, speculative=spec_cfg, kv_fp8=True,
                             state_dtype=torch.bfloat16)
        result[name] = drive(runner, jobs, spec["new_tokens"], chunk=6)
    mtp_params = {n: list(p.shape) for n, p in model.named_parameters() if n.startswith("mtp.")}
    # a draft vocabulary (mtp.DraftHead): this rank's columns of its rows, partial logits all-reduced like
    # lm_head's; its drafts against the whole head's logits restricted to it, then the runner drafting from it
    from ds_qwen_vision.mtp import attach_draft_head

    assert attach_draft_head(model, processor.tokenizer, 200, "cpu") is None
    head = model.mtp.draft_head
    h = torch.randn(2, 3, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        result["draft_head_exact"] = torch.equal(head(h), head.ids[model.lm_head(h)[..., head.ids].argmax(-1)])
    runner = ModelRunner(model, torch.device("cpu"), max_slots=3, max_len=256,
                         speculative={"method": "mtp", "num_tokens": 3})
    stats = {}
    result["mtp_draft_vocab"] = drive(runner, jobs, spec["new_tokens"], chunk=6, stats=stats)
    result["mtp_draft_vocab_stats"] = stats
    del model.mtp.draft_head
    result["mtp_params"] = mtp_params
    torch.save(result, f"{spec['out']}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
