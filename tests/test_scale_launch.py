"""Rank placement: the deepspeed launcher's arguments (GPU selection, master port), and the start-time
refusals that keep two deployments on one host apart.

The launcher's arguments are checked as built (ds_qwen_vision.launcher) and as launch.sh passes them, with
a stand-in ``deepspeed`` on PATH that records its arguments and waits: that is how GPU selection can be
tested on a machine without GPUs (the real launcher on CPU starts CPU ranks and has no GPU ids).  Two real
deployments on one host serving and stopping independently are in test_scale_proxy.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ds_qwen_vision.config import ConfigError, load_config
from ds_qwen_vision.launcher import LaunchPlan, plan_launch

pytestmark = pytest.mark.slow  # multi-process (pyproject.toml: the fast tier runs -m "not slow")

REPO = Path(__file__).resolve().parents[1]


def refusal(overrides: dict, raw: dict | None = None, tmp_path: Path | None = None) -> str:
    path = None
    if raw is not None:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        load_config(str(path) if path else None, overrides)
    return str(e.value)


def test_the_config_refuses_gpus_listed_twice_or_not_one_per_rank(tmp_path):
    assert "tensor_parallel.gpus: GPU 1 listed twice (one rank per GPU)" in refusal({"gpus": [1, 1]})
    assert "GPU 2, 5 listed twice" in refusal({"tp": 4, "gpus": [5, 2, 5, 2]})
    assert "gpus lists 3 GPUs but tp_size is 2 (one rank per GPU)" in refusal({"gpus": [0, 1, 2]})
    assert "tensor_parallel.gpus: is empty" in refusal({"gpus": []})
    assert "tensor_parallel.gpus[0]: Input should be greater than or equal to 0 (got -1)" in refusal({"gpus": [-1, 0]})
    msg = refusal({}, {"server": {"port": 9000}, "tensor_parallel": {"master_port": 9000}}, tmp_path)
    assert "tensor_parallel.master_port and server.port are both 9000" in msg
    ok = load_config(None, {"tp": 4, "gpus": [4, 5, 6, 7]})
    assert ok.tensor_parallel.gpus == [4, 5, 6, 7]


def held_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_the_launcher_arguments(tiny_ckpt):
    ckpt = Path(tiny_ckpt)
    cpu = plan_launch(load_config(None, {"gpus": [2, 3]}), ckpt, environ={})
    # On CPU the launcher starts CPU ranks; GPU ids mean nothing there and take no lock.
    assert cpu.launcher_args[:2] == ["--num_gpus", "2"] and cpu.lock_gpus == []
    assert cpu.launcher_args[2:] == ["--master_port", str(cpu.master_port)]

    cuda = load_config(None, {"device": "cuda", "tp": 4, "gpus": [4, 5, 6, 7]})
    plan = plan_launch(cuda, ckpt, environ={"CUDA_VISIBLE_DEVICES": "0,1"})  # the config's GPUs win
    assert plan.launcher_args[:2] == ["--include", "localhost:4,5,6,7"] and plan.lock_gpus == [4, 5, 6, 7]
    first = plan_launch(load_config(None, {"device": "cuda"}), ckpt, environ={})
    assert first.launcher_args[:2] == ["--include", "localhost:0,1"]
    visible = plan_launch(load_config(None, {"device": "cuda"}), ckpt, environ={"CUDA_VISIBLE_DEVICES": "6, 3,1"})
    assert visible.launcher_args[:2] == ["--include", "localhost:6,3"] and visible.lock_gpus == [6, 3]
    assert plan_launch(load_config(None, {}), ckpt, environ={"MASTER_PORT": "29611"}).master_port == 29611

    # Each start picks a master port of its own (two deployments never share DeepSpeed's /dev/shm buffers).
    ports = {plan_launch(load_config(None, {}), ckpt, environ={}).master_port for _ in range(5)}
    assert len(ports) == 5

    # What the launcher gets is bash that sets exactly these values.
    script = 'eval "$1"; printf "%s\\n" "${launcher_args[@]}" "$master_port" "${#lock_gpus[@]}" "${lock_gpus[@]}"'
    out = subprocess.run(["bash", "-c", script, "-", plan.to_bash()],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [*plan.launcher_args, str(plan.master_port), "4", "4", "5", "6", "7"]
    assert LaunchPlan(["--num_gpus", "1"], 1).to_bash().endswith("lock_gpus=()\n")


def test_the_launcher_refuses_what_cannot_start(tiny_ckpt):
    ckpt = Path(tiny_ckpt)
    with held_port() as http, held_port() as master:
        port, mport = http.getsockname()[1], master.getsockname()[1]
        cfg = load_config(None, {"port": port, "tp": 3, "device": "cuda"})
        cfg.tensor_parallel.master_port = mport
        with pytest.raises(ConfigError) as e:
            plan_launch(cfg, ckpt, environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    msg = str(e.value)
    for expected in [  # every problem at once
        "tensor_parallel.tp_size: tensor parallel size 3 must divide num_key_value_heads=4",
        f"server.port: 127.0.0.1:{port} is taken (Address already in use)",
        f"tensor_parallel.master_port: {mport} is taken",
        "CUDA_VISIBLE_DEVICES=0,1 has 2 GPUs for tensor_parallel.tp_size 3",
    ]:
        assert expected in msg, msg
        # A prebuild (no front) does not need the HTTP port.
        cfg = load_config(None, {"port": port})
        assert plan_launch(cfg, ckpt, environ={}, serves_http=False).launcher_args[:2] == ["--num_gpus", "2"]
    with pytest.raises(ConfigError, match="model: cannot read .*nowhere/config.json"):
        plan_launch(load_config(None, {}), Path("/nowhere"), environ={})
    with pytest.raises(ConfigError, match="not a list of GPU numbers"):
        plan_launch(load_config(None, {"device": "cuda"}), ckpt, environ={"CUDA_VISIBLE_DEVICES": "GPU-8f2a,GPU-11"})


# ---------------------------------------------------------------------------------------------
# launch.sh, with a stand-in deepspeed launcher
# ---------------------------------------------------------------------------------------------

FAKE_DEEPSPEED = """#!/usr/bin/env bash
# Records how launch.sh called the launcher, then waits like ranks that are loading.
printf '%s\\n' "$@" > "$FAKE_OUT/args.$$"
echo "${CUDA_VISIBLE_DEVICES-unset}" > "$FAKE_OUT/visible.$$"
exec sleep 120
"""


@pytest.fixture
def fake_launcher(tmp_path):
    """``launch(gpus)``: launch.sh for a CUDA deployment of the demo on those GPUs, its own port and
    socket, with the stand-in launcher. ``launch.calls()``: {stand-in pid: (its arguments, its
    CUDA_VISIBLE_DEVICES)}."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "deepspeed").write_text(FAKE_DEEPSPEED)
    (bin_dir / "deepspeed").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(out),
               DSQV_LOCK_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="0")
    procs = []

    def launch(*args: str) -> subprocess.Popen:
        n = len(procs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = {"device": "cuda", "server": {"port": port, "ipc_socket": str(tmp_path / f"s{n}.sock")}}
        (tmp_path / f"c{n}.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([str(REPO / "launch.sh"), "--config", str(tmp_path / f"c{n}.json"), *args],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    def calls() -> dict[int, tuple[list[str], str]]:
        return {int(p.suffix[1:]): (p.read_text().split("\n")[:-1], (out / f"visible{p.suffix}").read_text().strip())
                for p in out.glob("args.*") if (out / f"visible{p.suffix}").exists()}

    launch.calls = calls
    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in calls():  # the stand-ins run in sessions of their own (setsid): by their ids
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return value


def test_launch_sh_passes_the_gpus_to_the_launcher_and_refuses_a_gpu_in_use(fake_launcher):
    first = fake_launcher("--gpus", "2,3")
    (pid, (args, visible)), = wait_for(lambda: list(fake_launcher.calls().items()), 60, "the launcher starts")
    assert args[:4] == ["--include", "localhost:2,3", "--master_port", args[3]], args
    assert args[4:6] == ["--module", "ds_qwen_vision.serve"] and args[-2:] == ["--gpus", "2,3"]
    assert visible == "unset"  # the launcher reads --include as physical ids, counted over all GPUs

    # GPU 3 is taken: refused before the launcher starts, naming the GPU and its holder.
    second = fake_launcher("--gpus", "3,4")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2, err
    assert f"GPU 3 is in use by another deployment (launch.sh pid {first.pid}" in err
    assert len(fake_launcher.calls()) == 1

    # Other GPUs: a second deployment starts beside the first, with a master port of its own.
    third = fake_launcher("--gpus", "0,1")
    wait_for(lambda: len(fake_launcher.calls()) == 2, 60, "the second deployment's launcher starts")
    (_, (args3, _)), = [(p, c) for p, c in fake_launcher.calls().items() if p != pid]
    assert args3[:2] == ["--include", "localhost:0,1"] and args3[3] != args[3]

    # Stopped (SIGTERM before the ranks were ready: the launcher's group goes), the GPUs are free again.
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0, first.stderr.read()
    again = fake_launcher("--gpus", "3,2")
    wait_for(lambda: len(fake_launcher.calls()) == 3, 60, "a deployment on the freed GPUs starts")
    for proc in (third, again):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("args, expected", [
    (["--gpus", "1,1"], "tensor_parallel.gpus: GPU 1 listed twice"),
    (["--gpus", "1,2,3"], "gpus lists 3 GPUs but tp_size is 2"),
    (["--tp", "3", "--gpus", "1,2,3"], "tensor parallel size 3 must divide num_key_value_heads=4"),
])
def test_launch_sh_refuses_at_start_with_exit_2(fake_launcher, args, expected):
    proc = fake_launcher(*args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and expected in err, err
    assert fake_launcher.calls() == {}  # nothing was started


def test_launch_sh_refuses_a_taken_http_port_before_loading(fake_launcher, tmp_path):
    with held_port() as s:
        proc = fake_launcher("--port", str(s.getsockname()[1]), "--device", "cpu")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "is taken (Address already in use)" in err, err
    assert fake_launcher.calls() == {}


def test_tp_over_hosts_goes_to_the_launcher_as_its_hostfile(tmp_path, tiny_ckpt):
    """The launcher starts every host's ranks (pdsh over ssh); launch.sh runs on the first host, where rank 0
    and the front are. Not run here (one host, no ssh): the arguments and the refusals."""
    ckpt = Path(tiny_ckpt)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two hosts, two GPUs each\nlocalhost slots=2\ngpu-host-2 slots=2\n")
    cfg = load_config(None, {"device": "cuda", "tp": 4})
    cfg.tensor_parallel.hostfile = str(hostfile)
    plan = plan_launch(cfg, ckpt, environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert plan.launcher_args == ["--hostfile", str(hostfile), "--master_addr", "localhost",
                                  "--master_port", str(plan.master_port)]
    assert plan.lock_gpus == []

    hostfile.write_text("gpu-host-1 slots=2\ngpu-host-2 slots=1\n")
    with pytest.raises(ConfigError) as e:
        plan_launch(cfg, ckpt, environ={})
    assert "3 slots (gpu-host-1=2, gpu-host-2=1) for tensor_parallel.tp_size 4" in str(e.value)
    assert "its first host gpu-host-1 is not this host" in str(e.value)
    hostfile.write_text("gpu-host-1 slots=two\n")
    with pytest.raises(ConfigError, match="hostfile: Hostfile contains a bad entry"):
        plan_launch(cfg, ckpt, environ={})
    cfg.tensor_parallel.hostfile = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="hostfile: no file"):
        plan_launch(cfg, ckpt, environ={})
    assert "gpus and hostfile" in refusal({}, {"tensor_parallel": {"hostfile": "/h", "gpus": [0, 1]}}, tmp_path)
