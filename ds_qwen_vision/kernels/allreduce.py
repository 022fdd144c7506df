"""The decode step's all-reduces over peer GPU memory (PyTorch symmetric memory), NCCL for everything else.

Why: a decode step of the 27B at tp=2 runs 130 all-reduces (2 per layer, the embedding, the lm_head) of
rows x 5,120 bf16 (10-160 KiB; the lm_head's 485 KiB per row), each ~7 us in NCCL inside the CUDA graph:
0.9 ms of a 14.6 ms step (2×H200 profile, 2026-11-28). For messages this small the cost is latency, and
a kernel that reads the peers' copies straight out of their memory needs one launch and two barriers.

How: one buffer of `max_bytes` per rank, allocated once with `torch.distributed._symmetric_memory.empty`
and exchanged once over the TP group (`rendezvous`: CUDA IPC of cuMem allocations, every rank maps every
other's buffer, loads and stores travel over NVLink as ordinary peer accesses). Per message:

* ``one_shot`` -- ``symm_mem::one_shot_all_reduce_copy_out``, ONE kernel: copy this rank's tensor into its
  buffer, barrier, sum all ranks' buffers into the tensor, barrier. Each rank reads (world - 1) x the message.
* ``two_shot`` -- copy into the buffer, then ``symm_mem::two_shot_all_reduce_out``: each rank sums 1/world of
  the elements, barrier, gathers the other parts. Reads less per rank; pays for larger messages and tp.

Why it is safe on a shared host (NVLink multicast / NVLS / multimem can take all of a host's GPUs down):
no multicast object is ever created and no multimem instruction is ever run.
* `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` is set in this process before the buffer is allocated: torch's
  `device_has_multicast_support` then answers false and the CUDA backend creates no cuMulticast object.
* The backend is pinned to torch's own "CUDA" one (`TORCH_SYMMMEM`; NVSHMEM would bring its own NVLS
  set-up); any other choice in the environment turns this path off.
* The two ops used here load and store through peer pointers only; the multimem_* ops are never called.
* After the rendezvous the buffer must have a null multicast address (no multicast object mapped over
  it), else the path is refused. NCCL itself is left alone (launch scripts keep `NCCL_NVLS_ENABLE=0`).

CUDA graphs: the choice between this path and NCCL is made in Python from the tensor's device, dtype,
shape and group -- fixed at capture -- so a captured decode graph holds the chosen kernels with the
buffer's fixed addresses; the barriers' signal pads reset themselves, so a replay needs no host work.
The same choice on every rank (ranks run the same step), so ranks never disagree on which path a
collective takes. Consecutive all-reduces can share the one buffer: each kernel's closing barrier keeps
a rank from overwriting its buffer while a peer still reads it.

Where it hooks in: DeepSpeed's TP layers (`LinearAllreduce` via `RowParallel`, `LmHeadLinearAllreduce`,
`VocabParallelEmbedding`) all call `deepspeed.comm.inference_all_reduce`, which calls the comm backend
object's `inference_all_reduce(tensor, op, group)`. `install` replaces that one method on that one object
(DeepSpeed's comms logging around it stays) by a `PeerAllReduce`, which takes the peer path for tensors of
the TP group that qualify (`refusal`) and hands every other call to the original method: NCCL on GPUs, and
on CPU ranks gloo / DeepSpeed's shared-memory kernel, untouched. Training-mode all_reduce is not touched.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

from ..model import agree

MODES = ("off", "one_shot", "two_shot")
# The symm_mem kernels dispatch bf16 and fp32 only (AT_DISPATCH_FLOAT_AND_BFLOAT16).
DTYPES = (torch.bfloat16, torch.float32)
# Vector loads of 16 bytes: the copy kernel requires the tensor's offset to be as aligned as the buffer's.
ALIGN = 16
WORLD_SIZES = range(2, 9)         # one host
TWO_SHOT_WORLD_SIZES = (2, 4, 8)  # two_shot_all_reduce_out has no generic world-size kernel
_ENV = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "TORCH_SYMMMEM": "CUDA"}


def log(msg: str) -> None:
    from ..model import log as model_log
    model_log(f"[rank {os.environ.get('RANK', '0')}] peer all-reduce: {msg}")


def refusal(tensor: torch.Tensor, *, world: int, mode: str, max_bytes: int, device_type: str = "cuda") -> str | None:
    """Why `tensor` must go to the fallback all-reduce, or None when the peer path takes it.

    Depends only on what is fixed at CUDA-graph capture (device, dtype, shape, layout), so every rank
    decides alike and a captured graph keeps its choice.
    """
    if mode not in MODES[1:]:
        return "peer path off"
    if tensor.device.type != device_type:
        return f"not a {device_type.upper()} tensor"
    if world not in WORLD_SIZES:
        return f"tp={world} (peer path for tp 2..8)"
    if mode == "two_shot" and world not in TWO_SHOT_WORLD_SIZES:
        return f"two_shot at tp={world} (tp 2, 4 or 8)"
    if tensor.dtype not in DTYPES:
        return f"dtype {tensor.dtype} (bf16 / fp32 only)"
    if not tensor.is_contiguous():
        return "not contiguous"
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return "empty"
    if nbytes > max_bytes:
        return f"larger than max_bytes ({max_bytes})"
    if nbytes % 4 or (tensor.storage_offset() * tensor.element_size()) % ALIGN:
        return "misaligned (size a multiple of 4 bytes, offset of 16)"
    return None


def _is_sum(op) -> bool:
    from deepspeed.comm import ReduceOp as DsReduceOp

    return op is DsReduceOp.SUM or op == torch.distributed.ReduceOp.SUM


class PeerAllReduce:
    """Stands in for the comm backend's `inference_all_reduce(tensor, op, group)`.

    `counts` tallies the calls Python sees by path ("peer", or the fallback's reason): inside a CUDA
    graph that is the calls at capture, not per replay.
    """

    def __init__(self, original, group, world: int, mode: str, max_bytes: int, buffer: torch.Tensor | None = None):
        self.original = original
        self.group = group
        self.group_name = getattr(group, "group_name", None)
        self.world = world
        self.mode = mode
        self.max_bytes = max_bytes
        self.buffer = buffer  # uint8 [max_bytes], symmetric memory; None on CPU ranks
        self.views = {dtype: buffer.view(dtype) for dtype in DTYPES} if buffer is not None else {}
        self.counts: Counter[str] = Counter()

    def why_not(self, tensor: torch.Tensor, op, group) -> str | None:
        if group is not self.group:
            return "another process group"
        if not _is_sum(op):
            return "not a sum"
        why = refusal(tensor, world=self.world, mode=self.mode, max_bytes=self.max_bytes)
        if why is None and self.buffer is None:
            return "no peer buffer"
        return why

    def __call__(self, tensor: torch.Tensor, op=None, group=None):
        from deepspeed.comm import ReduceOp as DsReduceOp

        op = DsReduceOp.SUM if op is None else op
        why = self.why_not(tensor, op, group)
        self.counts[why or "peer"] += 1
        if why is not None:
            return self.original(tensor, op, group)
        self.reduce_(tensor)
        return tensor

    def reduce_(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the group in place through the peer buffers (the caller checked `refusal`)."""
        flat = tensor.view(-1)
        symm = self.views[tensor.dtype][: flat.numel()]
        ops = torch.ops.symm_mem
        if self.mode == "one_shot":
            # One kernel; `out` may alias `local_input`: each thread reads its elements of the local input
            # (copying them into this rank's buffer) before the barrier and writes the same elements after it.
            ops.one_shot_all_reduce_copy_out(symm, flat, "sum", self.group_name, flat)
        else:
            symm.copy_(flat)
            ops.two_shot_all_reduce_out(symm, "sum", self.group_name, flat)


_buffers: dict[tuple, torch.Tensor] = {}  # never freed: captured graphs keep the buffers' addresses


def _backend():
    from deepspeed.comm import comm

    assert comm.cdb is not None, "deepspeed.init_distributed() first"
    return comm.cdb


def installed() -> PeerAllReduce | None:
    hook = _backend().__dict__.get("inference_all_reduce")
    return hook if isinstance(hook, PeerAllReduce) else None


def uninstall() -> None:
    """Back to DeepSpeed's own method (buffers stay allocated for graphs captured with them)."""
    backend = _backend()
    if isinstance(backend.__dict__.get("inference_all_reduce"), PeerAllReduce):
        del backend.inference_all_reduce


def install(settings, device: torch.device, group, world: int) -> PeerAllReduce | None:
    """Route the TP layers' all-reduces of `group` through the peer path, as `settings` says.

    `settings`: `config.AllReduceConfig` (`peer_memory`, `max_bytes`) or None. Off (or tp=1): DeepSpeed's
    own method, removing a hook installed earlier. Collective on GPUs: every rank of `group` calls it
    together (they construct their runners in lockstep), before any CUDA graph is captured.
    """
    mode = getattr(settings, "peer_memory", "off")
    uninstall()
    if mode == "off" or world < 2:
        return None
    backend = _backend()
    original = backend.inference_all_reduce
    max_bytes = settings.max_bytes
    buffer = None
    if device.type == "cuda":
        buffer = _peer_buffer(device, group, world, mode, max_bytes)
        if buffer is None:
            return None
    else:
        log(f"{mode} asked for on {device.type} ranks: every all-reduce stays with DeepSpeed's")
    hook = PeerAllReduce(original, group, world, mode, max_bytes, buffer)
    backend.inference_all_reduce = hook
    if buffer is not None and not _self_check(hook, device, group):
        uninstall()
        return None
    return hook


def _peer_buffer(device, group, world: int, mode: str, max_bytes: int) -> torch.Tensor | None:
    """The rendezvoused buffer, or None (logged) where the peer path cannot run; same answer on every rank."""
    key = (group.group_name, max_bytes, device.index)
    if key in _buffers:
        return _buffers[key]
    why = None
    if world not in WORLD_SIZES or (mode == "two_shot" and world not in TWO_SHOT_WORLD_SIZES):
        why = f"{mode} at tp={world} is not supported"
    for name, value in _ENV.items():
        if os.environ.setdefault(name, value) != value:
            why = f"{name}={os.environ[name]} in the environment (this path needs {value})"
    op = "one_shot_all_reduce_copy_out" if mode == "one_shot" else "two_shot_all_reduce_out"
    if why is None and not hasattr(torch.ops.symm_mem, op):
        why = f"torch {torch.__version__} has no symm_mem::{op}"
    buffer = None
    if why is None:
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(symm_mem, "set_backend"):
                # raises when a backend was chosen already (TORCH_SYMMMEM pins it too): checked below
                with contextlib.suppress(Exception):
                    symm_mem.set_backend("CUDA")
            enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
            if enable is not None and not getattr(enable, "__deprecated__", None):
                enable(group.group_name)  # older torch: the group's store must be registered first
            buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
            handle = symm_mem.rendezvous(buffer, group.group_name)
            backend = symm_mem.get_backend(device) if hasattr(symm_mem, "get_backend") else None
            if backend not in (None, "CUDA"):
                why = f"symmetric memory backend {backend} (this path uses CUDA's)"
            if handle.multicast_ptr != 0:  # a multicast object is mapped over the buffer
                why = "the buffer came with a multicast address; refused"
        except Exception as e:  # noqa: BLE001 -- any failure keeps NCCL
            why = f"symmetric memory unavailable: {e!r}"
    if not agree(why is None, device, group):
        log(f"off, NCCL keeps every all-reduce ({why or 'another rank could not set it up'})")
        return None
    _buffers[key] = buffer
    return buffer


def _self_check(hook: PeerAllReduce, device, group) -> bool:
    """Exact sums of small integers through the peer path, in both dtypes, agreed by every rank."""
    rank = torch.distributed.get_rank(group)
    good = True
    for dtype in DTYPES:
        n = min(hook.max_bytes // torch.tensor([], dtype=dtype).element_size(), 8192)
        x = (torch.arange(n, device=device) % 7 + rank).to(dtype)
        want = (torch.arange(n, device=device) % 7 * hook.world + sum(range(hook.world))).to(dtype)
        hook.reduce_(x)
        good &= bool(torch.equal(x, want))
    if agree(good, device, group):
        log(f"{hook.mode} for messages up to {hook.max_bytes} bytes at tp={hook.world} "
            f"(torch {torch.__version__}, CUDA backend, no multicast); NCCL for the rest")
        return True
    log("self-check against exact sums failed: off, NCCL keeps every all-reduce")
    return False
