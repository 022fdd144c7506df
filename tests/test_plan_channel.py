"""plan.ControlChannel between two gloo ranks: every kind of plan arrives equal to what rank 0 sent; decode and
speculative steps (decode rows, verify rows, accepts, released slots, hold) as the fixed-size tensor alone,
anything else pickled after it."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ds_qwen_vision.plan import FROM_DEVICE, ControlChannel, Prefill, StepPlan

PLANS = [
    StepPlan(decode=[(0, FROM_DEVICE), (2, 17)]),
    StepPlan(),
    StepPlan(accept=[(0, 3), (1, 0)], verify=[(0, [5, 6, 7, 8]), (1, [9]), (3, [4] * 8)], decode=[(2, FROM_DEVICE)],
             release=[4], hold=True),
    StepPlan(verify=[(s, [s]) for s in range(6)], hold=True),
    StepPlan(release=[0, 1]),
    StepPlan(prefill=[Prefill(1, [1, 2, 3], start=0, end=2)], accept=[(0, 1)], verify=[(0, [3])], hold=True),
    StepPlan(decode=[(0, 1)], evict_images=["key"]),
    StepPlan(verify=[(0, [1] * 9)]),  # more tokens than the tensor carries: pickled, still whole
    StepPlan(decode=[(s, s) for s in range(7)]),  # more rows than slots: pickled
    StepPlan(heartbeat=True),
    StepPlan(stop=True),
]
TENSOR_ONLY = [0, 1, 2, 3, 4, 9, 10]


def worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    channel = ControlChannel(max_slots=6)
    pickled = []
    original = dist.broadcast_object_list

    def counting(*args, **kwargs):
        pickled.append(len(received))
        return original(*args, **kwargs)

    dist.broadcast_object_list = counting
    received = []
    for plan in PLANS:
        received.append(channel.broadcast(plan if rank == 0 else None))
    if rank == 1:
        out.put((received, pickled))
    dist.destroy_process_group()


def test_every_plan_arrives_whole_and_steps_without_a_pickle():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    received, pickled = out.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert received == PLANS
    assert sorted(set(range(len(PLANS))) - set(pickled)) == TENSOR_ONLY
