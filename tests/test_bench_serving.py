"""benchmarks/bench_serving.py: its cells, SGLang's metric definitions on made-up timestamps, exact prompts;
and (slow) one CPU run of the script end to end."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_serving as bs  # noqa: E402


def test_cells():
    cells = bs.parse_cells("8192/1024@1, 1024/1024@16,image@8", image_text=64, image_out=128)
    assert cells == [
        {"name": "8192/1024@1", "kind": "text", "isl": 8192, "osl": 1024, "concurrency": 1},
        {"name": "1024/1024@16", "kind": "text", "isl": 1024, "osl": 1024, "concurrency": 16},
        {"name": "image@8", "kind": "image", "isl": 64, "osl": 128, "concurrency": 8}]
    assert [bs.slug(c["name"]) for c in cells] == ["8192x1024c1", "1024x1024c16", "imagec8"]
    assert [c["name"] for c in bs.parse_cells(bs.DEFAULT_CELLS)] == bs.DEFAULT_CELLS.split(",")
    for bad in ("8192/1024", "8192@1", "a/b@1", "8192/1024@0", "image@", "0/8@1", "video@1"):
        with pytest.raises(ValueError):
            bs.parse_cells(bad)
    # about twice the concurrency, at least 2
    assert [bs.requests_for(c, 2.0) for c in (1, 8, 16, 64)] == [2, 16, 32, 128]
    assert bs.requests_for(1, 1.0) == 2 and bs.requests_for(3, 1.5) == 5


def response(times, end, completion, prompt=100, status=200, error=None):
    usage = None if completion is None else {"prompt_tokens": prompt, "completion_tokens": completion}
    return {"status": status, "first_s": times[0] if times else None, "times": times, "end_s": end,
            "usage": usage, "error": error}


def test_metrics():
    """SGLang's calculate_metrics: TTFT and E2E per request, TPOT = (E2E - TTFT) / (tokens - 1), ITL every gap
    between two chunks of a request, pooled; throughputs over the wall time; a failure counts only as one."""
    a = response([0.5, 0.6, 0.8, 1.1], 1.2, 5)   # 5 tokens in 4 chunks (one chunk carried two)
    b = response([0.3, 0.4, 0.5], 0.6, 3)
    failed = response([], 0.01, None, status=500, error="boom")
    m = bs.cell_metrics([a, b, failed], wall_s=2.0)
    assert (m["requests"], m["completed"], m["failed"]) == (3, 2, 1)
    assert m["errors"]["5xx"] == 1 and m["errors"]["statuses"] == {"200": 2, "500": 1}
    assert m["ttft_ms"]["mean"] == pytest.approx(400) and m["ttft_ms"]["median"] == pytest.approx(400)
    assert m["ttft_ms"]["p99"] == pytest.approx(300 + 0.99 * 200)
    tpots = [(1.2 - 0.5) / 4 * 1e3, (0.6 - 0.3) / 2 * 1e3]  # 175, 150
    assert m["tpot_ms"]["mean"] == pytest.approx(np.mean(tpots))
    assert m["tpot_ms"]["p99"] == pytest.approx(150 + 0.99 * 25)
    itl = m["itl_ms"]  # gaps 100, 200, 300 and 100, 100 ms
    assert itl["n"] == 5 and itl["mean"] == pytest.approx(160) and itl["median"] == pytest.approx(100)
    assert itl["p95"] == pytest.approx(280) and itl["p99"] == pytest.approx(296) and itl["max"] == pytest.approx(300)
    assert m["e2e_ms"]["mean"] == pytest.approx(900)
    assert m["output_tokens_per_s"] == pytest.approx(8 / 2.0) and m["requests_per_s"] == pytest.approx(1.0)
    assert m["input_tokens_per_s"] == pytest.approx(200 / 2.0)
    assert m["concurrency"] == pytest.approx((1.2 + 0.6) / 2.0)  # sum of E2E / wall
    assert m["tokens_per_chunk"] == pytest.approx(8 / 7)
    assert m["prompt_tokens_min_max"] == [100, 100]
    # a 200 whose stream carried an error, or that ended without usage, is not completed either
    broken = [response([0.1, 0.2], 0.3, 2, error='{"message": "x"}'), response([0.1, 0.2], 0.3, None)]
    m = bs.cell_metrics(broken, wall_s=1.0)
    assert m["completed"] == 0 and m["ttft_ms"] is None and m["errors"]["stream_errors"] == 1
    assert m["errors"]["without_usage"] == 1
    table = bs.cell_table("1/1@1", {**bs.cell_metrics([a, b], 2.0), "cell": {"concurrency": 1}, "server": {},
                                    "sglang": bs.SGLANG[:1]}, "none")
    assert "TTFT ms" in table and "SGLang 0.5.15" in table


def test_prompts_exact(tiny_ckpt):
    """Every prompt is exactly the cell's ISL tokens, chat template included, counted as the server counts
    (chat_inputs), and no two share more than the template's opening."""
    from ds_qwen_vision.model import chat_inputs, load_processor

    texts = bs.Texts(tiny_ckpt)
    processor = load_processor(tiny_ckpt)
    for n in (texts.overhead + 1, 64, 300, 1000):
        ids = []
        for i in range(12):
            text = bs.messages(texts, {"kind": "text", "isl": n}, f"{n}x8c1-{i}", 0)[0]["content"]
            assert bs.chat_tokens(texts, text) == n
            if i < 4:
                served = chat_inputs(processor, [{"role": "user", "content": text}], [],
                                     chat_template_kwargs={"enable_thinking": False})["input_ids"][0].tolist()
                assert len(served) == n
                ids.append(served)
        if n >= 64:  # (a user text of one token cannot differ much: the seed's first character)
            shared = [next(j for j, (x, y) in enumerate(zip(p, q)) if x != y) for p, q in zip(ids, ids[1:])]
            assert max(shared) <= 5, shared  # the template's "<|im_start|>user\n", then the seed's digest
    with pytest.raises(ValueError):
        bs.exact_chat(texts, texts.overhead, "empty")


def test_image_message(tiny_ckpt):
    texts = bs.Texts(tiny_ckpt)
    cell = bs.parse_cells("image@1", image_text=16, image_out=8)[0]
    one, two = (bs.messages(texts, cell, seed, image_side=32)[0]["content"] for seed in ("a", "b"))
    url = one[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "PNG" and img.size == (32, 32)
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 100  # random pixels, not a flat colour
    assert one[0] != two[0]  # every request's own image: the image cache cannot help
    assert one[1]["type"] == "text" and len(texts.tok(one[1]["text"], add_special_tokens=False)["input_ids"]) == 16


@pytest.mark.slow  # launch.sh (pyproject.toml: the fast tier runs -m "not slow")
def test_cpu_run(tmp_path):
    """The docstring's CPU check: every cell completes, prompts exact, the results file has the cells."""
    env = dict(os.environ, DSQV_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/bench_serving.py"), "--step", "all", "--preset", "tiny", "--layers",
         "4", "--device", "cpu", "--dtype", "float32", "--cells", "64/8@1,64/8@2,image@1", "--image-side", "64",
         "--image-text", "16", "--image-out", "8", "--set", "limits.max_prompt_tokens=1024", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [path] = out.glob("*-cpu-serving-mtp-64x8c1-64x8c2-imagec1.json")
    result = json.loads(path.read_text())
    assert result["stop"]["exit_code"] == 0 and not result["log_problems"]
    assert result["changes_from_shipped"]["limits.max_prompt_tokens"] == 1024
    for name, n in (("64/8@1", 2), ("64/8@2", 4), ("image@1", 2)):
        c = result["cells"][name]
        assert (c["requests"], c["completed"]) == (n, n), c["errors"]
        assert c["output_tokens"] == 8 * n  # ignore_eos
        assert all(r["completion_tokens"] == 8 for r in c["responses"])
    assert result["cells"]["64/8@2"]["prompt_tokens_min_max"] == [64, 64]
    assert "TTFT ms" in run.stdout and "wrote" in run.stdout
