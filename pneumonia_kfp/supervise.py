"""A child process group that ends whole: the parent's side (:func:`run_group`) and its leader's
(:func:`lead_group`, :func:`end_group`).

The leader runs in a process group of its own, with everything it starts. It dies with the parent,
even when the parent is killed by SIGKILL (Linux's parent-death signal); a stop signal to the parent
(SIGINT, SIGTERM, SIGHUP) becomes SIGTERM to the group; the leader then ends its members, waiting a
while before it kills them; and whatever outlives the leader is killed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from pneumonia_kfp.procs import STOP_SIGNALS, die_with_parent, process_table


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc: the group outlives its leader)."""
    return [pid for pid, fields in process_table().items() if int(fields[2]) == pgid and fields[0] != "Z"]


def run_group(argv: list[str], pass_fds: tuple[int, ...] = (), started: Callable[[int], None] | None = None,
              after: Callable[[], None] | None = None) -> tuple[int, int | None]:
    """Run ``argv`` as the leader of a new process group and wait for it; a stop signal here sends the group
    SIGTERM. ``started(pid)`` runs as soon as the leader runs; ``after()`` once the group is gone, before
    the signal handlers are restored (a signal during it does not cut it short). Returns the leader's exit
    code and the first stop signal (None without one)."""
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    stopped: list[int] = []
    leader: list[subprocess.Popen] = []

    def stop(signum, _frame):
        stopped.append(signum)
        if leader:
            signal_group(leader[0].pid, signal.SIGTERM)  # the leader ends its members, then exits

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}  # before the leader starts: no gap
    try:
        leader.append(subprocess.Popen(argv, pass_fds=pass_fds, **group))
        if started:
            started(leader[0].pid)
        if stopped:
            signal_group(leader[0].pid, signal.SIGTERM)
        code = leader[0].wait()
    finally:
        if leader:
            signal_group(leader[0].pid, signal.SIGKILL)  # whatever outlived the leader
        try:
            if after:
                after()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return code, (stopped[0] if stopped else None)


def lead_group(parent_pid: int, on_stop: Callable[[int], None]) -> None:
    """In the leader, first thing: die with ``parent_pid``, and call ``on_stop(signum)`` on the first stop
    signal (later ones, and the SIGTERM that ending the group sends this process too, are ignored)."""
    die_with_parent(parent_pid, signal.SIGTERM)

    def stop(signum, _frame):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        on_stop(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, stop)


def end_group(grace_s: float = 10.0) -> None:
    """In the leader: SIGTERM every other member of its group, wait up to ``grace_s`` for them to end, then
    SIGKILL those left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal reaches this process too
    me = os.getpid()
    signal_group(me, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and [p for p in group_members(me) if p != me]:
        time.sleep(0.1)
    for pid in group_members(me):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
