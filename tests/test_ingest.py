import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

from pneumonia_kfp import image_reader
from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.documents import DocumentError
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.maintenance import gc, verify
from pneumonia_kfp.manifest import IntegrityError
from pneumonia_kfp.manifest import checksum as manifest_checksum
from pneumonia_kfp.source_index import RACY_NS
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.synthetic import make_synthetic
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
    assert ds.raw(e) == raw and e["bytes"] == len(raw)
    assert e["patient"] and e["sha256"] == hashlib.sha256(raw).hexdigest()
    # the stored tensor row is the decoded, resized file
    assert (x[e["index"], 0] == load_image(image_folder / e["path"], 32)).all()
    assert json.loads(ds.read("validation.json")) == {"rejected": []}


def test_every_object_of_a_version_has_its_sha256_in_the_manifest(image_folder, tmp_path):
    info = ingest(str(image_folder), (tmp_path / "store").as_uri(), image_size=32)
    store = open_store((tmp_path / "store").as_uri())
    manifest = json.loads(store.get_bytes(f"datasets/{info['sha']}/manifest.json"))
    assert manifest["checksum"] == manifest_checksum(manifest)
    version_keys = {k.split("/", 2)[2] for k in store.list(f"datasets/{info['sha']}")} - {"manifest.json"}
    packs = {k for k in version_keys if k.startswith("raw/") and k.endswith(".pack")}
    assert set(manifest["objects"]) == version_keys == {"validation.json", "tensors/train.npy", "tensors/test.npy",
                                                        *packs} and packs
    for key, want in manifest["objects"].items():  # recomputed here, independently of the reader
        assert hashlib.sha256(store.get_bytes(f"datasets/{info['sha']}/{key}")).hexdigest() == want
    for e in manifest["files"]:  # every original file, byte for byte, at its place in its pack
        pack = store.get_bytes(f"datasets/{info['sha']}/{e['pack']}")
        assert pack[e["offset"]:e["offset"] + e["bytes"]] == (image_folder / e["path"]).read_bytes()
        assert hashlib.sha256((image_folder / e["path"]).read_bytes()).hexdigest() == e["sha256"]


def test_reingest_of_unchanged_data_reads_no_file_and_uploads_nothing(data, tmp_path, reads):
    storage = (tmp_path / "store").as_uri()
    first = ingest(str(data), storage, image_size=32, workers=1)
    assert len(reads) == 104
    store = open_store(storage)
    before = {k: (tmp_path / "store" / k).stat().st_mtime_ns for k in store.list() if "ingest-index" not in k}
    reads.clear()
    again = ingest(str(data), storage, image_size=32, workers=1)
    assert first["uploaded"] == 5 and again["uploaded"] == 0 and again["sha"] == first["sha"]
    assert reads == []  # a stat per file, no read
    assert {k: (tmp_path / "store" / k).stat().st_mtime_ns for k in store.list() if "ingest-index" not in k} == before


def test_a_touched_file_is_hashed_again_and_its_content_decides(data, tmp_path, reads):
    storage = (tmp_path / "store").as_uri()
    first = ingest(str(data), storage, image_size=32, workers=1)
    victim = sorted((data / "train" / "NORMAL").iterdir())[0]
    os.utime(victim, ns=(time.time_ns(), time.time_ns()))  # new mtime, same bytes
    time.sleep(RACY_NS / 1e9)
    reads.clear()
    again = ingest(str(data), storage, image_size=32, workers=1)
    assert str(victim) in reads and again["sha"] == first["sha"] and again["uploaded"] == 0
    victim.write_bytes(victim.read_bytes() + b"\0")  # trailing byte: same pixels, new content
    changed = ingest(str(data), storage, image_size=32, workers=1)
    assert changed["sha"] != first["sha"]
    assert changed["uploaded"] == 5  # a new version: report, pack, two tensors, manifest


def test_worker_processes_give_the_same_version_as_one_process(tmp_path):
    data = make_synthetic(tmp_path / "data", {"train": 130, "test": 10}, size=48)  # 280 files: enough for workers
    serial = ingest(str(data), (tmp_path / "a").as_uri(), image_size=32, workers=1)
    parallel = ingest(str(data), (tmp_path / "b").as_uri(), image_size=32, workers=2)
    assert serial["sha"] == parallel["sha"]
    for split in ("train", "test"):
        one, two = StoredDataset(serial["uri"]), StoredDataset(parallel["uri"])
        (xs, ys, es), (xp, yp, ep) = one.split(split), two.split(split)
        assert (xs == xp).all() and (ys == yp).all()

        def where(e):
            return {k: v for k, v in e.items() if k not in ("pack", "offset")}

        assert [where(e) for e in es] == [where(e) for e in ep]
        assert all(one.raw(a) == two.raw(b) for a, b in zip(es, ep, strict=True))
    packs = {e["pack"] for e in StoredDataset(parallel["uri"]).manifest["files"]}
    # one pack per worker that read files: a worker slow to start may find every chunk taken (seen once in
    # a full run), so the count is at most the workers; that workers run is test_storage_faults' check
    assert 1 <= len(packs) <= 2


@pytest.mark.parametrize("target", ["tensors/train.npy", "validation.json", "raw", "manifest.json"])
def test_flipped_bytes_are_found_by_readers_and_repaired_by_reingesting(data, tmp_path, target):
    storage = (tmp_path / "store").as_uri()
    info = ingest(str(data), storage, image_size=32)
    ds = StoredDataset(info["uri"])
    x_before, _, entries = ds.split("train")
    key = f"datasets/{info['sha']}/{target if target != 'raw' else entries[3]['pack']}"
    path = tmp_path / "store" / key
    good = path.read_bytes()
    manifest_path = tmp_path / "store" / "datasets" / info["sha"] / "manifest.json"
    published = manifest_path.read_bytes()
    at = entries[3]["offset"] if target == "raw" else max(0, len(good) // 2 - 2048)
    with open(path, "r+b") as f:  # flip 4 KB (or all of a smaller object) in place
        f.seek(at)
        chunk = f.read(4096)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(IntegrityError) as e:
        reader = StoredDataset(info["uri"])
        reader.split("train")
        reader.read("validation.json")
        reader.raw(entries[3])
    message = str(e.value)
    assert key.split("/")[-1] in message and "damaged" in message and "pneumonia-kfp ingest --data" in message
    again = ingest(str(data), storage, image_size=32)  # the same data again repairs it in place
    assert again["sha"] == info["sha"] and again["uploaded"] > 0
    repaired = StoredDataset(info["uri"])
    assert (repaired.split("train")[0] == x_before).all()
    assert repaired.raw(repaired.entries("train")[3]) == (data / entries[3]["path"]).read_bytes()
    if target in ("tensors/train.npy", "validation.json"):  # rewritten byte for byte; the manifest stands
        assert path.read_bytes() == good and manifest_path.read_bytes() == published
        assert set(tmp_path.joinpath("store", "datasets", info["sha"], "raw").iterdir()) == \
            {tmp_path / "store" / "datasets" / info["sha"] / e["pack"] for e in entries}  # its new packs: removed
    elif target == "raw":  # a pack is rewritten under a new name; the damaged one, referenced no more, is gc's
        assert manifest_path.read_bytes() != published
        assert path.exists() and key.split("/", 2)[2] not in repaired.manifest["objects"]
        assert gc(storage, older_than=0).removed == [key]
        assert not path.exists() and StoredDataset(info["uri"]).split("train")[0].shape == x_before.shape


def test_a_deleted_object_is_missing_for_readers_and_rewritten_by_reingest(data, tmp_path):
    storage = (tmp_path / "store").as_uri()
    info = ingest(str(data), storage, image_size=32)
    (tmp_path / "store" / "datasets" / info["sha"] / "tensors" / "test.npy").unlink()
    with pytest.raises(IntegrityError, match="test.npy is missing"):
        StoredDataset(info["uri"]).split("test")
    assert ingest(str(data), storage, image_size=32)["uploaded"] > 0
    assert StoredDataset(info["uri"]).split("test")[0].shape == (24, 1, 32, 32)


@pytest.mark.parametrize("change, says", [
    ({"format": 1}, "dataset manifest document with format 1, this version reads format 2"),
    ({"format": None}, "dataset manifest document with no format field, this version reads format 2"),
    ({"counts": None}, "dataset manifest document lacks counts"),
])
def test_a_manifest_of_another_format_is_one_line_naming_it_and_reingest_replaces_it(data, tmp_path, change, says):
    """A manifest whose checksum holds (not damaged) but whose format is not this version's, or that lacks a
    field the writer writes: the readers (train's and evaluate's StoredDataset, verify, gc) say so in one
    line naming the file; ingesting the same data again publishes this version's manifest in its place."""
    storage = (tmp_path / "store").as_uri()
    info = ingest(str(data), storage, image_size=32)
    path = tmp_path / "store" / "datasets" / info["sha"] / "manifest.json"
    doc = json.loads(path.read_text())
    doc.update(change)
    doc = {k: v for k, v in doc.items() if v is not None}
    doc["checksum"] = manifest_checksum(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DocumentError) as e:
        StoredDataset(info["uri"])
    assert str(e.value).startswith(f"{info['uri']}/manifest.json: {says}") and "\n" not in str(e.value)
    assert verify(storage).problems == [str(e.value)]
    assert gc(storage, older_than=0).skipped == [f"{info['uri']}: left alone, {e.value}"]
    assert ingest(str(data), storage, image_size=32)["sha"] == info["sha"]
    assert StoredDataset(info["uri"]).manifest["format"] == 2 and verify(storage).problems == []


def test_store_files_are_readable_as_the_umask_says(image_folder, tmp_path):
    ingest(str(image_folder), (tmp_path / "store").as_uri(), image_size=32)
    modes = {oct((p.stat().st_mode & 0o777)) for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert modes == {oct(0o666 & ~_umask())}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def test_ingest_to_s3_and_from_s3(image_folder, s3_env, tmp_path, reads):
    info = ingest(str(image_folder), "s3://datasets-bucket/pneumonia", image_size=32)
    assert info["uri"].startswith("s3://datasets-bucket/pneumonia/datasets/")
    x, y, _ = StoredDataset(info["uri"]).split("test")
    assert x.shape == (24, 1, 32, 32) and sorted(set(y.tolist())) == [0, 1]
    # an ImageFolder already in object storage is a data source too
    source = open_store("s3://raw-bucket/xray")
    for p in (p for p in image_folder.rglob("*") if p.is_file()):
        source.put_file(p.relative_to(image_folder).as_posix(), p)
    reads.clear()
    again = ingest("s3://raw-bucket/xray", "s3://datasets-bucket/pneumonia", image_size=32, workers=1)
    assert again["sha"] == info["sha"] and again["uploaded"] == 0 and len(reads) == 104
    reads.clear()  # unchanged ETags: nothing downloaded or read
    assert ingest("s3://raw-bucket/xray", "s3://datasets-bucket/pneumonia", image_size=32, workers=1)["sha"] == \
        info["sha"]
    assert reads == []
    # a damaged object in an s3 store (rewritten: a new ETag) is found and repaired the same way
    store = open_store(info["uri"])
    good = store.get_bytes("tensors/test.npy")
    store.put_bytes("tensors/test.npy", good[:-10] + bytes(10))
    with pytest.raises(IntegrityError, match="test.npy is damaged"):
        StoredDataset(info["uri"]).split("test")
    assert ingest("s3://raw-bucket/xray", "s3://datasets-bucket/pneumonia", image_size=32)["uploaded"] > 0
    assert store.get_bytes("tensors/test.npy") == good


def test_grayscale_conversion_of_other_modes(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (20, 20), (200, 200, 200, 255))
    rgba.save(tmp_path / "rgba.png")
    wide = Image.fromarray((np.arange(400).reshape(20, 20) * 160).astype(np.uint16))
    wide.save(tmp_path / "gray16.png")
    assert load_image(tmp_path / "rgba.png", 8).mean() == pytest.approx(200, abs=1)
    g16 = load_image(tmp_path / "gray16.png", 20)
    assert g16.min() == 0 and g16.max() == 255  # scaled from 16 bit, not clipped


def test_a_file_swapped_during_ingest_is_consistent_and_seen_next_time(data, tmp_path, monkeypatch):
    victim = sorted((data / "train" / "PNEUMONIA").iterdir())[0]
    relpath = victim.relative_to(data).as_posix()
    image_a, image_b = victim.read_bytes(), sorted((data / "train" / "PNEUMONIA").iterdir())[1].read_bytes()
    original = image_reader._Reader.read

    def read_then_swap(self, i, path):
        result = original(self, i, path)
        if path == str(victim):  # swapped for another image right after ingest read it
            (data / "swap.tmp").write_bytes(image_b)
            os.replace(data / "swap.tmp", victim)
        return result

    monkeypatch.setattr(image_reader._Reader, "read", read_then_swap)
    storage = (tmp_path / "store").as_uri()
    first = ingest(str(data), storage, image_size=32, workers=1)
    ds = StoredDataset(first["uri"])
    [entry] = [e for e in ds.manifest["files"] if e["path"] == relpath]
    # hash, raw bytes and tensor row all come from the one read: image A, throughout
    assert entry["sha256"] == hashlib.sha256(image_a).hexdigest() and ds.raw(entry) == image_a
    tmp = tmp_path / "a.jpeg"
    tmp.write_bytes(image_a)
    assert (ds.split("train")[0][entry["index"], 0] == load_image(tmp, 32)).all()
    monkeypatch.undo()
    time.sleep(RACY_NS / 1e9)
    again = ingest(str(data), storage, image_size=32, workers=1)  # the swap changed the stat: read again
    assert again["sha"] != first["sha"]
    [entry] = [e for e in StoredDataset(again["uri"]).manifest["files"] if e["path"] == relpath]
    assert entry["sha256"] == hashlib.sha256(image_b).hexdigest()


@pytest.mark.parametrize("data, storage, message", [
    ("file://nas/xray", "file:///tmp/store", "data URI 'file://nas/xray' names the host 'nas'"),
    ("/tmp/xray", "gs://bucket/x", "scheme gs:// is not supported"),
])
def test_ingest_checks_its_uris_itself(data, storage, message):  # as the cluster's ingest task calls it
    from pneumonia_kfp.storage import StorageError

    with pytest.raises(StorageError, match=message):
        ingest(data, storage, image_size=32)
