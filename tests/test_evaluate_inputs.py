"""What evaluate reads and writes, against hostile input.

- Every folder ingest refuses, evaluate refuses: the same cases run against both commands.
- A folder of one class: the figures that need both classes are null (valid JSON), with a warning.
- Every model file error is one line naming the file; an unexpected error is one line and a log.
- Outputs on a full disk (a real small filesystem): the previous files or none, never a cut one.
- External data is scored at the model's own threshold (a youden-trained model, not 0.5).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pneumonia_kfp.backbones import create_backbone, load_checkpoint
from pneumonia_kfp.data import DataError
from pneumonia_kfp.evaluation import evaluate
from pneumonia_kfp.export import CHECKPOINT
from pneumonia_kfp.inference import predict
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.pipelines import evaluate_folder as evaluate_folder_module
from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.pipelines.evaluate_folder import evaluate_folder
from pneumonia_kfp.training import train
from pneumonia_kfp.validation import load_image
from tests.hostile import special_files

CLASSES = ["NORMAL", "PNEUMONIA"]
COMMANDS = ["ingest", "evaluate"]
# and the pipeline's evaluate step on its external_data (evaluation.evaluate, what the component calls)
READERS = [*COMMANDS, "external"]


@pytest.fixture(scope="module")
def model(dataset, tmp_path_factory):
    """A model trained under the youden rule, so its threshold is not 0.5: (directory, metadata)."""
    out = tmp_path_factory.mktemp("model")
    meta = train(dataset["uri"], "resnet18", str(out / CHECKPOINT), epochs=2, batch_size=16, seed=0,
                 threshold_rule="youden")
    return out, meta


def run(command: str, data, tmp_path, model_dir, dataset_uri: str = "") -> None:
    """ingest (the default policy, fail), evaluate, or the evaluate step with ``data`` as external data."""
    if command == "ingest":
        ingest(str(data), (tmp_path / "store").as_uri(), image_size=32)
    elif command == "external":
        evaluate(dataset_uri, str(model_dir), external_data=str(data))
    else:
        evaluate_folder(str(model_dir), str(data), tmp_path / "out")


@pytest.fixture
def hostile(data, tmp_path):
    """One of each hostile file in test/NORMAL (the split both commands read); {relpath: reason}."""
    n = data / "test" / "NORMAL"
    some = sorted(n.glob("*.jpeg"))[0]
    os.symlink("/etc/hostname", n / "hostname.jpeg")  # readable, outside the data root: never opened
    outside = tmp_path / "outside.jpeg"
    shutil.copy(some, outside)
    os.symlink(outside, n / "escape.jpeg")
    (n / "empty.jpeg").write_bytes(b"")
    (n / "truncated.jpeg").write_bytes(some.read_bytes()[:300])
    (n / "notes.txt").write_text("clinician notes")
    Image.new("L", (12, 12), 100).save(n / "tiny.png")
    with special_files(n) as expected:
        expected.update({
            "hostname.jpeg": "symlink pointing outside the data root",
            "escape.jpeg": "symlink pointing outside the data root",
            "empty.jpeg": "zero-byte file",
            "truncated.jpeg": "truncated",  # the decoder's words; checked as a part
            "notes.txt": "not an image (no decoder recognises its content)",
            "tiny.png": "too small: 12x12 px (minimum 32 px a side)",
        })
        yield {f"test/NORMAL/{name}": why for name, why in expected.items()}


NEVER_OPENED = ("fifo.jpeg", "socket.jpeg", "loop-a.jpeg", "loop-b.jpeg", "dangling.jpeg", "hostname.jpeg",
                "escape.jpeg", "device.jpeg")


@pytest.mark.parametrize("command", READERS)
def test_hostile_files_are_refused_by_both_commands(command, hostile, data, tmp_path, model, reads, dataset):
    with pytest.raises(DataError) as e:
        run(command, data, tmp_path, model[0], dataset["uri"])
    got = {r["path"]: r["reason"] for r in e.value.rejected}
    assert set(got) == set(hostile)
    assert "truncated" in got.pop("test/NORMAL/truncated.jpeg").lower()
    assert got == {k: v for k, v in hostile.items() if not k.endswith("truncated.jpeg")}
    assert not [p for p in reads if p.endswith(NEVER_OPENED)]  # refused by their stat, never opened
    message = str(e.value)
    assert message.startswith(f"{len(hostile)} of ") and "test/NORMAL/" in message
    # only the flags the command has: evaluate has no --on-invalid
    assert ("--on-invalid skip" in message) == (command == "ingest")
    assert not (tmp_path / "out").exists()  # evaluate wrote nothing


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_files_are_one_line_from_the_cli(command, hostile, data, tmp_path, model):
    args = (["--storage", (tmp_path / "store").as_uri(), "--image-size", "32"] if command == "ingest"
            else ["--model", str(model[0]), "--output", str(tmp_path / "out")])
    out = subprocess.run([sys.executable, "-m", "pneumonia_kfp.pipelines.cli", command, "--data", str(data), *args],
                         capture_output=True, text=True, timeout=180)  # a hang (a FIFO opened) fails the test
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and errors[0].startswith(f"pneumonia-kfp {command}: error: {len(hostile)} of ")
    assert ("--on-invalid" in out.stderr) == (command == "ingest")


def _move_out(path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(path, elsewhere)
    os.symlink(elsewhere, path)


def _loop(path):
    shutil.rmtree(path)
    os.symlink(path, path)  # a symlink to itself


def _dangling(path):
    shutil.rmtree(path)
    os.symlink(path.parent / "nowhere", path)


FOLDER_CASES = {  # case: (make it, {command: what the error says})
    "class folder outside the root": (
        lambda d, t: _move_out(d / "test" / "NORMAL", t),
        {c: r"test/NORMAL resolves to .*elsewhere, outside the data root" for c in READERS}),
    "test folder outside the root": (
        lambda d, t: _move_out(d / "test", t),
        {c: r"data/test resolves to .*elsewhere, outside the data root" for c in READERS}),
    "class folder a symlink loop": (  # ingest's scan raised OSError on it; evaluate left the class out
        lambda d, t: _loop(d / "test" / "PNEUMONIA"),
        {c: r"test/PNEUMONIA is a symlink loop, where a class folder was expected" for c in READERS}),
    "class folder a dangling symlink": (
        lambda d, t: _dangling(d / "test" / "PNEUMONIA"),
        {c: r"test/PNEUMONIA is a broken symlink .*, where a class folder was expected" for c in READERS}),
    "empty class folder": (
        lambda d, t: [p.unlink() for p in (d / "test" / "NORMAL").iterdir()],
        {c: r"test/NORMAL holds no images" for c in READERS}),
}


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("case", FOLDER_CASES)
def test_folders_ingest_refuses_evaluate_refuses(case, command, data, tmp_path, model, dataset):
    make, messages = FOLDER_CASES[case]
    make(data, tmp_path)
    with pytest.raises(DataError, match=messages[command]):
        run(command, data, tmp_path, model[0], dataset["uri"])


def _strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}: not JSON"))


@pytest.mark.parametrize("keep, undefined, shown", [
    ("PNEUMONIA", ["auc", "specificity"], ["accuracy", "F1", "sensitivity"]),
    ("NORMAL", ["auc", "f1", "sensitivity"], ["accuracy", "specificity"]),
])
def test_a_folder_of_one_class_gets_null_for_what_needs_both(keep, undefined, shown, data, tmp_path, model, capsys,
                                                              caplog):
    ext = tmp_path / "ext"
    shutil.copytree(data / "test" / keep, ext / keep)  # bare class folders, one class
    assert main(["evaluate", "--model", str(model[0]), "--data", str(ext), "--output", str(tmp_path / "out")]) == 0
    doc = _strict_json(tmp_path / "out" / "results.json")
    m = doc["models"][0]
    t = m["test"]
    assert t["undefined"] == undefined and all(t[k] is None for k in undefined)
    defined = {"accuracy", "precision", "sensitivity", "specificity", "f1"} - set(undefined)
    assert all(isinstance(t[k], float) for k in defined)
    assert t["n"] == 12 and sum(map(sum, t["confusion_matrix"])) == 12 and t["ci95"] == {}
    assert m["roc"] == {"fpr": [], "tpr": [], "thresholds": []}
    rate = {"sensitivity": "sensitivity", "specificity": "specificity", "f1": "f1"}
    for op in m["operating_points"]:
        assert [k for k in rate if op["test"][rate[k]] is None] == [k for k in rate if k in undefined]
    figures = capsys.readouterr().out.splitlines()[0]
    assert re.findall(r"(\w+) \d\.\d{4}", figures) == shown  # only the defined figures
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "holds no" in r.getMessage()]
    assert len(warnings) == 1 and "undefined (null in results.json)" in warnings[0] and "\n" not in warnings[0]
    assert "AUC" in warnings[0] and ("NORMAL" if keep == "PNEUMONIA" else "PNEUMONIA") in warnings[0]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "undefined" in md and "nan" not in md.lower()


# --- model files ----------------------------------------------------------------------------------------

def _bad_model(kind: str, model_dir, tmp_path):
    """A model path of the given kind; the part of the one-line answer that says what is wrong."""
    good = (model_dir / CHECKPOINT).read_bytes()
    folder = tmp_path / kind
    folder.mkdir()
    ckpt = folder / CHECKPOINT
    meta = {k: v for k, v in torch.load(model_dir / CHECKPOINT, weights_only=True).items() if k != "state_dict"}
    if kind == "missing":
        return tmp_path / "no-such-model", "does not exist"
    if kind == "folder without a checkpoint":
        (folder / "model.onnx").write_bytes(b"onnx")
        return folder, "no checkpoint there (checkpoint.pt is missing)"
    if kind == "truncated":
        ckpt.write_bytes(good[:len(good) // 3])
    elif kind == "not a checkpoint":
        ckpt.write_bytes(b"just some bytes, not a torch file at all")
    elif kind == "checkpoint without keys":
        torch.save({"epoch": 3}, ckpt)
    elif kind == "head that does not match":
        torch.save({**meta, "state_dict": create_backbone("resnet18", num_classes=3).state_dict()}, ckpt)
    elif kind == "pickled code":
        torch.save({**meta, "state_dict": {}, "hook": print}, ckpt)
    elif kind in ("model.onnx", "model.pt2"):
        (folder / kind).write_bytes(b"a serving form")
        return folder / kind, {"model.onnx": "is an ONNX model, a serving form", "model.pt2": "is a torch.export "
                               "program, a serving form"}[kind]
    return folder, {
        "truncated": "is a damaged torch checkpoint, truncated perhaps",
        "not a checkpoint": "is not a torch checkpoint",
        "checkpoint without keys": "is a torch file but not a pneumonia-kfp checkpoint: it lacks state_dict, backbone",
        "head that does not match": "weights do not fit a resnet18 with 2 classes (size mismatch for fc.weight",
        "pickled code": "holds pickled code (GLOBAL print), which is never loaded",
    }[kind]


@pytest.mark.parametrize("kind", ["missing", "folder without a checkpoint", "truncated", "not a checkpoint",
                                  "checkpoint without keys", "head that does not match", "pickled code",
                                  "model.onnx", "model.pt2"])
def test_every_model_file_error_is_one_line_naming_the_file(kind, data, tmp_path, model, capsys):
    path, says = _bad_model(kind, model[0], tmp_path)
    rc = main(["evaluate", "--model", str(path), "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("pneumonia-kfp evaluate: error: ") and str(path) in err and says in err, err
    assert "weights_only" not in err  # never the advice to unpickle code
    assert not (tmp_path / "out").exists()


def test_an_unexpected_error_is_one_line_and_a_log_with_the_traceback(tmp_path, capsys, monkeypatch):
    import tempfile

    def broken(*args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(evaluate_folder_module, "evaluate_folder", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["evaluate", "--model", "m", "--data", "d", "--output", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    [log] = tmp_path.glob("pneumonia-kfp-evaluate-*.log")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err == f"pneumonia-kfp evaluate: error: unexpected ZeroDivisionError: division by zero (traceback in {log})"
    assert "Traceback (most recent call last)" in log.read_text() and "in broken" in log.read_text()
    # where the log cannot be written (a full or missing $TMPDIR), the line says so
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the traceback could not be written to " + str(tmp_path / "missing") in err


def test_a_full_disk_nobody_named_is_one_line_at_the_boundary(tmp_path, capsys, monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "/scratch/rows.u8")

    monkeypatch.setattr(evaluate_folder_module, "evaluate_folder", full)
    assert main(["evaluate", "--model", "m", "--data", "d", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unexpected" not in err
    assert err.startswith("pneumonia-kfp evaluate: error: no space left on the device writing /scratch/rows.u8: ")


# --- a full disk --------------------------------------------------------------------------------------------

def _on_a_small_filesystem(tmp_path, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run the bash ``script`` with a tmpfs of ``size_kb`` KiB mounted at $SMALL, in a user and mount
    namespace of its own (no root needed; the mount ends with the script). $SMALL's content is copied
    to tmp_path/after at the end, for the test to look at."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    assert probe.returncode == 0, f"these tests need user namespaces (unshare -rm: {probe.stderr.decode().strip()})"
    small, after = tmp_path / "small", tmp_path / "after"
    small.mkdir()
    after.mkdir()
    wrapped = (f"set -u; mount -t tmpfs -o size={size_kb}k pneumonia-kfp-test {small} || exit 99; SMALL={small}; "
               f"{script}; rc=$?; cp -a {small}/. {after}/; exit $rc")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", wrapped],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 99, out.stderr
    return out


def _evaluate_cli(model_dir, data) -> str:
    return (f"{sys.executable} -m pneumonia_kfp.pipelines.cli evaluate --model {model_dir} --data {data} "
            "--output $SMALL")


@pytest.mark.parametrize("previous", [True, False])
def test_a_full_disk_leaves_the_previous_outputs_or_none(previous, data, tmp_path, model):
    before = {"results.json": '{"previous": 1}', "report.html": "<p>previous</p>"} if previous else {}
    (tmp_path / "previous").mkdir()
    for name, text in before.items():
        (tmp_path / "previous" / name).write_text(text)
    out = _on_a_small_filesystem(tmp_path, 48, f"cp -a {tmp_path}/previous/. $SMALL/; {_evaluate_cli(model[0], data)}")
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and "no space left on the device" in errors[0], out.stderr
    assert str(tmp_path / "small") in errors[0] and " bytes needed, " in errors[0] and " free)" in errors[0]
    # all four outputs or none: the previous ones stay as they were, nothing cut, no temporary file left
    assert {p.name: p.read_text() for p in (tmp_path / "after").iterdir()} == before


def test_a_full_scratch_disk_is_one_line_and_leaves_no_scratch(data, tmp_path, model):
    """The scratch folder ($TMPDIR) fills, not OUT: one line naming a scratch path, and nothing left there."""
    out = _on_a_small_filesystem(tmp_path, 48, "TMPDIR=$SMALL " + _evaluate_cli(model[0], data).replace(
        "$SMALL", str(tmp_path / "out")))
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and "no space left on the device" in errors[0], out.stderr
    assert str(tmp_path / "small") in errors[0]
    assert [p for p in (tmp_path / "after").rglob("*") if p.is_file()] == []


def test_a_checkpoint_on_a_full_disk_is_one_line_and_no_file(tmp_path):
    code = ("from pneumonia_kfp.backbones import create_backbone, save_checkpoint; "
            "from pneumonia_kfp.outputs import OutputError\n"
            "try:\n    save_checkpoint('$SMALL/checkpoint.pt', create_backbone('resnet18'), backbone='resnet18')\n"
            "except OutputError as e:\n    print(e)")
    out = _on_a_small_filesystem(tmp_path, 256, f'{sys.executable} -c "{code}"')
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"cannot write {tmp_path / 'small' / 'checkpoint.pt'}: no space left on the device")
    assert list((tmp_path / "after").iterdir()) == []  # no cut checkpoint, no temporary file


# --- external data at the model's threshold -------------------------------------------------------------------

def test_external_data_is_scored_at_the_models_own_threshold(dataset, model, data, tmp_path):
    """Trained under youden (its threshold is not 0.5): the external block and evaluate's test block take the
    threshold and confusion matrix from the model, counted here from probabilities computed independently."""
    path, meta = model
    t = meta["thresholds"]["youden"]
    assert meta["threshold_rule"] == "youden" and meta["threshold"] == t and t != 0.5
    ext = tmp_path / "ext"
    shutil.copytree(data / "test", ext / "test")
    files = sorted((ext / "test").glob("*/*.jpeg"))
    x = np.stack([load_image(f, 32) for f in files])[:, None]  # decoded here, as ingest decodes
    y = np.array([CLASSES.index(f.parent.name) for f in files])
    net, ckpt = load_checkpoint(path / CHECKPOINT)
    prob = predict(net, x, ckpt["mean"], ckpt["std"])

    def confusion(threshold):
        called = prob >= threshold
        return [[int((~called & (y == 0)).sum()), int((called & (y == 0)).sum())],
                [int((~called & (y == 1)).sum()), int((called & (y == 1)).sum())]]

    assert confusion(t) != confusion(0.5)  # so scoring at 0.5 would be caught
    in_run = evaluate(dataset["uri"], str(path), external_data=str(ext))  # the pipeline's external_data
    alone = evaluate_folder(str(path), str(ext), tmp_path / "out")["models"][0]  # pneumonia-kfp evaluate --data
    for doc, block, split in ((in_run, in_run["external"], "external"), (alone, alone["test"], "test")):
        assert doc["threshold"] == t and doc["threshold_rule"] == "youden"
        assert block["confusion_matrix"] == confusion(t), split
        assert block["n"] == len(files)
        by_file = dict(zip(in_run["predictions"]["external"]["file"], in_run["predictions"]["external"]["prob"],
                           strict=True))
        assert [by_file[str(f.relative_to(ext))] for f in files] == pytest.approx(prob.tolist(), abs=1e-5)
        default = [op for op in doc["operating_points"] if op["default"]]
        assert [op["rule"] for op in default] == ["youden"] and default[0]["threshold"] == t
        assert default[0][split]["sensitivity"] == pytest.approx((prob[y == 1] >= t).mean())
        assert default[0][split]["specificity"] == pytest.approx((prob[y == 0] < t).mean())
    saved = _strict_json(tmp_path / "out" / "results.json")["models"][0]
    assert saved["threshold"] == t and saved["test"]["confusion_matrix"] == confusion(t)


@pytest.mark.parametrize("with_test_dir", [True, False])
def test_an_s3_folder_is_scored_like_the_same_local_one(with_test_dir, model, data, tmp_path, s3_env):
    """An s3:// prefix is downloaded (only its test/ part when it has one) and read by the same scan and reader."""
    import uuid

    from pneumonia_kfp.storage import open_store

    uri = f"s3://ext-{uuid.uuid4().hex[:8]}/hospital"
    store = open_store(uri)
    local = tmp_path / "local"
    shutil.copytree(data / "test", local / "test" if with_test_dir else local)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        store.put_bytes(f.relative_to(local).as_posix(), f.read_bytes())
    if with_test_dir:
        store.put_bytes("train/NORMAL/not-scored.jpeg", b"not even an image")  # beside test/: not scored
    remote = evaluate_folder(str(model[0]), uri, tmp_path / "out-s3")["models"][0]
    here = evaluate_folder(str(model[0]), str(local), tmp_path / "out-local")["models"][0]
    csv = (tmp_path / "out-s3" / "predictions.csv").read_text()
    assert csv == (tmp_path / "out-local" / "predictions.csv").read_text()  # the same files, probabilities
    rows = [r.split(",") for r in csv.splitlines()[1:] if r.startswith("test,")]
    assert len(rows) == 24 and rows[0][1].startswith("test/NORMAL/" if with_test_dir else "NORMAL/")
    assert remote["test"]["confusion_matrix"] == here["test"]["confusion_matrix"] and remote["test"]["n"] == 24
    store.put_bytes("test/NORMAL/bad.jpeg" if with_test_dir else "NORMAL/bad.jpeg", b"")
    with pytest.raises(DataError, match=r"1 of 25 files rejected: (test/)?NORMAL/bad.jpeg: zero-byte file"):
        evaluate_folder(str(model[0]), uri, tmp_path / "out-s3-bad")
