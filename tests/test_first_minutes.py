"""A newcomer's first minutes, as README has them: launch.sh's own usage, a word before DeepSpeed's silent
first-start build, no kernel advice that cannot apply on CPU, and the README lines that get them through."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from server_fixture import free_port

from ds_qwen_vision.config import _OVERRIDES

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FIRST_START = "first start on this machine: DeepSpeed builds its CPU communication op now"


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def test_launch_sh_has_its_own_usage():
    help_ = launch("--help")
    assert help_.returncode == 0 and help_.stdout.startswith("usage: ./launch.sh [--prebuild] [--config FILE]")
    for flag in _OVERRIDES:  # every override ds_qwen_vision.config takes
        assert f"--{flag} " in help_.stdout, flag
    for args, complaint in [(["--bogus"], "unknown argument --bogus"), (["--config"], "--config needs a value"),
                            (["--port", "9000", "--tp"], "--tp needs a value"),
                            (["--tp", "1", "--prebuild"], "--prebuild comes first")]:
        bad = launch(*args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith("usage: ./launch.sh") and f"launch.sh: {complaint}" in bad.stderr, bad.stderr
        assert "ds_qwen_vision.config" not in bad.stderr


def test_a_word_before_deepspeed_builds_its_cpu_op(tmp_path):
    """On CPU, launch.sh says that the next ~30 s are DeepSpeed's one-time build, unless the op is built already.
    (A stand-in `deepspeed` ends a --prebuild at once: the real ranks are not started.)"""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "deepspeed").write_text("#!/bin/sh\necho ranks started >&2\n")
    (stub / "deepspeed").chmod(0o755)
    extensions = tmp_path / "torch_extensions"
    env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", TORCH_EXTENSIONS_DIR=str(extensions))
    first = launch("--prebuild", "--port", str(free_port()), env=env)
    assert first.returncode == 0, first.stderr
    line = next(line for line in first.stderr.splitlines() if FIRST_START in line)
    assert "about 30 s" in line and str(extensions) in line
    assert first.stderr.index(FIRST_START) < first.stderr.index("ranks started")
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    again = launch("--prebuild", "--port", str(free_port()), env=env)
    assert again.returncode == 0 and "ranks started" in again.stderr and FIRST_START not in again.stderr


def test_no_kernel_install_advice_on_cpu(tiny_ckpt):
    """transformers advises installing flash-linear-attention / causal-conv1d when the Gated DeltaNet layers run
    their PyTorch fallback (4 lines a rank, 8 for the demo); on CPU ranks neither could run."""
    code = (
        "import sys, torch\n"
        "from ds_qwen_vision.model import chat_inputs, load_model, load_processor\n"
        "model = load_model(sys.argv[1], 1, 'cpu', torch.float32, show_progress=False)\n"
        "x = chat_inputs(load_processor(sys.argv[1]), [{'role': 'user', 'content': 'hi'}], [])\n"
        "with torch.no_grad():\n"
        "    model.generate(**x, max_new_tokens=2, do_sample=False)\n"
        "print('generated')\n")
    run = subprocess.run([sys.executable, "-c", code, tiny_ckpt], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0 and "generated" in run.stdout, run.stderr
    assert "falling back to its reference PyTorch implementation" not in run.stderr, run.stderr


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", README, re.S | re.M)
    assert match, title
    return match.group(0)


def test_readme_says_what_the_first_minutes_hold():
    serve = section("Serve the demo")
    assert "DeepSpeed" in serve and "30 s" in serve  # the silent first-start build, and that the log says so
    for title in ("Set up", "Test"):  # next to each test command: how to get the proxy tests to run
        assert "apt-get install haproxy" in section(title), title
