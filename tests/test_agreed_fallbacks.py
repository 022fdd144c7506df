"""Ranks agree on every fallback that changes a step's collectives: a CUDA graph capture that fails on one
rank alone (decode, prefill chunks, mixed steps) makes every rank take the eager path, at the same graph,
so that no rank replays a graph while its peer runs the forward eagerly (other all-reduces: a hang)."""
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

from ds_qwen_vision.model import agree, chat_inputs, load_processor
from ranks import launch

N = 8


def test_agree_without_a_process_group_is_the_ranks_own_answer():
    assert agree(True) is True and agree(False) is False


def test_a_capture_failing_on_one_rank_is_every_ranks_fallback(tiny_ckpt, image_files, tmp_path):
    """Real DeepSpeed ranks at tp=2 (tests/fallback_worker.py): rank 1's capture of the second graph of a
    set fails. Both ranks stop capturing there, drop that set and answer as transformers."""
    processor = load_processor(tiny_ckpt)
    reference = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    cases = [{"images": [], "messages": [{"role": "user", "content": "Tell me a story about the sea."}]},
             {"images": image_files[:1], "messages": [{"role": "user", "content": [{"type": "image"},
                                                                                  {"type": "text", "text": "What?"}]}]},
             {"images": [], "messages": [{"role": "user", "content": "A longer question, with more words in it."}]}]
    expected = []
    for c in cases:
        x = chat_inputs(processor, c["messages"], [open(p, "rb").read() for p in c["images"]])
        with torch.inference_mode():
            expected.append(reference.generate(**x, max_new_tokens=N, do_sample=False)[0, x["input_ids"].shape[1]:].tolist())
    spec = {"model": tiny_ckpt, "new_tokens": N, "out": str(tmp_path), "cases": cases}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # A rank that went its own way hangs in an all-reduce: the timeout fails the test.
    launch(2, [str(Path(__file__).parent / "fallback_worker.py"), str(tmp_path / "spec.json")],
           cwd=str(Path(__file__).parent), timeout=90)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        # the decode graphs (and so the prefill graphs, which share their pool): none, every forward eager
        assert (r["decode"]["captures"], r["decode"]["decode"], r["decode"]["prefill"]) == (2, None, [])
        # the prefill graphs: exact-length eager chunks, each step's prefill apart from its decode
        assert (r["prefill"]["captures"], r["prefill"]["decode"], r["prefill"]["prefill"]) == (5, [1, 2, 3], None)
        assert "prefill-graph-mixed" not in r["prefill"]["shapes"]
        # the mixed graphs alone: chunks replayed, a chunk and the decode rows as two forwards
        assert (r["mixed"]["captures"], r["mixed"]["prefill"], r["mixed"]["mixed"]) == (8, [16, 32, 64], [])
        assert "prefill-graph-mixed" not in r["mixed"]["shapes"] and "prefill-graph" in r["mixed"]["shapes"]
        for name in ("decode", "prefill", "mixed"):
            assert r[name]["tokens"] == expected, name
    assert ranks[0] == ranks[1]


@pytest.mark.parametrize("fails", [False, True])
def test_capture_all_stops_every_rank_at_the_same_graph(monkeypatch, fails):
    """In one process: a failing graph raises CaptureFailed after the vote, and nothing captured is kept."""
    from ds_qwen_vision.runner import graphs

    votes = []
    monkeypatch.setattr(graphs, "agree", lambda ok, device: votes.append(ok) or ok)

    def capture(fn, pool, warm_runs=1):
        return fn(), None

    monkeypatch.setattr(graphs, "capture", capture)

    def boom():
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED")

    fns = {3: lambda: "g3", 2: boom if fails else (lambda: "g2"), 1: lambda: "g1"}
    if fails:
        with pytest.raises(graphs.CaptureFailed, match="graph 2: .*CUBLAS"):
            graphs.capture_all(fns, None, "cpu")
        assert votes == [True, False]
    else:
        assert graphs.capture_all(fns, None, "cpu") == {3: ("g3", None), 2: ("g2", None), 1: ("g1", None)}
        assert votes == [True, True, True]
