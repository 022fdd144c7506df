"""Host cost of sending a step plan to the followers (plan.ControlChannel: a fixed-size tensor for
decode and verify steps, a pickle after it otherwise; gloo broadcasts).

    python benchmarks/plan_broadcast.py          # 2 processes on this host, CPU only

Every engine step pays it before the forward starts, on top of the runner's step time that
bench_27b.py measures: a decode plan of 16 slots, an MTP step of 16 verify rows with their accepts (k=3),
and a plan carrying an 8,192-token prompt. The first two also pickled (`fits` forced false: how they
travelled before the tensor carried them), same run.
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.plan import ControlChannel, Prefill, StepPlan  # noqa: E402


def worker(rank: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    channel = ControlChannel(max_slots=64)
    step = StepPlan(accept=[(s, s % 4) for s in range(16)], verify=[(s, [1000 + s]) for s in range(16)], hold=True)
    plans = {"16 decodes": (StepPlan(decode=[(s, 1000 + s) for s in range(16)]), True),
             "16 verifies with accepts (MTP)": (step, True),
             "8,192-token prefill": (StepPlan(prefill=[Prefill(0, list(range(100, 8292)), start=0, end=2048)]), False)}
    fits = channel.fits
    for name, (plan, both) in plans.items():
        for pickled in ((False, True) if both else (False,)):
            channel.fits = (lambda plan: False) if pickled else fits
            times = []
            for _ in range(300):
                t = time.perf_counter()
                channel.broadcast(plan if rank == 0 else None)
                times.append(time.perf_counter() - t)
            if rank == 0:
                print(f"{name}{', pickled' if pickled else ''}: median {1e6 * statistics.median(times[50:]):.0f} us, "
                      f"p90 {1e6 * sorted(times[50:])[int(0.9 * 250)]:.0f} us per step")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2,), nprocs=2)
