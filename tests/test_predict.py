"""pneumonia-kfp predict: files, folders and s3:// URIs through ingest's reader, three engines that agree,
the model's own threshold (or another rule's), bad files named one line each, CSV and JSON outputs."""
import csv
import json
import logging
import os
import shutil
import uuid

import numpy as np
import pytest

from pneumonia_kfp.backbones import load_checkpoint
from pneumonia_kfp.export import CHECKPOINT, ONNX, export_model
from pneumonia_kfp.inference import predict
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.params import MAX_PIXELS_ENV
from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.training import train
from pneumonia_kfp.validation import load_image
from tests.hostile import special_files

CLASSES = ["NORMAL", "PNEUMONIA"]


@pytest.fixture(scope="module")
def model(image_folder, tmp_path_factory):
    """A 32 px resnet18 trained under the youden rule (its threshold is not 0.5), exported: (directory, metadata)."""
    dataset = ingest(str(image_folder), tmp_path_factory.mktemp("store").as_uri(), image_size=32)
    out = tmp_path_factory.mktemp("model")
    meta = train(dataset["uri"], "resnet18", str(out / CHECKPOINT), epochs=2, batch_size=16, seed=0,
                 threshold_rule="youden")
    export_model(out)
    return out, meta


def _independent(model_dir, files) -> np.ndarray:
    """P(PNEUMONIA) of ``files``, decoded here with ingest's decoder and run through the checkpoint."""
    x = np.stack([load_image(f, 32) for f in files])[:, None]
    net, ckpt = load_checkpoint(model_dir / CHECKPOINT)
    return predict(net, x, ckpt["mean"], ckpt["std"])


def _json(path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_engine_gives_the_checkpoints_probabilities_and_the_models_threshold(model, data, tmp_path, capsys):
    """onnx, pt2 and checkpoint agree within 1e-4 with probabilities computed here; labels are those of the model's
    youden threshold (not 0.5's), counted here from the probabilities."""
    path, meta = model
    t = meta["thresholds"]["youden"]
    assert meta["threshold_rule"] == "youden" and t != 0.5
    files = sorted((data / "test").glob("*/*.jpeg"))
    expected = dict(zip((str(f) for f in files), _independent(path, files).tolist(), strict=True))
    assert ((np.array(list(expected.values())) >= t) != (np.array(list(expected.values())) >= 0.5)).any()
    for engine in ("onnx", "pt2", "checkpoint"):
        code, out, err = _run(capsys, "--model", path, "--engine", engine, data / "test",
                              "--output", tmp_path / f"{engine}.json")
        assert code == 0, err
        doc = _json(tmp_path / f"{engine}.json")
        got = {r["file"]: r["probability"] for r in doc["predictions"]}
        assert sorted(got) == sorted(expected) and doc["failed"] == []
        assert [got[f] for f in expected] == pytest.approx(list(expected.values()), abs=1e-4), engine
        for r in doc["predictions"]:
            assert r["label"] == CLASSES[int(expected[r["file"]] >= t)], r
            assert r["threshold"] == t and r["threshold_rule"] == "youden" and r["engine"] == engine
        assert doc["model"]["threshold"] == t and doc["model"]["engine"] == engine
        table = out.splitlines()
        assert table[0].split() == ["file", "P(PNEUMONIA)", "label"] and len(table) == 1 + len(files)
        shown = {line.split()[0]: line.split()[1:] for line in table[1:]}
        assert all(shown[f] == [f"{p:.4f}", CLASSES[int(p >= t)]] for f, p in got.items())


@pytest.mark.parametrize("rule", ["balanced", "sensitivity95"])
def test_threshold_rule_selects_another_validation_threshold(rule, model, data, tmp_path, capsys):
    path, meta = model
    t = meta["thresholds"][rule]
    assert t != meta["threshold"]
    code, _, err = _run(capsys, "--model", path, "--threshold-rule", rule, data / "test",
                        "--output", tmp_path / "p.csv")
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 24 and {r["threshold_rule"] for r in rows} == {rule}
    assert {float(r["threshold"]) for r in rows} == {t}
    assert all(r["label"] == CLASSES[int(float(r["probability"]) >= t)] for r in rows)
    assert f"({rule})" in err.splitlines()[-1]


def test_files_folders_and_s3_uris_together(model, data, tmp_path, capsys, s3_env, monkeypatch):
    """A folder, two files, an s3:// prefix and one s3:// object: each image once, named as given, and an
    object predicted like the same bytes on disk; the downloads went into a scratch folder, gone afterwards."""
    from pneumonia_kfp.scratch import scratch_dir
    from pneumonia_kfp.storage import open_store

    path, _ = model
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    (tmp_path / "tmp").mkdir()
    scratches = []

    def watched(prefix=""):
        scratches.append(prefix)
        return scratch_dir(prefix)

    monkeypatch.setattr("pneumonia_kfp.image_reader.scratch_dir", watched)  # where predict's files are read
    normal = sorted((data / "test" / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((data / "test" / "PNEUMONIA").glob("*.jpeg"))
    bucket = f"s3://predict-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{bucket}/xrays")
    for f in pneumonia[:3]:
        store.put_bytes(f"ward/{f.name}", f.read_bytes())
    store.put_bytes(".hidden/skip.jpeg", b"not read")
    store.put_bytes("single.jpeg", normal[0].read_bytes())
    argv = [data / "test" / "NORMAL", pneumonia[0], pneumonia[1], f"{bucket}/xrays/ward", f"{bucket}/xrays/single.jpeg"]
    code, _, err = _run(capsys, "--model", path, *argv, "--output", tmp_path / "p.json")
    assert code == 0, err
    got = {r["file"]: r["probability"] for r in _json(tmp_path / "p.json")["predictions"]}
    wanted = ([f"{data / 'test' / 'NORMAL'}/{f.name}" for f in normal] + [str(pneumonia[0]), str(pneumonia[1])]
              + [f"{bucket}/xrays/ward/{f.name}" for f in pneumonia[:3]] + [f"{bucket}/xrays/single.jpeg"])
    assert sorted(got) == sorted(wanted)
    local = dict(zip(normal + pneumonia[:3], _independent(path, normal + pneumonia[:3]), strict=True))
    assert got[f"{bucket}/xrays/single.jpeg"] == pytest.approx(local[normal[0]], abs=1e-4)
    for f in pneumonia[:3]:
        assert got[f"{bucket}/xrays/ward/{f.name}"] == pytest.approx(local[f], abs=1e-4)
    assert scratches == ["predict-"]
    root = tmp_path / "tmp" / f"pneumonia-kfp-{os.geteuid()}"
    assert root.is_dir() and list(root.iterdir()) == []  # the downloads went there and are gone
    code, _, err = _run(capsys, "--model", path, f"{bucket}/nothing-here", pneumonia[0])
    assert code == 1 and f"{bucket}/nothing-here: no such object" in err


def test_bad_files_are_one_line_each_and_the_rest_are_predicted(model, data, tmp_path, capsys, monkeypatch):
    """Not an image, cut short, too many pixels, a symlink out of the folder, a FIFO, a missing file: one line
    each naming it and ingest's reason; the other images are predicted and the exit code is 1."""
    from PIL import Image

    path, _ = model
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")  # the 48 px test images pass, a 200 px one does not
    folder = tmp_path / "mixed"
    shutil.copytree(data / "test" / "PNEUMONIA", folder)
    good = sorted(f.name for f in folder.iterdir())
    (folder / "notes.txt").write_text("not an image")
    whole = (folder / good[0]).read_bytes()
    (folder / "cut.jpeg").write_bytes(whole[: len(whole) // 3])
    outside = tmp_path / "outside.jpeg"
    shutil.copy(folder / good[1], outside)
    os.symlink(outside, folder / "link.jpeg")
    os.mkfifo(folder / "pipe.jpeg")
    Image.new("L", (200, 200)).save(folder / "big.png")
    missing = tmp_path / "gone.jpeg"
    code, out, err = _run(capsys, "--model", path, folder, missing, "--output", tmp_path / "p.json")
    assert code == 1
    lines = err.splitlines()
    reasons = {"notes.txt": "not an image", "cut.jpeg": "cannot be decoded", "link.jpeg": "symlink pointing outside",
               "pipe.jpeg": "not a regular file", "big.png": "too large: 200x200 px"}
    for name, reason in reasons.items():
        named = [line for line in lines if f"{folder}/{name}:" in line]
        assert len(named) == 1 and reason in named[0], (name, lines)
    assert [line for line in lines if str(missing) in line] == [f"pneumonia-kfp predict: {missing}: does not exist"]
    doc = _json(tmp_path / "p.json")
    assert sorted(r["file"] for r in doc["predictions"]) == [f"{folder}/{n}" for n in good]
    assert sorted(f["file"] for f in doc["failed"]) == sorted([f"{folder}/{n}" for n in reasons] + [str(missing)])
    assert len(out.splitlines()) == 1 + len(good)
    assert lines[-1].startswith(f"pneumonia-kfp predict: {len(good)} predicted, 6 failed")


def test_what_ingest_refuses_predict_refuses_without_opening_it(model, data, tmp_path, capsys, reads):
    """The hostile files ingest and evaluate are tested with (tests/hostile.py: a FIFO, a socket, a symlink
    loop, a dangling link, a decompression-bomb header, a device), a sub-folder leading out of the folder
    given and a sub-folder that is a symlink loop: each refused with ingest's reason, the special ones
    never opened; the good images are predicted and the exit code is 1."""
    folder = tmp_path / "mixed"
    shutil.copytree(data / "test" / "NORMAL", folder)
    good = sorted(f.name for f in folder.iterdir())
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / good[0], tmp_path / "outside" / "x.jpeg")
    os.symlink(tmp_path / "outside", folder / "elsewhere")  # a folder outside the one given: not walked
    os.symlink(folder / "loop-dir", folder / "loop-dir")
    with special_files(folder) as expected:
        code, _, err = _run(capsys, "--model", model[0], folder, "--output", tmp_path / "p.json")
    expected.update({"elsewhere": "symlink pointing outside the data root", "loop-dir": "symlink loop"})
    assert code == 1, err
    doc = _json(tmp_path / "p.json")
    assert {f["file"].removeprefix(f"{folder}/"): f["reason"] for f in doc["failed"]} == expected
    assert sorted(r["file"] for r in doc["predictions"]) == [f"{folder}/{n}" for n in good]
    opened = {os.path.basename(p) for p in reads}
    assert opened == set(good) | {"bomb.png"}  # the bomb's header is read and refused before decoding
    assert f"{folder}/fifo.jpeg: not a regular file (a FIFO)" in err


def test_csv_and_json_hold_every_field(model, data, tmp_path, capsys):
    path, meta = model
    f = sorted((data / "test" / "NORMAL").glob("*.jpeg"))[0]
    assert _run(capsys, "--model", path, f, "--output", tmp_path / "p.csv")[0] == 0
    assert _run(capsys, "--model", path, f, "--output", tmp_path / "p.json")[0] == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    records = _json(tmp_path / "p.json")["predictions"]
    assert len(rows) == len(records) == 1
    fields = ["file", "probability", "label", "threshold", "threshold_rule", "model_id", "engine"]
    assert list(rows[0]) == fields and sorted(records[0]) == sorted(fields)
    model_id = records[0]["model_id"]
    assert model_id.startswith("resnet18@sha256:") and len(model_id) == len("resnet18@sha256:") + 16
    import hashlib
    assert model_id.endswith(hashlib.sha256((path / CHECKPOINT).read_bytes()).hexdigest()[:16])
    assert rows[0]["model_id"] == model_id and rows[0]["file"] == records[0]["file"] == str(f)
    assert float(rows[0]["probability"]) == records[0]["probability"]
    assert float(rows[0]["threshold"]) == records[0]["threshold"] == meta["threshold"]
    assert rows[0]["label"] == records[0]["label"] in CLASSES and rows[0]["threshold_rule"] == "youden"
    code, _, err = _run(capsys, "--model", path, f, "--output", tmp_path / "p.txt")
    assert code == 2 and err.count("\n") == 1 and "name a .csv or .json file" in err
    assert not (tmp_path / "p.txt").exists()


def test_without_model_onnx_it_falls_back_to_pt2_and_says_so(model, data, tmp_path, capsys, caplog):
    path, _ = model
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    (copy / ONNX).unlink()
    files = sorted((data / "test" / "NORMAL").glob("*.jpeg"))[:4]
    with caplog.at_level(logging.WARNING):
        code, _, err = _run(capsys, "--model", copy, *files, "--output", tmp_path / "p.json")
    assert code == 0, err
    fallback = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallback) == 1 and "model.onnx does not exist" in fallback[0] and "pt2" in fallback[0]
    doc = _json(tmp_path / "p.json")
    assert doc["model"]["engine"] == "pt2" and {r["engine"] for r in doc["predictions"]} == {"pt2"}
    assert [r["probability"] for r in doc["predictions"]] == pytest.approx(_independent(path, files).tolist(), abs=1e-4)
    code, _, err = _run(capsys, "--model", copy, "--engine", "onnx", *files)  # the default, asked for: still falls back
    assert code == 0
    (copy / "model.pt2").unlink()
    code, _, err = _run(capsys, "--model", copy, "--engine", "pt2", *files)
    assert code == 2 and err.count("\n") == 1 and "model.pt2 does not exist" in err


def test_a_bad_model_dir_is_a_usage_error(tmp_path, data, capsys):
    f = sorted((data / "test" / "NORMAL").glob("*.jpeg"))[0]
    code, out, err = _run(capsys, "--model", tmp_path / "nowhere", f)
    assert code == 2 and out == "" and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "--model", tmp_path / "empty", f)
    assert code == 2 and err.count("\n") == 1 and f"model {tmp_path / 'empty'}: model.onnx does not exist" in err


def test_a_stop_signal_ends_it_cleanly_and_removes_the_scratch(model, data, tmp_path, capsys, monkeypatch):
    """A SIGTERM while images are read: exit 128 + 15, one line, and the scratch folder is gone."""
    import signal

    from pneumonia_kfp import image_reader
    from pneumonia_kfp.procs import Stopped

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)
    (tmp_path / "tmp").mkdir()
    seen = []

    def stopped(files, tmp, *args, **kwargs):
        seen.append(tmp)
        raise Stopped(signal.SIGTERM)

    monkeypatch.setattr(image_reader, "read_files", stopped)
    code, out, err = _run(capsys, "--model", model[0], data / "test")
    assert code == 128 + signal.SIGTERM and out == ""
    assert err.splitlines() == ["pneumonia-kfp predict: stopped by SIGTERM; its temporary files were removed"]
    assert len(seen) == 1 and str(seen[0]).startswith(str(tmp_path / "tmp")) and not seen[0].exists()
