"""Start real DeepSpeed ranks from a test: `deepspeed --num_gpus N` (CPU ranks on a machine without GPUs)."""
import glob
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nranks: int, args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `args` (a script and its arguments, or --module M ...) on `nranks` ranks; raise with the log on failure."""
    # --no_local_rank: the ranks read LOCAL_RANK from the environment, their argv stays their own.
    port = free_port()
    cmd = ["deepspeed", "--no_local_rank", "--num_gpus", str(nranks), "--master_port", str(port), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    finally:  # DeepSpeed's CPU all-reduce never unlinks its shared-memory buffers (69 MB per rank)
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            os.unlink(path)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


if __name__ == "__main__":
    sys.exit(launch(int(sys.argv[1]), sys.argv[2:]).returncode)
