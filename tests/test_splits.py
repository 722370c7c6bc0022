"""Data splits and patient grouping: which images land in train, val and test, checked image by image."""
import shutil

import numpy as np
import pytest
from PIL import Image

from pneumonia_kfp.data import DataError, StoredDataset, grouped_holdout, groups_of, patient_id
from pneumonia_kfp.ingest import TEST_FRACTION, assign_splits, ingest
from pneumonia_kfp.sources import scan_image_folder
from pneumonia_kfp.synthetic import make_synthetic
from pneumonia_kfp.training import MIN_VAL_IMAGES, train_val_split


def _patients(entries):
    return {e["patient"] for e in entries}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store").as_uri()


def _by_content(ds, split):
    """image bytes -> manifest entry, for one split (synthetic images are all distinct)."""
    x, _, entries = ds.split(split)
    return {x[e["index"]].tobytes(): e for e in entries}


def test_a_val_split_of_min_val_images_is_used_as_it_is(tmp_path, store):
    root = make_synthetic(tmp_path / "d", {"train": 12, "val": MIN_VAL_IMAGES // 2, "test": 2}, size=32)
    ds = StoredDataset(ingest(str(root), store, image_size=32)["uri"])
    (tx, ty, *_), (vx, vy, *_), how = train_val_split(ds, seed=0)
    x_train, y_train, _ = ds.split("train")
    x_val, y_val, _ = ds.split("val")
    assert how == "dataset val split" and len(vy) == MIN_VAL_IMAGES
    assert (vx == x_val).all() and (vy == y_val).all() and (tx == x_train).all() and (ty == y_train).all()


def test_a_smaller_val_is_pooled_with_train_and_carved_by_patient(tmp_path, store):
    root = make_synthetic(tmp_path / "d", {"train": 40, "val": MIN_VAL_IMAGES // 2 - 1, "test": 2}, size=32)
    ds = StoredDataset(ingest(str(root), store, image_size=32)["uri"])
    (tx, ty, *_), (vx, vy, *_), how = train_val_split(ds, seed=0)
    assert how.startswith("carved from train") and f"dataset val had {MIN_VAL_IMAGES - 2} < {MIN_VAL_IMAGES}" in how
    train_imgs, val_imgs = _by_content(ds, "train"), _by_content(ds, "val")
    pool = {**train_imgs, **val_imgs}
    got_train = [pool[x.tobytes()] for x in tx]  # every returned image comes from train or the small val
    got_val = [pool[x.tobytes()] for x in vx]
    assert len(got_train) + len(got_val) == len(pool) == 80 + MIN_VAL_IMAGES - 2  # nothing lost, nothing twice
    assert {id(e) for e in got_train}.isdisjoint({id(e) for e in got_val})
    assert _patients(got_train).isdisjoint(_patients(got_val))  # no patient on both sides
    assert [ds.classes.index(e["class"]) for e in got_train] == ty.tolist()  # labels travel with their images
    assert [ds.classes.index(e["class"]) for e in got_val] == vy.tolist()
    assert any(e["split"] == "val" for e in got_train)  # the small val really joined the pool
    assert 0.05 < len(vy) / len(pool) < 0.2 and set(vy.tolist()) == {0, 1}
    assert f"{len(vy)} images" in how
    (tx2, *_), (vx2, *_), _ = train_val_split(ds, seed=0)
    assert (vx2 == vx).all() and (tx2 == tx).all()  # the same seed, the same carve
    _, (vx3, *_), _ = train_val_split(ds, seed=5)
    assert {x.tobytes() for x in vx3} != {x.tobytes() for x in vx}


def test_no_val_at_all_carves_from_train_only(image_folder, store):
    ds = StoredDataset(ingest(str(image_folder), store, image_size=32)["uri"])
    (tx, ty, *_), (vx, vy, *_), how = train_val_split(ds, seed=1)
    assert len(tx) + len(vx) == 80 and "dataset val had 0 < 100" in how


def _scanned(root):
    classes, files = scan_image_folder(root)
    return classes, files


def test_assign_splits_keeps_a_given_test_split(image_folder):
    classes, files = _scanned(image_folder)
    splits, carved = assign_splits(files, classes, seed=0)
    assert not carved and splits == [f.split for f in files]


def test_assign_splits_carves_a_grouped_stratified_test_split(tmp_path):
    root = make_synthetic(tmp_path / "d", {"train": 60}, size=32)
    for i in range(6):  # files without a Kermany patient id: each is its own patient
        Image.new("L", (32, 32), i).save(root / "train" / "NORMAL" / f"scan{i}.png")
    classes, files = _scanned(root)
    splits, carved = assign_splits(files, classes, seed=0)
    assert carved and len(splits) == len(files)
    test = [f for f, s in zip(files, splits, strict=True) if s == "test"]
    train = [f for f, s in zip(files, splits, strict=True) if s == "train"]
    assert set(splits) == {"train", "test"} and len(test) + len(train) == len(files)
    pid = {f.relpath: patient_id(f.relpath.rsplit('/', 1)[-1]) or f.relpath for f in files}
    assert {pid[f.relpath] for f in test}.isdisjoint({pid[f.relpath] for f in train})
    assert abs(len(test) / len(files) - TEST_FRACTION) < 0.05
    assert {f.label for f in test} == {"NORMAL", "PNEUMONIA"}
    assert assign_splits(files, classes, seed=0)[0] == splits  # reproducible
    assert assign_splits(files, classes, seed=1)[0] != splits  # and seeded


def test_assign_splits_leaves_val_alone(tmp_path):
    root = make_synthetic(tmp_path / "d", {"train": 40, "val": 4}, size=32)
    classes, files = _scanned(root)
    splits, carved = assign_splits(files, classes, seed=0)
    assert carved
    assert [s for f, s in zip(files, splits, strict=True) if f.split == "val"] == ["val"] * 8
    assert all(s in ("train", "test") for f, s in zip(files, splits, strict=True) if f.split == "train")


def test_grouped_holdout_fraction_and_too_few_patients():
    labels = np.array([0, 1] * 50)
    groups = np.arange(100)
    held = grouped_holdout(labels, groups, 0.25, seed=0)  # 4 folds: a quarter held out
    assert held.dtype == bool and held.sum() == 25 and labels[held].sum() in (12, 13)
    held = grouped_holdout(labels, groups, 0.9, seed=0)  # never fewer than 2 folds
    assert held.sum() == 50
    with pytest.raises(DataError, match="too few patients \\(9\\) to hold out 10% of them"):
        grouped_holdout(labels[:9], groups[:9], 0.1, seed=0)
    assert grouped_holdout(labels[:20], groups[:20], 0.1, seed=0).sum() == 2  # 10 folds of 20 patients
    # exactly as many patients as folds: allowed, one patient held out
    held = grouped_holdout([0, 0, 0, 0], ["a", "a", "b", "b"], 0.5, seed=0)
    assert held.tolist() in ([True, True, False, False], [False, False, True, True])


def test_groups_of_falls_back_to_the_path():
    entries = [{"patient": "person1", "path": "a"}, {"patient": None, "path": "b"}, {"path": "c", "patient": ""}]
    assert groups_of(entries) == ["person1", "b", "c"]


@pytest.mark.parametrize("name, pid", [
    ("person12_virus_3.jpeg", "person12"), ("IM-0001-0002.jpeg", "IM-0001"), ("NORMAL2-IM-0005-0001.jpeg",
                                                                             "NORMAL2-IM-0005"),
    ("xperson1_virus.jpeg", None), ("person_1.jpeg", None), ("IM-12.jpeg", None), ("im-0001-0002.jpeg", None),
])
def test_patient_id_patterns(name, pid):
    assert patient_id(name) == pid


def test_stored_dataset_rows_labels_and_errors(tmp_path, image_folder):
    info = ingest(str(image_folder), (tmp_path / "s").as_uri(), image_size=32)
    ds = StoredDataset(info["uri"])
    x, y, entries = ds.split("test")
    assert [e["index"] for e in entries] == list(range(24))
    assert y.dtype == np.int64 and y.tolist() == [ds.classes.index(e["class"]) for e in entries]
    assert y.tolist().count(1) == 12
    empty_x, empty_y, empty_e = ds.split("val")
    assert empty_x.shape == (0, 1, 1, 1) and empty_y.shape == (0,) and empty_e == []
    ds.store.put_bytes("tensors/test.npy", ds.store.get_bytes("tensors/train.npy"))  # not the object the manifest names
    with pytest.raises(DataError, match="tensors/test.npy is damaged: its sha256 is .* the manifest says"):
        ds.split("test")
    root = tmp_path / "s" / info["uri"].rsplit("/s/", 1)[1]
    shutil.move(root / "manifest.json", root / "manifest.moved")
    with pytest.raises(DataError, match="no manifest.json"):
        StoredDataset(info["uri"])
