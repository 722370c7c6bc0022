"""How a pipeline task ended, as a record run-local reads instead of scraping the task's log.

Every component runs its body inside :func:`recording_errors`. Where ``PNEUMONIA_KFP_TASK_ERRORS`` names a
folder (run-local sets it to one under OUT; subprocess tasks inherit it, and the docker runner passes every
``PNEUMONIA_KFP_*`` variable into the task containers, where OUT is mounted at the same path), the task
writes ``<task>-<random>.json`` there as it starts (``running``), rewrites it with the exception's type and
message when it fails (``failed``), and removes it when it succeeds. The exception is raised again, so kfp
still marks the task failed and its log keeps the traceback. A record still ``running`` once the pipeline has
ended is a task killed from outside (SIGKILL, the out-of-memory killer). Without the variable (a cluster,
whose UI shows the task's log) nothing is written.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pneumonia_kfp.documents import check_format, require
from pneumonia_kfp.outputs import PARTIAL, OutputError, document, write_file

TASK_ERRORS_ENV = "PNEUMONIA_KFP_TASK_ERRORS"
FORMAT = 1
KIND = "task error record"
RUNNING, FAILED = "running", "failed"


@dataclass(frozen=True)
class TaskRecord:
    """One task's record: ``type`` and ``message`` of the exception that ended it (empty while it runs)."""

    task: str  # the component's task name in the pipeline, e.g. ingest-op
    state: str  # RUNNING or FAILED
    time: float  # when it started, or failed (seconds since the epoch): the first failure is reported
    type: str = ""  # the exception's class name, e.g. DataError
    message: str = ""
    format: int = FORMAT

    def line(self) -> str:
        """What the console's last line says about this task."""
        if self.state == RUNNING:
            return f"task {self.task} failed: no error record (killed?)"
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"task {self.task} failed: {self.type}: {first}" if first else f"task {self.task} failed: {self.type}"


@contextlib.contextmanager
def recording_errors(task: str):
    """Record how ``task`` ends (see the module's docstring); the exception, of any kind, goes on unchanged."""
    folder = os.environ.get(TASK_ERRORS_ENV)
    if not folder:
        yield
        return
    path = Path(folder) / f"{task}-{secrets.token_hex(6)}.json"  # containers' PIDs repeat: a random name
    _write(path, TaskRecord(task, RUNNING, time.time()))
    try:
        yield
    except BaseException as e:  # KeyboardInterrupt and SystemExit end a task too
        _write(path, TaskRecord(task, FAILED, time.time(), type(e).__name__, str(e)))
        raise
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write(path: Path, record: TaskRecord) -> None:
    with contextlib.suppress(OutputError):  # a full disk must not hide the task's own error; its log has it
        write_file(path, document(asdict(record)))


def read_records(folder: Path) -> list[TaskRecord]:
    """Every record in ``folder``, first failure first (running ones after the failed)."""
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if PARTIAL in path.name:  # a writer's temporary file
            continue
        doc = check_format(json.loads(path.read_text()), KIND, FORMAT, str(path))
        require(doc, ("task", "state", "time", "type", "message"), KIND, str(path))
        records.append(TaskRecord(**doc))
    return sorted(records, key=lambda r: (r.state != FAILED, r.time))


def failure_line(folder: Path) -> str | None:
    """Which task failed and why, in one line, from the records in ``folder``; None when there are none."""
    records = read_records(folder)
    return records[0].line() if records else None
