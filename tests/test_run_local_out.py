"""run-local's OUT, piece by piece (fast; test_run_local.py runs them together in real runs): whose it is, its
lock, and outputs replaced whole."""
import json
import os
import subprocess
import sys
import time

import pytest

from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.pipelines import local, out_folder


@pytest.mark.parametrize("entries", [[], [".lock"], [".write-test"], [".pneumonia-kfp-run-local", "notes.txt"]])
def test_an_empty_or_run_local_made_output_is_taken(tmp_path, entries):
    for name in entries:
        (tmp_path / name).write_text("")
    out_folder.check_owner(tmp_path, force=False)


@pytest.mark.parametrize("names, shown", [(["a", "b", "c"], "a, b, c"), (["a", "b", "c", "d"], "a, b, c and 1 more"),
                                           (["e", "d", "c", "b", "a"], "a, b, c and 2 more")])
def test_an_output_with_other_files_needs_force(tmp_path, names, shown):
    for name in names:
        (tmp_path / name).write_text("")
    with pytest.raises(UsageError) as e:
        out_folder.check_owner(tmp_path, force=False)
    assert str(e.value) == (f"--output {tmp_path} holds files run-local did not write ({shown}); choose an empty or "
                            "new directory, or pass --force to write into it (replacing results.json, report.md, "
                            "report.html, predictions.csv, models/ and run-local.log there)")
    out_folder.check_owner(tmp_path, force=True)


def test_the_backbone_count_limit():
    local.check_backbone_count(["x"] * 32, force=False)
    local.check_backbone_count(["x"] * 40, force=True)
    with pytest.raises(UsageError) as e:
        local.check_backbone_count(["x"] * 33, force=False)
    assert str(e.value) == ("--backbones names 33 models: run-local trains at most 32 (one task each); pass --force "
                            "to train them all")


def test_the_lock_refuses_a_second_holder_naming_the_first_and_is_released_with_its_process(tmp_path):
    code = ("import sys, time; from pathlib import Path; from pneumonia_kfp.pipelines import out_folder; "
            "out_folder.lock_output(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")
    (tmp_path / ".lock").write_text("123456789 runner 123456790\n")  # a longer record of an earlier run
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (tmp_path / ".lock").read_text() == f"{holder.pid}\n"  # the whole record is the holder's
        start = time.monotonic()
        with pytest.raises(UsageError) as e:
            out_folder.lock_output(tmp_path)
        assert time.monotonic() - start < 1  # the PID is there: no waiting for it
        assert str(e.value) == (f"--output {tmp_path} is in use by another run-local (PID {holder.pid}); wait for it "
                                "to end, or choose another --output")
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    fd = out_folder.lock_output(tmp_path)
    try:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


def test_the_refusal_says_when_only_the_runner_still_holds_the_lock(tmp_path):
    fd = out_folder.lock_output(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        os.pwrite(fd, f"{dead.pid} runner 4242\n".encode(), 0)
        with pytest.raises(UsageError, match=f"PID {dead.pid}, ended; its runner, PID 4242, is still stopping"):
            out_folder.lock_output(tmp_path)
        os.pwrite(fd, f"{os.getpid()} runner 4242\n".encode(), 0)
        with pytest.raises(UsageError, match=rf"\(PID {os.getpid()}\)"):
            out_folder.lock_output(tmp_path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("record", ["", "garbage\n"])
def test_a_lock_without_a_pid_is_refused_all_the_same(tmp_path, record):
    fd = out_folder.lock_output(tmp_path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        start = time.monotonic()
        with pytest.raises(UsageError, match=r"in use by another run-local \(PID unknown\)"):
            out_folder.lock_output(tmp_path)
        assert (time.monotonic() - start > 1.5) == (record == "")  # an empty record: waits for the PID a while
    finally:
        os.close(fd)


def test_claim_marks_the_output_and_removes_what_a_killed_run_left_half_written(tmp_path):
    (tmp_path / ".results.json.partial-123").write_text("{")
    (tmp_path / ".models.partial-123" / "resnet18").mkdir(parents=True)
    (tmp_path / "notes.partial-1.txt").write_text("the user's")  # not a hidden partial: kept
    out_folder.claim_output(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".pneumonia-kfp-run-local", "notes.partial-1.txt"]


class _Artifact:
    def __init__(self, path):
        self.path = str(path)


def test_outputs_replace_the_last_runs_whole(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "kfp-root"
    out.mkdir()
    (out / "models" / "old_backbone").mkdir(parents=True)
    (out / "report.md").write_text("old report")
    artifacts = {}
    for name, text in (("predictions", "file,prob\n"), ("report_md", "# new"), ("report_html", "<html>")):
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_text(text)
        artifacts[name] = _Artifact(runs / name)
    (runs / "model-a").mkdir()
    (runs / "model-a" / "checkpoint.pt").write_text("weights")
    results = {"models": [{"backbone": "a", "model_uri": str(runs / "model-a")}, {"backbone": "ensemble"}]}
    out_folder.publish_outputs(type("Task", (), {"outputs": artifacts})(), results, out)
    assert sorted(os.listdir(out)) == ["models", "predictions.csv", "report.html", "report.md", "results.json"]
    assert os.listdir(out / "models") == ["a"] and (out / "models" / "a" / "checkpoint.pt").read_text() == "weights"
    assert (out / "report.md").read_text() == "# new" and (out / "predictions.csv").read_text() == "file,prob\n"
    written = json.loads((out / "results.json").read_text())
    assert written["models"][0]["model_uri"] == str(out / "models" / "a") == results["models"][0]["model_uri"]


def test_a_killed_writers_partial_output_is_one_run_local_removes(tmp_path):
    """outputs' temporary names are the hidden partials run-local's claim removes (a killed run leaves them)."""
    from pneumonia_kfp.outputs import replacing

    with pytest.raises(KeyboardInterrupt), replacing(tmp_path / "report.md") as tmp:
        tmp.write_text("half")
        os.link(tmp, tmp_path / tmp.name.replace("report", "report-copy"))  # what a SIGKILL would leave
        raise KeyboardInterrupt
    assert [n for n in os.listdir(tmp_path) if n.startswith(".report-copy.partial-")]
    out_folder.claim_output(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".pneumonia-kfp-run-local"]


def test_the_log_is_moved_whole_into_out(tmp_path):
    state = tmp_path / ".run-local"
    state.mkdir()
    (tmp_path / "run-local.log").write_text("the last run's log")
    (state / "run-local.log").write_text("this run's log")
    out_folder.publish_log(state, tmp_path)
    assert (tmp_path / "run-local.log").read_text() == "this run's log" and not (state / "run-local.log").exists()
    out_folder.publish_log(state, tmp_path)  # moved already (the runner and run-local both try): nothing happens
    assert (tmp_path / "run-local.log").read_text() == "this run's log"
