"""Nothing outlives launch.sh: its ranks and its HTTP front exit when it is gone, whatever ended it (kill -9,
an OOM kill, a supervisor's escalation), so that the port, the GPUs and their locks are free for a restart.

launch.sh exports its pid as DSQV_LAUNCHER_PID and starts two trees, each in a session of its own:
* the HTTP front, its own child, through ``python -m ds_qwen_vision.lifeline SIGNAL CMD ...``: the kernel
  sends SIGNAL to CMD when its parent dies (prctl PR_SET_PDEATHSIG, which survives the exec);
* the deepspeed launcher, whose ranks are children of DeepSpeed's launch.py, itself a child of DeepSpeed's
  runner: a parent-death signal cannot be chained through processes that are not ours (the runner dies of
  it and leaves launch.py running), so each rank watches launch.sh itself (`watch_launcher`) and exits
  when it is gone; launch.py then sees its ranks exit and stops, and the runner with it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

LAUNCHER_ENV = "DSQV_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask the kernel for `sig` when this process's parent dies (Linux; kept across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _stat(pid: int | str) -> tuple[str, float] | None:
    """(state, start in seconds since boot) of a process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[19]) / os.sysconf("SC_CLK_TCK")


def age_s() -> float:
    """Seconds since this process started, imports and all."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - _stat("self")[1]


def alive(pid: int) -> bool:
    """Whether `pid` still runs the process that started before this one: not gone, not a zombie waiting
    for its parent to reap it (launch.sh killed under a supervisor that has not waited yet), not a newer
    process that was given the same pid."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in "ZX" and stat[1] <= _stat("self")[1]


def watch_launcher(on_gone, poll_s: float = 0.5) -> threading.Thread | None:
    """Call `on_gone()` (from a daemon thread, once) when the launch.sh that started this process is gone;
    None without a launch.sh (the ranks of a test or of the generate command)."""
    pid = os.environ.get(LAUNCHER_ENV)
    if not pid:
        return None

    def watch() -> None:
        while alive(int(pid)):
            time.sleep(poll_s)
        on_gone()

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> None:
    """``python -m ds_qwen_vision.lifeline SIGNAL CMD ...``: CMD, signalled with SIGNAL (a name: TERM, QUIT)
    when launch.sh, this process's parent, dies."""
    sig, cmd = getattr(signal, "SIG" + argv[0]), argv[1:]
    die_with_parent(sig)
    if str(os.getppid()) != os.environ.get(LAUNCHER_ENV, str(os.getppid())):
        sys.exit(f"lifeline: launch.sh ({os.environ[LAUNCHER_ENV]}) is gone; not starting {cmd[0]}")
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
