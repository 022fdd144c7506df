"""Start real DeepSpeed ranks from a test: `deepspeed --num_gpus N` (CPU ranks on a machine without GPUs)."""
import glob
import os
import signal
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
    # A session of their own: a timeout (ranks that hang in a collective) or Ctrl-C ends the ranks too, not
    # only the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout:g} s\n--- stderr\n{err[-8000:]}") \
            from None
    finally:  # the ranks unlink their shared-memory buffers once joined (model.init_distributed); a rank that
        # died earlier leaves its own (69 MB)
        left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        for path in left:
            os.unlink(path)
    proc = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert proc.returncode != 0 or not left, f"the ranks left {left} behind"
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


if __name__ == "__main__":
    sys.exit(launch(int(sys.argv[1]), sys.argv[2:]).returncode)
