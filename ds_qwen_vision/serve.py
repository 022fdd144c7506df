"""One model rank of the server, started by the deepspeed launcher (see launch.sh):

    deepspeed --num_gpus N --module ds_qwen_vision.serve --config FILE [overrides]

Every rank loads its shard. Rank 0 runs the engine and the IPC server the HTTP front talks to;
the other ranks run the plans rank 0 broadcasts until it tells them to stop.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from .checkpoint import demo_dir
from .config import add_cli_args, config_from_args
from .model import DTYPES, init_distributed, load_model, load_processor, log
from .plan import ControlChannel
from .runner import ModelRunner, follower_loop


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds_qwen_vision.serve")
    add_cli_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    config = config_from_args(parser.parse_args(argv))
    model_dir = str(demo_dir()) if config.is_demo else config.model
    rank, world = init_distributed(config.device)
    if world != config.tensor_parallel.tp_size:
        raise SystemExit(f"started {world} ranks but tensor_parallel.tp_size is {config.tensor_parallel.tp_size}")
    t0 = time.perf_counter()
    model = load_model(model_dir, world, config.device, DTYPES[config.dtype])
    processor = load_processor(model_dir)
    device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else torch.device("cpu")
    runner = ModelRunner(model, processor, device)
    channel = ControlChannel()
    log(f"[rank {rank}] {model_dir} loaded at tp={world} on {config.device}/{config.dtype} "
        f"in {time.perf_counter() - t0:.1f}s")
    if rank != 0:
        follower_loop(runner, channel)
        return 0

    from .engine import Engine
    from .ipc import IpcServer

    engine = Engine(runner, channel, processor, config.limits)
    # SIGTERM/SIGINT: stop taking work, tell the followers to leave, exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: engine.stop())
    engine.heartbeat()  # every rank reports ready before the socket opens
    Path(config.socket_path() + ".pid").write_text(str(os.getpid()))  # launch.sh signals rank 0 here
    ipc = IpcServer(config.socket_path(), engine)
    ipc.start()
    log(f"[rank 0] engine ready on {config.socket_path()}")
    try:
        engine.run()
    finally:
        ipc.close()
        # Python restores the default handlers while it shuts down; a late SIGTERM would then kill this
        # rank mid-teardown and make the launcher report a failure.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
