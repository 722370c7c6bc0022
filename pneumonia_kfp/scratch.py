"""Scratch folders: ingest's, evaluate's and the pretrained-weights loader's temporary files.

Each use gets ``$TMPDIR/pneumonia-kfp-<uid>/<pid>-<prefix><random>/`` holding ``owner.json`` (the
owner's PID, its start time, the boot and the PID namespace) and ``work/``, the folder the caller
writes. The folder goes when the use ends, also when a stop signal ends it (the CLI turns SIGINT,
SIGTERM and SIGHUP into an exception, ``procs.stoppable``). One that a SIGKILL (or the OOM killer)
left behind is removed by the next use on the machine, but only once its owner is gone: its PID no
longer runs, or runs a later process (a reused PID has another start time), or the machine was
rebooted since. Folders of another PID namespace (another container sharing this /tmp) are left
alone: their PIDs mean nothing here.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pneumonia_kfp.errors import PneumoniaKfpError
from pneumonia_kfp.procs import start_time

OWNER = "owner.json"
WORK = "work"
UNOWNED_GRACE_S = 600  # a folder without owner.json is being made (or was killed while being made)


def scratch_root() -> Path:
    """Where scratch folders go: one folder per user under the temporary directory ($TMPDIR)."""
    return Path(tempfile.gettempdir()) / f"pneumonia-kfp-{os.geteuid()}"


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _pid_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None


def owner_of(pid: int) -> dict:
    """What names a running process beyond its PID."""
    return {"pid": pid, "start": start_time(pid), "boot": _boot_id(), "pidns": _pid_namespace()}


def owner_gone(owner: dict) -> bool:
    """Whether the process that ``owner`` (from :func:`owner_of`) describes has ended."""
    if owner.get("boot") and _boot_id() and owner["boot"] != _boot_id():
        return True  # rebooted since
    if owner.get("pidns") != _pid_namespace():
        return False  # another namespace's PID: cannot tell, keep it
    now = start_time(int(owner["pid"]))
    return now is None or now != owner.get("start")


def _make_root() -> Path:
    root = scratch_root()
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)  # in the temporary directory, which exists
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PneumoniaKfpError(f"{root} is not a directory of this user's (uid {os.geteuid()}); remove it, or "
                                "set TMPDIR to another directory for the temporary files")
    return root


def sweep(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders whose owner is gone; the folders removed."""
    root = root or scratch_root()
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            path, gone = Path(entry.path), False
            try:
                owner = json.loads((path / OWNER).read_text())
                gone = owner_gone(owner)
            except FileNotFoundError:
                with contextlib.suppress(FileNotFoundError):
                    gone = time.time() - entry.stat(follow_symlinks=False).st_mtime > UNOWNED_GRACE_S
            except (OSError, ValueError, KeyError, TypeError):
                gone = True  # an unreadable owner.json: written by no finished scratch_dir()
            if gone:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def scratch_dir(prefix: str = "") -> Iterator[str]:
    """A fresh empty folder (its path, as ``tempfile.TemporaryDirectory`` gives it), removed on the way out;
    first the folders of killed owners go."""
    root = _make_root()
    sweep(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{prefix}", dir=root))
    try:
        partial = folder / f".{OWNER}.partial"
        partial.write_text(json.dumps(owner_of(os.getpid())))
        os.replace(partial, folder / OWNER)
        (folder / WORK).mkdir()
        yield str(folder / WORK)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename:  # a full disk: say it is the scratch's
            raise OSError(e.errno, e.strerror, str(folder)) from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
