import json
import shutil

import numpy as np
import pytest

from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.validation import load_image


def test_ingest_writes_manifest_raw_files_and_tensors(image_folder, tmp_path):
    info = ingest(str(image_folder), (tmp_path / "store").as_uri(), image_size=32)
    assert info["counts"] == {"train": {"NORMAL": 40, "PNEUMONIA": 40}, "test": {"NORMAL": 12, "PNEUMONIA": 12}}
    assert info["uri"].endswith(f"datasets/{info['sha']}") and not info["test_carved_from_train"]
    assert info["synthetic"]  # make_synthetic's marker file is recorded, so reports can warn
    ds = StoredDataset(info["uri"])
    x, y, entries = ds.split("train")
    assert x.shape == (80, 1, 32, 32) and x.dtype == np.uint8
    assert (y == [ds.classes.index(e["class"]) for e in entries]).all()
    e = entries[0]
    raw = (image_folder / e["path"]).read_bytes()
    assert ds.store.get_bytes(f"raw/{e['path']}") == raw and e["bytes"] == len(raw)
    assert e["patient"] and len(e["sha256"]) == 64
    # the stored tensor row is the decoded, resized file
    assert (x[e["index"], 0] == load_image(image_folder / e["path"], 32)).all()
    assert json.loads(ds.store.get_bytes("validation.json")) == {"rejected": []}


def test_reingest_of_unchanged_data_uploads_nothing(image_folder, tmp_path):
    storage = (tmp_path / "store").as_uri()
    first = ingest(str(image_folder), storage, image_size=32)
    store = open_store(storage)
    before = {k: (tmp_path / "store" / k).stat().st_mtime_ns for k in store.list()}
    again = ingest(str(image_folder), storage, image_size=32)
    assert first["uploaded"] > 80 and again["uploaded"] == 0 and again["sha"] == first["sha"]
    assert {k: (tmp_path / "store" / k).stat().st_mtime_ns for k in store.list()} == before
    # a changed file is a new version
    changed = tmp_path / "changed"
    shutil.copytree(image_folder, changed)
    victim = next((changed / "train" / "NORMAL").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")  # trailing byte: same pixels, new content
    assert ingest(str(changed), storage, image_size=32)["sha"] != first["sha"]


def test_missing_test_split_is_carved_from_train_by_patient(image_folder, tmp_path, caplog):
    no_test = tmp_path / "no-test"
    shutil.copytree(image_folder / "train", no_test / "train")
    info = ingest(str(no_test), (tmp_path / "store").as_uri(), image_size=32)
    assert info["test_carved_from_train"] and not info["synthetic"]  # no marker copied
    assert "carved" in caplog.text and "test" in caplog.text
    ds = StoredDataset(info["uri"])
    train_patients = {e["patient"] for e in ds.entries("train")}
    test_patients = {e["patient"] for e in ds.entries("test")}
    assert test_patients and train_patients.isdisjoint(test_patients)
    assert set(info["counts"]["test"]) == {"NORMAL", "PNEUMONIA"} and all(info["counts"]["test"].values())
    assert sum(sum(c.values()) for c in info["counts"].values()) == 80


def test_ingest_to_s3_and_from_s3(image_folder, s3_env, tmp_path):
    info = ingest(str(image_folder), "s3://datasets-bucket/pneumonia", image_size=32)
    assert info["uri"].startswith("s3://datasets-bucket/pneumonia/datasets/")
    x, y, _ = StoredDataset(info["uri"]).split("test")
    assert x.shape == (24, 1, 32, 32) and sorted(set(y.tolist())) == [0, 1]
    # an ImageFolder already in object storage is a data source too
    source = open_store("s3://raw-bucket/xray")
    for p in (p for p in image_folder.rglob("*") if p.is_file()):
        source.put_file(p.relative_to(image_folder).as_posix(), p)
    again = ingest("s3://raw-bucket/xray", "s3://datasets-bucket/pneumonia", image_size=32)
    assert again["sha"] == info["sha"] and again["uploaded"] == 0


def test_grayscale_conversion_of_other_modes(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (20, 20), (200, 200, 200, 255))
    rgba.save(tmp_path / "rgba.png")
    wide = Image.fromarray((np.arange(400).reshape(20, 20) * 160).astype(np.uint16))
    wide.save(tmp_path / "gray16.png")
    assert load_image(tmp_path / "rgba.png", 8).mean() == pytest.approx(200, abs=1)
    g16 = load_image(tmp_path / "gray16.png", 20)
    assert g16.min() == 0 and g16.max() == 255  # scaled from 16 bit, not clipped
