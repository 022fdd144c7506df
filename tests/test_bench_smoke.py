"""The GPU benchmarks' CPU paths end to end on the tiny preset, so that a device call never finds a script
broken by a change elsewhere (their figures mean nothing here): bench_spec.py -- every part, the forced
profiles through the engine's own Speculator (ngram and MTP), the MTP rows over a draft vocabulary; a part
that raises is recorded and skipped by the script (a GPU call keeps its other figures), and fails here --
bench_fp8.py and bench_paged.py."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_spec_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_spec.py"), "--preset", "tiny", "--device", "cpu",
                           "--tokens", "16", "--repeats", "3", "--no-baseline", "--draft-vocab", "256",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("*-spec.json")).read_text())["rows"]
    assert not [r for r in rows if "error" in r], proc.stderr[-3000:]
    runs = [r["run"] for r in rows]
    for profile in ("forced 0%", "forced 88/77/66%", "forced 100%"):
        assert sum(profile in run for run in runs) == 3  # ngram, mtp, mtp over the draft vocabulary
    forced = [r for r in rows if "forced 100%" in r["run"]]
    assert all(r["acceptance"] == 1.0 for r in forced)  # the profile decides: every draft accepted


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--preset", "tiny", "--device", "cpu",
                           "--layers", "4", "--context", "256", "--chunk", "64", "--steps", "8", "--repeats", "1",
                           *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_fp8_and_bench_paged_run(tmp_path):
    run_script("bench_fp8.py", "--block", "32", "--out", str(tmp_path / "fp8.json"))
    fp8 = json.loads((tmp_path / "fp8.json").read_text())
    assert fp8["converted_linears"] > 0 and fp8["runs"] and fp8["ratio_fp8_to_bf16"]
    run_script("bench_paged.py", "--out", str(tmp_path / "paged.json"))
    paged = json.loads((tmp_path / "paged.json").read_text())
    assert all(paged[k] > 0 for k in ("ttft_1k_ms", "ttft_8k_chunked_ms", "decode_16rows_256_ms"))
