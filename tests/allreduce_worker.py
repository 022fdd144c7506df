"""One CPU rank with the peer-memory all-reduce asked for (started by tests/test_allreduce.py through tests/ranks.py).

Builds the runner with `allreduce.peer_memory` on, as serve.py does, then runs one prompt: the prefill
logits through transformers' forward and a greedy continuation through the runner (slot 1, so decode
runs a batch of 2 with an idle row). Saves them with the hook's tally of which path each all-reduce took.
"""
import json
import sys
from pathlib import Path

import torch

from ds_qwen_vision.config import AllReduceConfig
from ds_qwen_vision.kernels import allreduce
from ds_qwen_vision.model import (
    chat_inputs,
    init_distributed,
    load_model,
    load_processor,
)
from ds_qwen_vision.plan import Prefill, StepPlan
from ds_qwen_vision.runner import ModelRunner


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank, world = init_distributed("cpu")
    model = load_model(spec["model"], world, "cpu", torch.float32, show_progress=False)
    processor = load_processor(spec["model"])
    runner = ModelRunner(model, torch.device("cpu"), max_slots=2, max_len=256,
                         allreduce=AllReduceConfig(peer_memory=spec["peer_memory"]))
    hook = allreduce.installed()
    inputs = chat_inputs(processor, spec["messages"], [])
    with torch.inference_mode():
        logits = model(**inputs).logits
    ids = inputs["input_ids"][0].tolist()
    tokens = [int(runner.run(StepPlan(prefill=[Prefill(1, ids)]))[1].argmax())]
    while len(tokens) < spec["new_tokens"]:
        tokens.append(int(runner.run(StepPlan(decode=[(1, tokens[-1])]))[1].argmax()))
    torch.save({"logits": logits, "tokens": tokens, "hooked": hook is not None,
                "counts": dict(hook.counts) if hook else {}}, f"{spec['out']}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
