"""Where a deployment's ranks run, and the checks that keep deployments on one host apart.

``launch.sh`` asks this module, before anything starts, for the deepspeed launcher's arguments::

    plan=$(python -m ds_qwen_vision.launcher --config FILE [overrides]) || exit 2
    eval "$plan"    # sets launcher_args (an array), master_port, lock_gpus (an array)

- GPU selection is the launcher's own: ``--include localhost:2,3`` from ``tensor_parallel.gpus`` (or the
  first tp_size ids of CUDA_VISIBLE_DEVICES, or GPUs 0..tp_size-1). On CPU, ``--num_gpus tp_size`` starts
  CPU ranks and GPU ids mean nothing.
- ``master_port`` (the ranks' rendezvous, and the name of DeepSpeed's CPU all-reduce buffers in /dev/shm):
  ``tensor_parallel.master_port`` or ``$MASTER_PORT`` if set, else a free port picked now.
- ``lock_gpus``: the GPU ids launch.sh holds a lock on (flock) for as long as the deployment runs, so that a
  second deployment naming one of them is refused instead of running out of memory on it.
- tp over several hosts: ``tensor_parallel.hostfile`` goes to the launcher as ``--hostfile`` (it starts each
  host's ranks over ssh), with this host, the hostfile's first, as ``--master_addr``.

Refused here (exit 2, every problem named at once): a tp_size that does not divide the checkpoint's heads,
a checkpoint without a config.json, an HTTP port or a configured master port another process listens on,
fewer GPUs in CUDA_VISIBLE_DEVICES than ranks, a hostfile whose slots are not tp_size or whose first host
is not this one.  The config's own rules (GPUs listed twice, as many GPUs
as ranks) are config.py's.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .config import ConfigError, DeployConfig, add_cli_args, config_from_args


@dataclass
class LaunchPlan:
    launcher_args: list[str]          # for `deepspeed`, before --module
    master_port: int
    lock_gpus: list[int] = field(default_factory=list)

    def to_bash(self) -> str:
        q = shlex.quote
        return "\n".join([
            f"launcher_args=({' '.join(q(a) for a in self.launcher_args)})",
            f"master_port={self.master_port}",
            f"lock_gpus=({' '.join(str(g) for g in self.lock_gpus)})",
        ]) + "\n"


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something holds it. SO_REUSEADDR as gunicorn binds, so a
    port whose last connections sit in TIME_WAIT (a deployment that just stopped) counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_gpus(cfg: DeployConfig, environ: dict[str, str]) -> tuple[list[int], list[str]]:
    """The physical GPU ids of the ranks, and the problems found."""
    tp = cfg.tensor_parallel.tp_size
    if cfg.tensor_parallel.gpus is not None:
        return list(cfg.tensor_parallel.gpus), []
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return list(range(tp)), []
    ids = [v.strip() for v in visible.split(",")]
    if not all(v.isdigit() for v in ids):
        return [], [f"CUDA_VISIBLE_DEVICES={visible}: not a list of GPU numbers; set tensor_parallel.gpus (--gpus)"]
    if len(ids) < tp:
        return [], [f"CUDA_VISIBLE_DEVICES={visible} has {len(ids)} GPUs for tensor_parallel.tp_size {tp}"]
    return [int(v) for v in ids[:tp]], []


def heads_problems(model_dir: Path, tp: int) -> list[str]:
    """tp must divide every head count (and the widths split with them), and an FP8 checkpoint's cuts must fall
    on its scale blocks: the rules the ranks apply at load (tp_policy.check_divisible, fp8.convert), applied to
    the checkpoint's config.json before any rank starts."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        return [f"model: cannot read {path}: {e.strerror or e}"]
    except ValueError as e:
        return [f"model: {path} is not valid JSON: {e}"]
    # tp_policy imports torch: only here, so that reading the config stays light.
    from .tp_policy import check_divisible

    text = SimpleNamespace(**raw.get("text_config", raw))
    try:
        check_divisible(text, tp)
        if raw.get("quantization_config") is not None:  # FP8: the scale blocks must split too (fp8.py)
            from .fp8 import tp_problems

            return [f"tensor_parallel.tp_size {tp} with {path}'s quantization_config: {p}"
                    for p in tp_problems(text, raw["quantization_config"], tp)]
    except ValueError as e:
        return [f"tensor_parallel.tp_size: {e} (from {path})"]
    except (TypeError, AttributeError) as e:  # a field missing from config.json
        return [f"model: {path} lacks a field the shard rules need: {e}"]
    return []


def is_this_host(name: str) -> bool:
    """Whether ``name`` is this machine: its own name, or an address this machine can bind."""
    if name in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    for address in addresses:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            try:
                s.bind((address, 0))
                return True
            except OSError:
                pass
    return False


def hostfile_args(path: str, tp: int) -> tuple[list[str], list[str]]:
    """The launcher's arguments for tp over the hosts of ``path``, and the problems found. The launcher
    starts each host's slots (GPUs 0..slots-1) over ssh (pdsh); rank 0, the first host's first rank, must
    be on this host, where the front reaches it over a Unix socket."""
    # The launcher's own parser (same errors, same format), imported only for a multi-host deployment.
    from deepspeed.launcher.runner import fetch_hostfile

    if not os.path.isfile(path):
        return [], [f"tensor_parallel.hostfile: no file {path}"]
    try:
        hosts = fetch_hostfile(path)
    except ValueError as e:
        return [], [f"tensor_parallel.hostfile: {e}"]
    problems = []
    slots = sum(hosts.values())
    if slots != tp:
        problems.append(f"tensor_parallel.hostfile: {slots} slots ({', '.join(f'{h}={n}' for h, n in hosts.items())}) "
                        f"for tensor_parallel.tp_size {tp} (one rank per slot)")
    first = next(iter(hosts))
    if not is_this_host(first):
        problems.append(f"tensor_parallel.hostfile: its first host {first} is not this host: run launch.sh there "
                        "(rank 0 and the HTTP front run on the first host)")
    return ["--hostfile", path, "--master_addr", first], problems


def plan_launch(cfg: DeployConfig, model_dir: Path | None, environ: dict[str, str] | None = None,
                serves_http: bool = True) -> LaunchPlan:
    """The launcher's arguments for ``cfg``; ConfigError naming every problem. ``model_dir`` None: skip the
    checkpoint's check (nothing to read yet). ``serves_http`` False (launch.sh --prebuild: no front): the
    HTTP port is not checked."""
    env = os.environ if environ is None else environ
    tp = cfg.tensor_parallel.tp_size
    problems: list[str] = []
    if model_dir is not None:
        problems += heads_problems(model_dir, tp)
    if serves_http and port_in_use(cfg.server.host, cfg.server.port):
        problems.append(f"server.port: {cfg.server.host}:{cfg.server.port} is taken (Address already in use); "
                        "another deployment? set server.port (--port)")
    master_port = cfg.tensor_parallel.master_port or (int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None)
    if master_port is None:
        master_port = free_port()
    elif port_in_use("0.0.0.0", master_port):
        problems.append(f"tensor_parallel.master_port: {master_port} is taken (Address already in use); "
                        "another deployment's ranks? give each deployment its own, or null for a free one")
    elif master_port == cfg.server.port:
        problems.append(f"MASTER_PORT={master_port} is server.port too")
    lock_gpus: list[int] = []
    if cfg.tensor_parallel.hostfile is not None:
        host_args, host_problems = hostfile_args(cfg.tensor_parallel.hostfile, tp)
        problems += host_problems
        args = host_args
    elif cfg.device == "cuda":
        lock_gpus, gpu_problems = cuda_gpus(cfg, env)
        problems += gpu_problems
        args = ["--include", "localhost:" + ",".join(map(str, lock_gpus))]
    else:
        args = ["--num_gpus", str(tp)]
    if problems:
        raise ConfigError("cannot start this deployment:\n" + "\n".join(f"  - {p}" for p in problems))
    return LaunchPlan(args + ["--master_port", str(master_port)], master_port, lock_gpus)


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(
        prog="python -m ds_qwen_vision.launcher", description="The deepspeed launcher's arguments, as bash."))
    parser.add_argument("--model-dir", metavar="DIR", help="the checkpoint to check tp against (default: --model)")
    parser.add_argument("--no-http", action="store_true", help="no HTTP front will start: do not check its port")
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
        model_dir = ns.model_dir or (None if cfg.is_demo else cfg.model)
        plan = plan_launch(cfg, Path(model_dir) if model_dir else None, serves_http=not ns.no_http)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.device == "cpu" and cfg.tensor_parallel.gpus is not None:
        print(f"note: device cpu: tensor_parallel.gpus {cfg.tensor_parallel.gpus} ignored "
              f"({cfg.tensor_parallel.tp_size} CPU ranks)", file=sys.stderr)
    sys.stdout.write(plan.to_bash())
    return 0


if __name__ == "__main__":
    sys.exit(main())
