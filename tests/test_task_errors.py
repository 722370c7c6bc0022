"""The error record a failing task leaves for run-local (pneumonia_kfp.task_errors): written by the task
itself, so run-local never reads why a task failed out of kfp's log lines."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pneumonia_kfp.documents import DocumentError
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.task_errors import TASK_ERRORS_ENV, failure_line, read_records, recording_errors


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv(TASK_ERRORS_ENV, str(tmp_path))
    return tmp_path


def test_a_failing_task_leaves_its_record_and_the_exception_goes_on(records):
    with pytest.raises(DataError), recording_errors("ingest-op"):
        assert [(r.task, r.state) for r in read_records(records)] == [("ingest-op", "running")]
        raise DataError("1 of 29 files rejected: train/NORMAL/bad.jpeg: not an image\n(the second line)")
    [path] = records.iterdir()
    doc = json.loads(path.read_text())
    assert doc["format"] == 1 and doc["task"] == "ingest-op" and doc["state"] == "failed"
    assert doc["type"] == "DataError" and doc["message"].endswith("(the second line)")
    assert failure_line(records) == ("task ingest-op failed: DataError: 1 of 29 files rejected: "
                                     "train/NORMAL/bad.jpeg: not an image")


def test_a_task_that_succeeds_leaves_nothing(records):
    with recording_errors("start-op"):
        pass
    assert list(records.iterdir()) == [] and failure_line(records) is None


@pytest.mark.parametrize("error, line", [
    (KeyboardInterrupt(), "KeyboardInterrupt"),  # not an Exception: a stopped task is a failed task too
    (Exception("plain"), "Exception: plain"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_any_exception_is_recorded_by_its_class_name(records, error, line):
    with pytest.raises(type(error)), recording_errors("train-op"):
        raise error
    assert failure_line(records) == f"task train-op failed: {line}"


def test_the_first_failure_is_the_one_reported(records):
    with pytest.raises(torch.OutOfMemoryError), recording_errors("train-op"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(ValueError), recording_errors("evaluate-op"):
        raise ValueError("a later task's error")
    assert failure_line(records) == "task train-op failed: OutOfMemoryError: CUDA out of memory"
    assert [r.task for r in read_records(records)] == ["train-op", "evaluate-op"]


def test_a_killed_task_leaves_its_running_record(records):
    code = ("import os, signal; from pneumonia_kfp.task_errors import recording_errors\n"
            "with recording_errors('train-op'):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, TASK_ERRORS_ENV: str(records)})
    assert killed.returncode == -9
    assert failure_line(records) == "task train-op failed: no error record (killed?)"
    with pytest.raises(ValueError), recording_errors("evaluate-op"):
        raise ValueError("bad")
    assert failure_line(records) == "task evaluate-op failed: ValueError: bad"  # a failure says more


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(TASK_ERRORS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError), recording_errors("ingest-op"):
        raise DataError("x")
    assert list(tmp_path.iterdir()) == []


def test_a_record_of_another_format_is_one_line_naming_it(records):
    (records / "train-op-1.json").write_text(json.dumps({"format": 2, "task": "train-op"}))
    with pytest.raises(DocumentError, match=r"train-op-1\.json: task error record document with format 2"):
        failure_line(records)


def test_every_component_records_under_its_task_name_in_the_pipeline():
    """The name each step's body passes to recording_errors is its task's name in the pipeline (deploy-op too,
    which runs only with serve_name)."""
    from pneumonia_kfp.pipelines.pipeline import build_pipeline

    spec = build_pipeline(2).pipeline_spec
    dags = [spec.root.dag] + [c.dag for c in spec.components.values()]
    component_of = {name: task.component_ref.name for dag in dags for name, task in dag.tasks.items()}
    executors = spec.deployment_spec["executors"]
    for task in ("start-op", "ingest-op", "train-op", "evaluate-op", "report-op", "deploy-op"):
        program = "\n".join(executors[spec.components[component_of[task]].executor_label]["container"]["command"])
        assert f'recording_errors("{task}")' in program, task
