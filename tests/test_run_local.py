"""run-local as a user meets it: checks before any task starts, the failing task's own error line last,
and no orphan task or stray workspace when the CLI is interrupted or killed."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pneumonia_kfp.backbones import load_checkpoint
from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.pipelines.console import ConsoleFilter
from pneumonia_kfp.pipelines.local import SYNTHETIC_WARNING
from pneumonia_kfp.procs import alive, descendants
from pneumonia_kfp.synthetic import DEMO_COUNTS, make_synthetic

# what kfp's local runner prints: task start and end lines (with colour codes), each task's output indented
START = "16:04:34.611 - INFO - Executing task \x1b[96m'{}'\x1b[0m\n"
END = "16:04:36.619 - {} - Task \x1b[96m'{}'\x1b[0m finished with status \x1b[{}m{}\x1b[0m\n"


def test_the_console_shows_task_and_step_lines_and_the_log_keeps_everything():
    console, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(log, console)
    printed = (START.format("train-op") +
               "    [KFP Executor 2026-11-27 16:04:34,700 INFO]: Looking for component `train_op` in ...\n"
               "    [KFP Executor 2026-11-27 16:04:35,100 INFO]: resnet50 epoch 1/5  loss 0.6\n"
               "    [KFP Executor 2026-11-27 16:04:35,200 WARNING]: no val split: carved from train\n"
               '    {"executorInput": "one of ~430 lines"}\n'
               "    Traceback (most recent call last):\n"
               "    torch.OutOfMemoryError: CUDA out of memory\n" +
               END.format("ERROR", "train-op", 91, "FAILURE"))
    for piece in (printed[:50], printed[50:333], printed[333:]):  # written in pieces, as threads do
        stream.write(piece)
    assert log.getvalue() == printed
    assert console.getvalue() == (
        "16:04:34.611 - INFO - Executing task \x1b[96m'train-op'\x1b[0m\n"
        "16:04:35 resnet50 epoch 1/5  loss 0.6\n"
        "16:04:35 WARNING no val split: carved from train\n"
        "16:04:36.619 - ERROR - Task \x1b[96m'train-op'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m\n")


def test_a_failing_task_is_the_last_line(tmp_path):
    data = make_synthetic(tmp_path / "data", {"train": 10, "test": 4}, size=40)
    (data / "train" / "NORMAL" / "bad.jpeg").write_text("not an image")
    out = subprocess.run([sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "run-local", "--data", str(data),
                          "--output", str(tmp_path / "out"), "--backbones", "resnet18", "--epochs", "1",
                          "--image-size", "32"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pneumonia-kfp run-local: error: the local pipeline run failed: task ingest-op failed: "
                           "DataError: 1 of 29 files rejected: train/NORMAL/bad.jpeg: not an image")
    assert last.endswith(f"(full log: {tmp_path / 'out' / 'run-local.log'})")
    log = (tmp_path / "out" / "run-local.log").read_text()  # the full log keeps the task's traceback
    assert "Traceback (most recent call last)" in log and "DataError: 1 of 29 files rejected" in log
    assert not (tmp_path / "out" / ".run-local").exists()


@pytest.mark.parametrize("args, message", [
    (["--storage", "gs://bucket/x"], "scheme gs:// is not supported"),
    (["--storage", "file://host/x"], "names the host 'host'"),
    (["--storage", "s3://b/x"], "invalid bucket name b"),
    (["--data", "file://nas/share/xray"], "data URI 'file://nas/share/xray' names the host 'nas'"),
    (["--learning-rate", "nan"], "learning_rate=nan: must be a finite number"),
    (["--learning-rate", "-1"], "learning_rate=-1.0: must be greater than 0"),
    (["--image-size", "100000"], "image_size=100000: must be at most 1024"),
])
def test_settings_are_checked_before_any_task_starts(tmp_path, capsys, args, message):
    rc = main(["run-local", "--output", str(tmp_path / "o"), "--backbones", "resnet18", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "kfp-root").exists()  # nothing ran


@pytest.mark.parametrize("output", ["a-file", "/proc/pneumonia-kfp-out"])
def test_an_unwritable_output_is_one_line(tmp_path, capsys, output):
    (tmp_path / "a-file").write_text("not a directory")
    target = output if output.startswith("/") else str(tmp_path / output)
    rc = main(["run-local", "--output", target, "--backbones", "resnet18"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"--output {target}: cannot write there" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_run_local_ends_its_tasks_and_leaves_no_workspace(tmp_path, sig):
    data = make_synthetic(tmp_path / "data", {"train": 40, "test": 8}, size=40)
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    cli = subprocess.Popen([sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "run-local", "--data", str(data),
                            "--output", str(out), "--backbones", "resnet18", "--epochs", "500", "--image-size", "32"],
                           env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline, training = time.monotonic() + 300, False
    while time.monotonic() < deadline and cli.poll() is None and not training:
        time.sleep(0.2)
        processes = {cli.pid} | descendants(cli.pid)
        training = any(b"train_op" in Path(f"/proc/{p}/cmdline").read_bytes() for p in processes if alive(p))
    assert training, "the train task never started"
    processes = descendants(cli.pid)
    cli.send_signal(sig)
    cli.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in processes):
        time.sleep(0.2)
    assert not [p for p in processes if alive(p)], "task processes outlived run-local"
    # no workspace, no task temp files; torch (2.14) makes its per-user compile cache, torchinductor_<user>, in
    # $TMPDIR on import (run-local imports it for the CPU estimate): a cache meant to stay, not a task's file
    assert not (out / ".run-local").exists()
    assert not [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
    if sig != signal.SIGKILL:
        assert cli.returncode == 128 + sig
        assert f"stopped by {signal.Signals(sig).name}" in cli.stderr.read()


def test_synthetic_run_with_pretrained_weights_from_a_file(tmp_path, capfd):
    import timm

    torch.manual_seed(123)
    imagenet = timm.create_model("resnet18", pretrained=False)  # ImageNet-shaped: 3 channels, 1000 classes
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet.state_dict(), weights)
    out = tmp_path / "out"
    # a learning rate of 1e-9 leaves the weights where they started: the checkpoint shows where that was
    rc = main(["run-local", "--output", str(out), "--backbones", "resnet18", "--epochs", "1", "--image-size", "32",
               "--batch-size", "32", "--learning-rate", "1e-9", "--pretrained", "--pretrained-weights", str(weights)])
    assert rc == 0
    printed = capfd.readouterr().out
    assert "!!! No --data given: using a SYNTHETIC dataset" in printed and SYNTHETIC_WARNING in printed
    assert (out / "synthetic-data" / "train" / "PNEUMONIA").is_dir()

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["synthetic"] is True
    assert results["dataset"]["counts"]["test"] == {c: DEMO_COUNTS["test"] for c in ("NORMAL", "PNEUMONIA")}
    [model] = results["models"]
    assert model["pretrained"] is True and model["backbone"] == "resnet18"
    assert "SYNTHETIC DATA" in (out / "report.md").read_text() and "SYNTHETIC DATA" in (out / "report.html").read_text()

    checkpoint = out / "models" / "resnet18" / "checkpoint.pt"
    trained, meta = load_checkpoint(checkpoint)
    assert meta["pretrained"] is True
    state, source = trained.state_dict(), imagenet.state_dict()
    # timm folds the RGB first convolution into one grayscale channel by summing it
    torch.testing.assert_close(state["conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(state["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"], atol=1e-5, rtol=0)
    assert state["fc.weight"].shape == (2, 512)  # a new 2-class head, not ImageNet's 1000 classes


# --- OUT belongs to one run at a time; outputs are replaced whole --------------------------------------------

def _run_local(data, out, *extra):
    return [sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "run-local", "--data", str(data), "--output",
            str(out), "--epochs", "1", "--image-size", "32", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("tiny"), {"train": 16, "test": 4}, size=32)


def test_a_second_run_on_the_same_output_is_refused_naming_the_first_which_completes(tiny, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(_run_local(tiny, out, "--backbones", "resnet18,mobilenetv3_small_050"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (out / ".run-local" / "spec.json").exists():
        time.sleep(0.05)
    second = subprocess.run(_run_local(tiny, out, "--backbones", "resnet18"), capture_output=True, text=True,
                            timeout=120)
    printed, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr == (f"pneumonia-kfp run-local: error: --output {out} is in use by another run-local "
                             f"(PID {first.pid}); wait for it to end, or choose another --output\n")
    # the first run's outputs and log are whole, and its own
    results = json.loads((out / "results.json").read_text())
    assert sorted(m["backbone"] for m in results["models"]) == ["ensemble", "mobilenetv3_small_050", "resnet18"]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["mobilenetv3_small_050", "resnet18"]
    log = (out / "run-local.log").read_text()
    assert log.count("Executing task \x1b[96m'ingest-op'") == 1  # one run's log, not two interleaved
    assert log.count("Pipeline \x1b[95m'pneumonia-kfp'\x1b[0m finished with status") == 1
    assert "Pipeline \x1b[95m'pneumonia-kfp'\x1b[0m finished with status \x1b[92mSUCCESS" in log
    assert not (out / ".run-local").exists() and not [p for p in os.listdir(out) if ".partial-" in p]
    # the CPU estimate: one line per backbone as it is measured, all before the first task starts
    lines = printed.splitlines()
    first_task = next(i for i, line in enumerate(lines) if "Executing task" in line)
    assert [i for i, line in enumerate(lines) if line.startswith("  resnet18: about ")][0] < first_task
    assert [i for i, line in enumerate(lines) if line.startswith("  mobilenetv3_small_050: about ")][0] < first_task
    assert lines.index("No GPU: measuring a training step of each backbone on this CPU (at most 60 s):") < first_task


def test_an_output_holding_other_files_is_refused_unless_forced_then_run_local_owns_it(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "report.md").write_text("my report")
    refused = subprocess.run(_run_local(tiny, out, "--backbones", "resnet18"), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.startswith(f"pneumonia-kfp run-local: error: --output {out} holds files run-local did not "
                                     "write (notes.txt, report.md); choose an empty or new directory, or pass "
                                     "--force")
    assert sorted(os.listdir(out)) == ["notes.txt", "report.md"]  # nothing written, not even a lock
    assert (out / "report.md").read_text() == "my report"

    forced = subprocess.run(_run_local(tiny, out, "--backbones", "resnet18", "--force"), capture_output=True,
                            text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr
    assert (out / "notes.txt").read_text() == "my notes"  # left alone
    assert (out / "report.md").read_text().startswith("#") and (out / ".pneumonia-kfp-run-local").is_file()
    assert [p.name for p in (out / "models").iterdir()] == ["resnet18"]

    # now run-local's: a later run replaces its outputs, models/ included (no stale backbone stays)
    again = subprocess.run(_run_local(tiny, out, "--backbones", "mobilenetv3_small_050"), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (out / "models").iterdir()] == ["mobilenetv3_small_050"]
    results = json.loads((out / "results.json").read_text())
    assert [m["model_uri"] for m in results["models"] if m["backbone"] != "ensemble"] == [
        str(out / "models" / "mobilenetv3_small_050")]
    assert sorted(p for p in os.listdir(out) if p.startswith(".")) == [".lock", ".pneumonia-kfp-run-local"]


def test_more_than_32_backbones_need_force(tmp_path, capsys):
    import timm

    from pneumonia_kfp.backbones import BackboneError, check_image_size

    def takes_224(name):
        try:
            return check_image_size(name, 224) is None
        except BackboneError:
            return False

    names = ",".join([n for n in timm.list_models("resnet*") if takes_224(n)][:33])
    out = tmp_path / "o"
    assert main(["run-local", "--output", str(out), "--backbones", names]) == 2
    err = capsys.readouterr().err
    assert err == ("pneumonia-kfp run-local: error: --backbones names 33 models: run-local trains at most 32 "
                   "(one task each); pass --force to train them all\n")
    assert not out.exists()  # refused before anything
    (tmp_path / "a-file").write_text("")
    assert main(["run-local", "--output", str(tmp_path / "a-file"), "--backbones", names, "--force"]) == 2
    assert "cannot write there" in capsys.readouterr().err  # past the count: the next check speaks
    assert main(["run-local", "--output", str(tmp_path / "a-file"),
                 "--backbones", ",".join(names.split(",")[:32])]) == 2
    assert "cannot write there" in capsys.readouterr().err  # 32 is allowed


def test_the_cpu_estimate_stops_measuring_after_its_budget_and_says_so(monkeypatch):
    from pneumonia_kfp.pipelines import cpu_estimate

    per_image = {"a": 1.0, "b": 3.0, "c": 5.0, "d": 100.0, "e": 100.0}
    measured = []

    def step_seconds(name, params):
        assert params["image_size"] == 32 and params["batch_size"] == 8
        measured.append(name)
        return per_image[name]

    monkeypatch.setattr(cpu_estimate, "step_seconds", step_seconds)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ticks = iter([1000, 1040, 1060, 1100])  # the start, then after each measurement
    said = []
    params = {"backbones": list(per_image), "epochs": 2, "batch_size": 8, "image_size": 32}
    total = cpu_estimate.cpu_estimate(params, 10, say=said.append, budget_s=60, clock=lambda: next(ticks))
    assert measured == ["a", "b", "c"]  # 60 s used after b: c still measured; 100 s after c: d and e are not built
    assert total == (1 + 3 + 5 + 2 * 3) * 10 * 2  # the rest at the average of the measured
    assert said == ["No GPU: measuring a training step of each backbone on this CPU (at most 60 s):\n",
                    "  a: about 20 s  (1/5)\n", "  b: about 1 min  (2/5)\n", "  c: about 2 min  (3/5)\n",
                    "  the other 2 backbone(s): about 1 min each, not measured (the 60 s for measuring ran out; the "
                    "average of the 3 measured)\n"]
    ticks = iter([1000, 1010, 1020, 1030, 1040, 1050])
    measured.clear()
    assert cpu_estimate.cpu_estimate({**params, "epochs": 1}, 3, say=said.append, budget_s=60,
                              clock=lambda: next(ticks)) == (1 + 3 + 5 + 100 + 100) * 3
    assert measured == ["a", "b", "c", "d", "e"]  # within the budget: every one measured


def test_a_stop_during_the_cpu_estimate_ends_run_local_at_once(tiny, tmp_path):
    out = tmp_path / "out"
    cli = subprocess.Popen(_run_local(tiny, out, "--backbones", "resnet50,resnet101,resnet152", "--image-size", "224"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while not line.startswith("  resnet50: about"):
        line = cli.stdout.readline()
        assert line or cli.poll() is None, cli.stderr.read()
    stopped_at = time.monotonic()
    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=60)
    assert time.monotonic() - stopped_at < 20  # not after measuring the others (or training)
    assert cli.returncode == 128 + signal.SIGTERM
    assert err == "pneumonia-kfp run-local: stopped by SIGTERM; its temporary files were removed\n"
    assert not (out / ".run-local").exists() and not (out / "kfp-root").exists()
    import fcntl

    with open(out / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
