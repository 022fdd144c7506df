"""One model rank of the server, started by the deepspeed launcher (see launch.sh):

    deepspeed --num_gpus N --module ds_qwen_vision.serve --config FILE [overrides]

Every rank loads its shard. Rank 0 runs the engine and the IPC server the HTTP front talks to;
the other ranks run the plans rank 0 broadcasts until it tells them to stop.

Start-up, as `/health` reports it (`engine.phase`): rank 0 opens the IPC socket first, so the front
can answer from the start: `loading` (every rank loads its shard, captures its decode graphs), then
`warming_up` (engine/warmup.py: every shape class the engine can produce runs once, through plans the
followers run too), then `ready` (every rank reported ready). Requests before that get a 503.
``--prebuild`` runs the same start-up and exits 0 once warm-up is done: it fills the compile caches
(launch.sh's TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR) for the next start.

Exit codes: 0 after a requested stop (SIGTERM/SIGINT to rank 0: it drains for up to
``server.shutdown_grace_s``, then stops the followers); EXIT_CRASH when anything breaks -- an exception
on any rank, rank 0 gone (a follower's broadcast raises), or a step running longer than
``server.step_timeout_s`` (a dead or hung rank) -- after every request in flight got its 503; also a
start-up (from the process's start to ready) longer than ``server.startup_timeout_s``, and launch.sh gone
(lifeline.py: every rank exits). The launcher then stops the other ranks and launch.sh exits non-zero, so
that a supervisor restarts it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from . import lifeline
from .checkpoint import demo_dir
from .config import add_cli_args, config_from_args
from .model import DTYPES, init_distributed, load_model, load_processor, log
from .plan import ControlChannel, StepPlan
from .runner import ModelRunner, follower_loop
from .runner.memory import PlanError, plan_memory
from .runner.model_runner import prepare_model

EXIT_CRASH = 1
# Tests only (tests/test_lifecycle.py): a follower sleeps this many seconds after loading, stuck in start-up
# as far as rank 0 can tell. Inert unless set.
STALL_ENV = "DSQV_TEST_STARTUP_STALL_S"
# How long the IPC threads get to deliver the 503s of a failure before the process ends.
FLUSH_S = 0.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds_qwen_vision.serve")
    add_cli_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prebuild", action="store_true",
                        help="load, warm up (filling the compile caches) and exit 0, serving nothing")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    model_dir = str(demo_dir()) if config.is_demo else config.model
    rank = int(os.environ.get("RANK", "0"))  # the launcher's; the process group is joined below
    pid_file = config.socket_path() + ".pid"  # launch.sh signals rank 0 there
    ipc = None

    def leave(why: str) -> None:
        """Exit now, leaving nothing behind: a start-up past its deadline, or launch.sh gone."""
        log(f"[rank {rank}] {why}; exiting")
        if ipc is not None:
            ipc.close()  # removes the socket
            remove_pid_file(pid_file)
        hard_exit(EXIT_CRASH)

    lifeline.watch_launcher(lambda: leave("launch.sh is gone (killed?): nothing of a deployment outlives it"))
    # Until ready, where the step watchdog takes over: a rank stuck in start-up raises nowhere.
    startup = StartupWatchdog(config.server.startup_timeout_s, leave)
    if rank == 0:
        startup.start()
    startup.phase = "joining the process group"
    rank, world = init_distributed(config.device)
    if world != config.tensor_parallel.tp_size:
        raise SystemExit(f"started {world} ranks but tensor_parallel.tp_size is {config.tensor_parallel.tp_size}")
    if rank == 0 and not args.prebuild:
        from .ipc import IpcServer

        # Open at once: /health says "loading" instead of nothing answering for the whole start-up.
        ipc = IpcServer(config.socket_path(), Starting(world)).start()
    t0 = time.perf_counter()
    spec = config.speculative
    if spec.method == "mtp":
        from .loading import has_mtp_weights

        if not has_mtp_weights(model_dir):
            log(f"[rank {rank}] config error: speculative.method is mtp but {model_dir} has no mtp.* weights "
                f"(use method ngram or none)")
            return 2
    startup.phase = "loading the checkpoint"
    model = load_model(model_dir, world, config.device, DTYPES[config.dtype], mtp=spec.method == "mtp")
    processor = load_processor(model_dir)
    if rank != 0 and os.environ.get(STALL_ENV):
        time.sleep(float(os.environ[STALL_ENV]))
    device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else torch.device("cpu")
    limits = config.limits
    # The memory planner (runner/memory.py): sequences, KV blocks and the limits that follow from them.
    prepare_model(model, device)
    if spec.method == "mtp" and spec.draft_vocab:  # before the planner measures what the weights left
        from .mtp import attach_draft_head

        problem = attach_draft_head(model, processor.tokenizer, spec.draft_vocab, device)
        if problem is not None:
            log(f"[rank {rank}] config error: {problem}")
            return 2
    spec_k = spec.num_tokens if spec.method != "none" else 0
    startup.phase = "planning memory"
    try:
        memory = plan_memory(SimpleNamespace(model=model, device=device, dtype=DTYPES[config.dtype]), limits,
                             config.memory, config.cache, spec_k, spec.method == "mtp")
    except PlanError as e:
        log(f"[rank {rank}] config error: {e}")
        return 2
    if rank == 0:
        log(f"[rank 0] memory plan: {memory.summary()}")
    limits.max_prompt_tokens, limits.max_image_pixels = memory.max_prompt_tokens, memory.max_image_pixels
    startup.phase = "building the runner (capturing its graphs)"
    runner = ModelRunner(model, device, max_slots=memory.max_slots, max_len=memory.max_len,
                         allreduce=config.allreduce,
                         speculative={"method": spec.method, "num_tokens": spec.num_tokens, "rows": memory.spec_rows},
                         prefill_graph_tokens=limits.prefill_chunk_tokens if device.type == "cuda" else 0,
                         mixed_prefill=limits.mixed_prefill, num_blocks=memory.num_blocks,
                         block_size=memory.block_size, kv_fp8=memory.kv_cache_dtype == "fp8_e4m3",
                         state_dtype=DTYPES[memory.gdn_state_dtype])
    runner.memory_plan = memory.as_dict()
    channel = ControlChannel(memory.max_slots)
    log(f"[rank {rank}] {model_dir} loaded at tp={world} on {config.device}/{config.dtype} "
        f"in {time.perf_counter() - t0:.1f}s")
    if rank != 0:
        if follow(runner, channel, rank) != 0:
            hard_exit(EXIT_CRASH)
        return 0

    from .engine import Engine
    from .engine.warmup import warm_up

    engine = Engine(runner, channel, processor, config.limits, config.sampling.generation_config_defaults,
                    cache=config.cache)
    engine.phase, startup.phase = "warming_up", "warming up"
    if ipc is not None:
        ipc.handler = engine  # health and requests from now on: 503s with the phase until ready
    warm_up(engine, log)  # also sets the scheduler's prefill budget (limits.max_gap_steps)
    if args.prebuild:
        channel.broadcast(StepPlan(stop=True))
        startup.done.set()
        log(f"[rank 0] prebuilt in {lifeline.age_s():.1f}s; the compile caches are filled")
        return 0
    grace_s = config.server.shutdown_grace_s

    def on_signal(*_) -> None:
        # SIGTERM/SIGINT: refuse new work, drain for up to grace_s, stop the followers, exit 0. A second
        # signal cuts the drain short.
        engine.stop(0.0 if engine.stopping.is_set() else grace_s)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    engine.heartbeat()  # every rank reports ready
    engine.phase = "ready"
    startup.done.set()
    Path(pid_file).write_text(str(os.getpid()))

    crashing = threading.Lock()  # the watchdog and the main thread may both get here; the first one exits

    def crash() -> None:
        with crashing:
            time.sleep(FLUSH_S)  # engine.fail() queued a 503 for every request; let the IPC threads send them
            ipc.close()
            remove_pid_file(pid_file)
            hard_exit(EXIT_CRASH)

    StepWatchdog(engine, config.server.step_timeout_s, crash).start()
    # From the process's start: imports and joining the group (DeepSpeed's CPU op JIT-built there on a first
    # start) are a large part of a start-up, which the time since loading began leaves out.
    log(f"[rank 0] engine ready on {config.socket_path()} {lifeline.age_s():.1f}s after this process started "
        f"({time.perf_counter() - t0:.1f}s of them loading and warming up)")
    try:
        engine.run()
    except BaseException:  # run() has failed every request already
        log(f"[rank 0] the engine loop failed; exiting\n{traceback.format_exc()}")
        crash()
    finally:
        ipc.close()
        remove_pid_file(pid_file)
        # Python restores the default handlers while it shuts down; a late SIGTERM would then kill this
        # rank mid-teardown and make the launcher report a failure.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    return 0


class Starting:
    """Rank 0's IPC handler while the ranks load: /health says so, requests get a 503."""

    def __init__(self, world: int):
        self.world = world

    def health(self) -> dict:
        return {"ready": False, "phase": "loading", "alive": True, "stopping": False, "failure": None,
                "ranks": [], "queue_depth": 0, "in_flight": 0}

    def metrics(self) -> str:
        return ""

    def generate(self, request: dict):
        from .ipc import error_event

        yield error_event(503, "the server is starting (loading); retry once /health is 200",
                          code="loading")


def follow(runner, channel, rank: int) -> int:
    """A follower rank: run rank 0's plans until it says stop (0). An exception -- rank 0 gone (gloo's
    broadcast raises when its peer's connection drops), an error in a plan -- is EXIT_CRASH."""
    try:
        follower_loop(runner, channel)
    except BaseException:
        log(f"[rank {rank}] stopped by an error; exiting\n{traceback.format_exc()}")
        return EXIT_CRASH
    return 0


class StartupWatchdog(threading.Thread):
    """Rank 0's guard over start-up, from the process's start to ready (joining the group, loading, the
    memory plan, graph capture, warm-up: collectives all), where a stuck rank raises nowhere and the step
    watchdog does not run yet. Past ``timeout_s`` (server.startup_timeout_s) unless ``done`` is set,
    ``on_expiry(why)`` ends the process; the launcher then stops the other ranks."""

    def __init__(self, timeout_s: float, on_expiry):
        super().__init__(name="startup-watchdog", daemon=True)
        self.timeout_s, self.on_expiry = timeout_s, on_expiry
        self.phase = "starting"  # what start-up is doing, for the message
        self.done = threading.Event()

    def run(self) -> None:
        if not self.done.wait(max(0.0, self.timeout_s - lifeline.age_s())):
            self.on_expiry(f"start-up took longer than server.startup_timeout_s = {self.timeout_s:g} s, still "
                           f"{self.phase} (a rank is stuck or slow)")


class StepWatchdog(threading.Thread):
    """Rank 0's guard against a dead or hung rank, which raises nowhere: the CPU shared-memory all-reduce
    spins forever waiting for a peer that is gone (NCCL blocks as long).

    A collective (`Engine.busy_since`) running longer than ``timeout_s`` fails every request in flight or
    queued with a 503 and calls ``on_hang``, which ends the process.  It works from a second thread because
    the collectives release the GIL while they wait.
    """

    def __init__(self, engine, timeout_s: float, on_hang):
        super().__init__(name="step-watchdog", daemon=True)
        self.engine, self.timeout_s, self.on_hang = engine, timeout_s, on_hang

    def run(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout_s / 4))
            since = self.engine.busy_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                why = f"a step took longer than server.step_timeout_s = {self.timeout_s:g} s (a rank is dead or hung)"
                log(f"[rank 0] {why}; failing every request and exiting")
                self.engine.fail(why, "rank_lost")
                self.on_hang()
                return


def remove_pid_file(path: str) -> None:
    """Rank 0's pid file, unless another process has written its own there since."""
    try:
        if Path(path).read_text() == str(os.getpid()):
            os.unlink(path)
    except FileNotFoundError:
        pass


def hard_exit(code: int) -> None:
    """End the process now: a normal interpreter exit can block for good in the teardown of a process
    group whose peer is gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
