"""benchmarks/bench_spec.py end to end on the tiny preset (CPU): every part runs and writes its rows --
the plain step, the verify steps, the forced profiles through the engine's own Speculator (ngram and MTP),
and the MTP rows again over a draft vocabulary. Its figures mean nothing here; a part that raises (the
script records the error and goes on, so a GPU call keeps its other figures) fails this test."""
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
