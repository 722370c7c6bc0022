"""Hostile data: what ingest answers for each case."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pneumonia_kfp.data import DataError, StoredDataset
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.storage import open_store
from tests.hostile import special_files


@pytest.fixture
def data(image_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    return root


def _store(tmp_path):
    return (tmp_path / "store").as_uri()


def _rejected(tmp_path):
    store = open_store(_store(tmp_path))
    [key] = [k for k in store.list() if k.endswith("validation.json")]
    return {r["path"]: r["reason"] for r in json.loads(store.get_bytes(key))["rejected"]}


def _some_jpeg(data):
    return sorted((data / "train" / "NORMAL").glob("*.jpeg"))[0]


def test_bad_files_are_rejected_with_reasons(data, tmp_path):
    n = data / "train" / "NORMAL"
    (n / "empty.jpeg").write_bytes(b"")
    (n / "truncated.jpeg").write_bytes(_some_jpeg(data).read_bytes()[:300])
    (n / "fake.jpeg").write_text("this is not a picture")
    (n / "notes.txt").write_text("clinician notes")
    (n / ".DS_Store").write_bytes(b"\0\1hidden")
    Image.new("L", (12, 12), 100).save(n / "tiny.png")
    outside = tmp_path / "outside.jpeg"
    shutil.copy(_some_jpeg(data), outside)
    os.symlink(outside, n / "escape.jpeg")

    with pytest.raises(DataError) as e:
        ingest(str(data), _store(tmp_path), image_size=32)
    msg = str(e.value)
    assert msg.startswith("6 of ") and "--on-invalid skip" in msg and "train/NORMAL/empty.jpeg: zero-byte" in msg
    reasons = _rejected(tmp_path)
    assert reasons == {
        "train/NORMAL/empty.jpeg": "zero-byte file",
        "train/NORMAL/truncated.jpeg": reasons["train/NORMAL/truncated.jpeg"],
        "train/NORMAL/fake.jpeg": "not an image (no decoder recognises its content)",
        "train/NORMAL/notes.txt": "not an image (no decoder recognises its content)",
        "train/NORMAL/tiny.png": "too small: 12x12 px (minimum 32 px a side)",
        "train/NORMAL/escape.jpeg": "symlink pointing outside the data root",
    }
    assert "truncated" in reasons["train/NORMAL/truncated.jpeg"].lower()
    # fail leaves no visible version behind
    assert not [k for k in open_store(_store(tmp_path)).list() if k.endswith("manifest.json")]

    info = ingest(str(data), _store(tmp_path), image_size=32, on_invalid="skip")
    ds = StoredDataset(info["uri"])
    paths = {e["path"] for e in ds.manifest["files"]}
    assert info["counts"]["train"]["NORMAL"] == 40 and not paths & set(reasons)
    assert ds.manifest["rejected"] == 6
    with pytest.raises(DataError, match="6 of "):  # the stored version does not hide the problem
        ingest(str(data), _store(tmp_path), image_size=32)


def test_other_image_modes_are_converted(data, tmp_path):
    n = data / "train" / "NORMAL"
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(n / "IM-9001-0001.png")
    rgba = Image.new("RGBA", (40, 40), (90, 90, 90, 255))
    rgba.save(n / "IM-9002-0001.png")
    Image.new("RGB", (40, 40), (90, 90, 90)).convert("P").save(n / "IM-9003-0001.png")
    Image.new("CMYK", (40, 40), (0, 0, 0, 165)).save(n / "IM-9004-0001.jpeg")
    info = ingest(str(data), _store(tmp_path), image_size=32)
    ds = StoredDataset(info["uri"])
    x, _, entries = ds.split("train")
    px = {e["path"].rsplit("/", 1)[1]: x[e["index"], 0] for e in entries}
    assert px["IM-9002-0001.png"].mean() == pytest.approx(90, abs=1)
    assert px["IM-9003-0001.png"].mean() == pytest.approx(90, abs=2)
    assert px["IM-9004-0001.jpeg"].mean() == pytest.approx(90, abs=4)
    assert px["IM-9001-0001.png"].dtype == np.uint8  # 16-bit scaled into 8 bit


@pytest.mark.parametrize("make, message", [
    (lambda d: shutil.rmtree(d / "train" / "PNEUMONIA"), "1 class folder"),
    (lambda d: [p.unlink() for p in (d / "train" / "PNEUMONIA").iterdir()], "PNEUMONIA holds no images"),
    (lambda d: shutil.move(d / "test" / "PNEUMONIA", d / "test" / "VIRAL"), "test has class folders"),
])
def test_dataset_shape_errors(data, tmp_path, make, message):
    make(data)
    with pytest.raises(DataError, match=message):
        ingest(str(data), _store(tmp_path), image_size=32)


def test_class_with_only_invalid_files_is_an_error(data, tmp_path):
    for p in (data / "train" / "PNEUMONIA").iterdir():
        p.write_bytes(b"")
    with pytest.raises(DataError, match="PNEUMONIA has no valid image left"):
        ingest(str(data), _store(tmp_path), image_size=32, on_invalid="skip")


def test_same_image_in_two_splits_is_leakage(data, tmp_path):
    src = _some_jpeg(data)
    shutil.copy(src, data / "test" / "NORMAL" / "copy-of-train.jpeg")
    pair = f"train/NORMAL/{src.name} = test/NORMAL/copy-of-train.jpeg"
    with pytest.raises(DataError, match=f"more than one split.*{pair}"):
        ingest(str(data), _store(tmp_path), image_size=32)


def test_same_patient_in_train_and_test_is_a_warning(data, tmp_path, caplog):
    train_img = sorted((data / "train" / "PNEUMONIA").glob("person*"))[0]
    patient = train_img.name.split("_")[0]
    Image.new("L", (48, 48), 30).save(data / "test" / "PNEUMONIA" / f"{patient}_virus_999.jpeg")
    info = ingest(str(data), _store(tmp_path), image_size=32)
    assert f"1 patients have images in both train and test: {patient}" in caplog.text
    assert StoredDataset(info["uri"]).manifest["patients_in_train_and_test"] == [patient]


# --- hostile files: rejected with a reason under both policies, never a hang or a traceback ------------

def _cli_ingest(data, tmp_path, *extra, env=None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data", str(data), "--storage",
         _store(tmp_path), "--image-size", "32", *extra],
        capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})},  # a hang fails the test
    )


@pytest.fixture
def hostile(data, tmp_path):
    """The data folder with one of each hostile file in train/NORMAL; {relpath: expected reason}."""
    n = data / "train" / "NORMAL"
    Image.new("L", (8000, 8000)).save(n / "big.png")  # a real 64 MP image, a few hundred KB as PNG
    with special_files(n) as expected:
        expected["big.png"] = ("too large: 8000x8000 px = 64 MP, over the pixel limit of 50 MP "
                               "(PNEUMONIA_KFP_MAX_PIXELS)")
        yield {f"train/NORMAL/{name}": why for name, why in expected.items()}


def test_hostile_files_fail_with_one_line_naming_them(hostile, data, tmp_path):
    out = _cli_ingest(data, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and f"{len(hostile)} of " in out.stderr
    assert _rejected(tmp_path) == hostile


def test_hostile_files_are_skipped_with_their_reasons(hostile, data, tmp_path):
    out = _cli_ingest(data, tmp_path, "--on-invalid", "skip")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert _rejected(tmp_path) == hostile
    ds = StoredDataset(out.stdout.strip().splitlines()[-1])
    assert ds.manifest["rejected"] == len(hostile) and ds.manifest["counts"]["train"]["NORMAL"] == 40
    assert not {e["path"] for e in ds.manifest["files"]} & set(hostile)


def test_the_pixel_limit_is_a_setting(data, tmp_path):
    out = _cli_ingest(data, tmp_path, env={"PNEUMONIA_KFP_MAX_PIXELS": "2000"})  # the 48 px images are 2,304 px
    assert out.returncode == 2 and "too large: 48x48 px" in out.stderr and "Traceback" not in out.stderr
    out = _cli_ingest(data, tmp_path, env={"PNEUMONIA_KFP_MAX_PIXELS": "lots"})
    assert out.returncode == 2 and "PNEUMONIA_KFP_MAX_PIXELS='lots'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_class_folder_outside_the_data_root_is_refused(data, tmp_path, policy):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(data / "test" / "NORMAL", elsewhere)
    os.symlink(elsewhere, data / "test" / "NORMAL")
    with pytest.raises(DataError, match=r"test/NORMAL resolves to .*elsewhere, outside the data root"):
        ingest(str(data), _store(tmp_path), image_size=32, on_invalid=policy)


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_empty_class_in_any_split_names_the_split_and_class(data, tmp_path, policy):
    for p in (data / "test" / "NORMAL").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="test/NORMAL holds no images: every split needs at least one image"):
        ingest(str(data), _store(tmp_path), image_size=32, on_invalid=policy)


def test_a_class_left_without_valid_images_in_test_names_the_split(data, tmp_path):
    for p in (data / "test" / "NORMAL").iterdir():
        p.write_bytes(b"not an image")
    with pytest.raises(DataError, match="test/NORMAL has no valid image left: every split needs"):
        ingest(str(data), _store(tmp_path), image_size=32, on_invalid="skip")
