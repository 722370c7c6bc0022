"""run-local's OUT: whose it is, its lock, and its outputs, each replaced whole.

OUT is run-local's: ``OUT/.lock`` (``flock``), held by run-local and its runner for the whole run, refuses
a second run on the same OUT at the same time, naming the PID that holds it; the kernel releases it
however they end, SIGKILL included. A later run on an OUT run-local made (it carries
``OUT/.pneumonia-kfp-run-local``) replaces its outputs; an OUT holding anything else is refused unless
``--force``. Each output is replaced whole: written under a temporary name in OUT, then renamed over the
old one (``models/``: a new folder renamed in place), so a reader sees the last finished run's file or
this run's, never a mix. The log is written under ``OUT/.run-local/`` and renamed to
``OUT/run-local.log`` when the run ends, however it ends (a SIGKILL of the whole group aside): it is
always one whole run's log.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.outputs import PARTIAL, document, replacing, write_file
from pneumonia_kfp.procs import alive

LOG_FILE = "run-local.log"
LOCK_FILE = ".lock"  # under OUT: flock'ed for the whole run; holds the PIDs of run-local and its runner
MARKER = ".pneumonia-kfp-run-local"  # under OUT: run-local made this folder; a later run may replace its outputs
PROBE = ".write-test"  # check_output's, for a moment


def check_output(out: Path) -> Path:
    """OUT as a writable directory, or a UsageError before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / PROBE
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output {out}: cannot write there ({e.strerror or e}); "
                         "choose a writable directory") from None
    return out


def check_owner(out: Path, force: bool) -> None:
    """OUT is run-local's (it carries MARKER) or empty; anything else only with ``force``."""
    if (out / MARKER).exists():
        return
    foreign = sorted(set(os.listdir(out)) - {LOCK_FILE, MARKER, PROBE})
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(f"--output {out} holds files run-local did not write ({shown}); choose an empty or new "
                         "directory, or pass --force to write into it (replacing results.json, report.md, "
                         "report.html, predictions.csv, models/ and run-local.log there)")


def lock_output(out: Path) -> int:
    """Lock OUT for this run (its descriptor; closing it, or this process ending, unlocks), or a UsageError
    naming the PID of the run that holds it."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise UsageError(f"--output {out} is in use by another run-local ({holder}); wait for it to end, or "
                         "choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    deadline = time.monotonic() + 2
    while True:  # the holder writes its PID just after it locks
        words = os.pread(fd, 100, 0).decode(errors="replace").split()
        if words or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not words or not words[0].isdigit():
        return "PID unknown"
    pid = int(words[0])
    if alive(pid) or len(words) < 3:
        return f"PID {pid}"
    return f"PID {pid}, ended; its runner, PID {words[2]}, is still stopping its tasks"


def claim_output(out: Path) -> None:
    """With OUT locked: mark it as run-local's, and remove what a killed run left half-written."""
    (out / MARKER).write_text("This folder is written by `pneumonia-kfp run-local`; it replaces the files it "
                              "wrote here.\n")
    for entry in os.scandir(out):
        if PARTIAL in entry.name and entry.name.startswith("."):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{PARTIAL}{os.getpid()}")


def publish_outputs(task, results: dict, out: Path) -> None:
    """OUT/models/<backbone>/ (checkpoint and exported forms), predictions.csv, report.md, report.html and, last,
    results.json (naming the copies in OUT/models instead of the runner's artifact paths), each replacing
    the last run's whole."""
    models, new = out / "models", _partial(out / "models")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    for m in results["models"]:
        src = m.get("model_uri")
        if src and Path(src).is_dir():
            shutil.copytree(src, new / m["backbone"])
            m["model_uri"] = str(models / m["backbone"])
    old = out / f".models-old{PARTIAL}{os.getpid()}"
    if models.exists():
        os.rename(models, old)
    os.rename(new, models)
    shutil.rmtree(old, ignore_errors=True)
    for name, artifact in (("predictions.csv", "predictions"), ("report.md", "report_md"),
                           ("report.html", "report_html")):
        with replacing(out / name) as tmp:
            shutil.copyfile(task.outputs[artifact].path, tmp)
    write_file(out / "results.json", document(results))


def publish_log(state: Path, out: Path) -> None:
    """The run's log, OUT/.run-local/run-local.log, as OUT/run-local.log (a whole log replaces a whole log)."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(state / LOG_FILE, out / LOG_FILE)
