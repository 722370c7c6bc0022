"""Child processes that die with their parent, the process table (/proc), stop signals turned into an
exception (so that ``finally`` blocks and context managers clean up), and how many cores this process may use."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import signal
import sys
import threading
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


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/<pid>/stat field 22); None when it does not run.
    A PID and its start time name one process: a reused PID has a later start."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None and fields[0] != "Z" else None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A stop signal arrived (SIGINT, SIGTERM, SIGHUP). A BaseException, like KeyboardInterrupt: no
    ``except Exception`` swallows it, and every ``finally`` and context manager on the way runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise():
    """While inside: the first stop signal raises :class:`Stopped` in the main thread; later ones are
    ignored, so that the cleanup the first one started is not cut short (SIGKILL still ends it; the
    next run then removes what it left, see ``scratch``). Child processes forked meanwhile that
    inherit the handler exit at once with 128 + the signal, as they would without it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread; there, the caller's own stay
        return
    me, stopping = os.getpid(), []

    def handler(signum, _frame):
        if os.getpid() != me:
            os._exit(128 + signum)
        if stopping:
            return
        stopping.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stoppable(command):
    """A CLI command (``func(args) -> exit code``) that a stop signal ends cleanly: its cleanup runs
    and it exits 128 + the signal's number with one line on stderr."""
    @functools.wraps(command)
    def run(args) -> int:
        try:
            with stop_signals_raise():
                return command(args)
        except (Stopped, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
            sys.stderr.write(f"pneumonia-kfp {args.command}: stopped by {signal.Signals(signum).name}; "
                             "its temporary files were removed\n")
            return 128 + signum
    return run


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
