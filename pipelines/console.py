"""What run-local shows on the console of all that kfp's local runner and its tasks print.

Every line goes to the log file; the console gets kfp's task start and finish lines and the steps' own
log lines (kfp's executor formats them ``[KFP Executor <date> <time>,<ms> <LEVEL>]: <message>``), shown
as ``<time> [LEVEL ]<message>``, without kfp's own bookkeeping lines. Why a task failed comes from its
error record (pneumonia_kfp.task_errors), not from here.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import threading

_TASK = re.compile(r"Executing task|finished with status")
_STEP = re.compile(r"\[KFP Executor \S+ (\d\d:\d\d:\d\d),\d+ (INFO|WARNING|ERROR)\]: (.*)")
_NOISE = re.compile(r"^(Looking for component|Loading KFP component|Got executor_input|Wrote executor output)")


class ConsoleFilter(io.TextIOBase):
    """A text stream: every line to the log file, the lines a person reads also to the console."""

    def __init__(self, log, console):
        self.log, self.console, self.pending = log, console, ""
        self.lock = threading.Lock()  # ParallelFor iterations log from several threads

    def write(self, text: str) -> int:
        with self.lock:
            self.log.write(text)
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                step = _STEP.search(line)
                if step and not _NOISE.match(step.group(3)):
                    level = "" if step.group(2) == "INFO" else step.group(2) + " "
                    self.console.write(f"{step.group(1)} {level}{step.group(3)}\n")
                elif _TASK.search(line):
                    self.console.write(line.strip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()


@contextlib.contextmanager
def root_log_to(stream):
    """Log records of the runner (also from ParallelFor threads) through ``stream`` while the pipeline runs."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler(stream)]
    try:
        yield
    finally:
        root.handlers = saved
