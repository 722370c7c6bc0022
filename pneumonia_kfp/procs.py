"""Child processes that die with their parent, the process table (/proc), and how many cores this
process may use."""
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


def process_table() -> dict[int, list[str]]:
    """{pid: the fields of /proc/<pid>/stat after the command name} of every process now (Linux):
    [0] the state ("Z": a zombie), [1] the parent pid, [2] the process group."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:  # the command name, in parentheses, may itself hold spaces and ")"
                table[int(entry.name)] = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
    return table


def descendants(pid: int) -> set[int]:
    """Children, grandchildren … of ``pid``, now."""
    parents = {p: int(fields[1]) for p, fields in process_table().items()}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
