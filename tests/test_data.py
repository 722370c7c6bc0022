import numpy as np
import pytest
from PIL import Image

from pneumonia_kfp.data import DataError, grouped_holdout, patient_id
from pneumonia_kfp.sources import scan_image_folder


def _img(path, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), 128).save(path)


def test_patient_ids_follow_kermany_names():
    assert patient_id("person1_bacteria_1.jpeg") == "person1"
    assert patient_id("person1493_virus_2593.jpeg") == "person1493"
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert patient_id("scan.png") is None


def test_classes_come_from_folders_sorted(tmp_path):
    for c in ("zebra", "apple"):
        _img(tmp_path / "train" / c / "a.png")
    (tmp_path / "train" / "apple" / ".hidden.png").write_bytes(b"ignored")
    (tmp_path / "train" / "apple" / "notes.txt").write_text("listed: ingest decides")
    classes, files = scan_image_folder(tmp_path)
    assert classes == ["apple", "zebra"]
    assert [f.relpath for f in files] == ["train/apple/a.png", "train/apple/notes.txt", "train/zebra/a.png"]


@pytest.mark.parametrize("layout, message", [
    ({}, "does not exist"),
    ({"val/A/a.png": 1}, "no train/ folder"),
    ({"train/A/a.png": 1}, "1 class folder"),
    ({"train/A/a.png": 1, "train/B/b.png": 1, "test/A/a.png": 1, "test/C/c.png": 1}, "test has class folders"),
])
def test_malformed_layouts_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    for rel in layout:
        _img(root / rel)
    with pytest.raises(DataError, match=message):
        scan_image_folder(root)


def test_empty_train_class_is_an_error(tmp_path):
    _img(tmp_path / "train" / "A" / "a.png")
    (tmp_path / "train" / "B").mkdir()
    with pytest.raises(DataError, match="train/B holds no images"):
        scan_image_folder(tmp_path)


def test_grouped_holdout_keeps_patients_together_and_stratifies():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 3)
    labels = (groups % 4 == 0).astype(int)  # 25 % positive, constant within a patient
    held = grouped_holdout(labels, groups, 0.1, seed=1)
    assert set(groups[held]).isdisjoint(groups[~held])
    assert 0.07 < held.mean() < 0.13
    assert abs(labels[held].mean() - 0.25) < 0.08
    assert (grouped_holdout(labels, groups, 0.1, seed=1) == held).all()
    assert not (grouped_holdout(labels, rng.permutation(groups), 0.1, seed=2) == held).all()
