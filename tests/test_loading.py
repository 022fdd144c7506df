"""Shard-aware loading: host memory while loading stays near the rank's shard; bad checkpoints are refused."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds_qwen_vision.checkpoint import build_checkpoint
from ranks import launch

HERE = Path(__file__).parent


def test_loading_rss_stays_within_shard(tmp_path_factory, tiny_ckpt):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("ckpt") / "loadtest", preset="loadtest", seed=0)
    files = list(Path(ckpt).glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    assert total > 200e6 and len(files) >= 4, "the checkpoint must be big enough for the difference to show"
    out = tmp_path_factory.mktemp("rss")
    launch(2, [str(HERE / "load_memory_worker.py"), str(ckpt), tiny_ckpt, str(out)])
    for rank in range(2):
        r = json.loads((out / f"rank{rank}.json").read_text())
        growth = r["rss_peak"] - r["rss_before"]
        print(f"rank {rank}: RSS grew {growth / 2**20:.0f} MiB while loading a {r['shard_bytes'] / 2**20:.0f} MiB "
              f"shard of a {total / 2**20:.0f} MiB checkpoint ({growth / r['shard_bytes']:.2f}x); after: {r['after']}")
        assert r["shard_bytes"] < 0.6 * total
        assert growth <= 1.25 * r["shard_bytes"]


def _broken_copy(src: str, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    file = dst / index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(file))
    edit(tensors, index)
    save_file(tensors, str(file), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("case,edit,message", [
    ("missing", lambda t, i: (t.pop("lm_head.weight"), i["weight_map"].pop("lm_head.weight")),
     "missing tensors: lm_head.weight"),
    ("extra", lambda t, i: t.__setitem__("model.language_model.extra.weight", torch.zeros(2)),
     "unexpected tensor model.language_model.extra.weight"),
    ("misshaped", lambda t, i: t.__setitem__("lm_head.weight", t["lm_head.weight"][:, :-2].contiguous()),
     "tensor lm_head.weight has shape"),
])
def test_bad_checkpoint_is_refused_with_the_tensor_named(tiny_ckpt, tmp_path, case, edit, message):
    from ds_qwen_vision.loading import CheckpointError
    from ds_qwen_vision.model import load_model

    broken = _broken_copy(tiny_ckpt, tmp_path / case, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(str(broken), 1, "cpu", torch.float32, show_progress=False)
