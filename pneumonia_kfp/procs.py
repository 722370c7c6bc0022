"""Child processes that die with their parent, and how many cores this process may use."""
from __future__ import annotations

import ctypes
import math
import os
import signal
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (even by SIGKILL).

    Call it first thing in a child; ``parent_pid`` is who started it: if that parent is already
    gone (it died before the request took effect), exit at once.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the caller's other means (pipes closing) still apply
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset), capped by a cgroup CPU quota (a
    Kubernetes CPU limit), which ``os.cpu_count()`` does not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
