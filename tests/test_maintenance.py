"""gc and verify, in-process (tests/test_concurrent_store.py runs them against real concurrent writers)."""
import json
import os
import subprocess
import sys
import time

import pytest

from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.maintenance import DurationError, gc, parse_duration, verify
from pneumonia_kfp.storage import StorageError, open_store

CLI = [sys.executable, "-m", "pneumonia_kfp.pipelines.cli"]


@pytest.fixture
def version(storage, image_folder):
    info = ingest(str(image_folder), storage, image_size=32)
    return info["sha"], json.loads(open_store(storage).get_bytes(f"datasets/{info['sha']}/manifest.json"))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800),
                                           ("1w", 604800), ("5", 5), ("1.5h", 5400), ("0s", 0), (" 3 m ", 180)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1y", "-1d", "d", "1d2h", "1,5h"])
def test_bad_durations_are_one_line(text):
    with pytest.raises(DurationError) as e:
        parse_duration(text)
    assert repr(text) in str(e.value) and "\n" not in str(e.value) and "1d" in str(e.value)


def test_gc_removes_only_old_unreferenced_objects(storage, version):
    sha, manifest = version
    store = open_store(storage)
    referenced = {f"datasets/{sha}/{name}" for name in manifest["objects"]} | {f"datasets/{sha}/manifest.json"}
    store.put_bytes(f"datasets/{sha}/raw/loser.pack", b"a losing writer's pack")
    store.put_bytes("datasets/0123456789abcdef/validation.json", b"{}")  # a version never published
    store.put_bytes("ingest-index/objects.json", b"{}")  # outside datasets/: never gc's
    now = time.time()
    # everything is a few seconds old: with a grace of an hour, nothing goes
    young = gc(storage, older_than=3600, now=now)
    assert young.removed == [] and young.kept_young == 2 and young.skipped == []
    # an hour later, the two unreferenced ones go; the published version and its objects stay
    dry = gc(storage, older_than=3600, now=now + 3601, dry_run=True)
    assert sorted(dry.removed) == ["datasets/0123456789abcdef/validation.json", f"datasets/{sha}/raw/loser.pack"]
    assert store.exists(f"datasets/{sha}/raw/loser.pack")  # a dry run removes nothing
    report = gc(storage, older_than=3600, now=now + 3601)
    assert sorted(report.removed) == sorted(dry.removed) and report.kept_young == 0
    assert set(store.list("datasets")) == referenced and store.exists("ingest-index/objects.json")
    assert verify(storage).problems == []


def test_gc_leaves_a_version_with_a_damaged_manifest_alone(storage, version):
    sha, manifest = version
    store = open_store(storage)
    store.put_bytes(f"datasets/{sha}/raw/loser.pack", b"x")
    store.put_bytes(f"datasets/{sha}/manifest.json", json.dumps({**manifest, "rejected": 7}).encode())
    report = gc(storage, older_than=0, now=time.time() + 10)
    assert report.removed == [] and len(report.skipped) == 1
    assert f"datasets/{sha}" in report.skipped[0] and "left alone" in report.skipped[0] and \
        "manifest.json is damaged" in report.skipped[0]
    assert store.exists(f"datasets/{sha}/raw/loser.pack")


def test_gc_removes_old_partial_files(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    store.put_bytes("checkpoints/x/last.pt", b"state")
    old, new = tmp_path / "store" / "checkpoints" / "x" / ".partial-old", tmp_path / "store" / ".partial-new"
    old.write_bytes(b"killed")
    new.write_bytes(b"in flight")
    past = time.time() - 7200
    os.utime(old, (past, past))
    report = gc(store.uri, older_than=3600)
    assert report.removed == ["checkpoints/x/.partial-old"] and report.kept_young == 1
    assert not old.exists() and new.exists() and store.exists("checkpoints/x/last.pt")


def test_verify_names_each_damaged_or_missing_object_and_the_repair(storage, version, image_folder):
    sha, manifest = version
    store = open_store(storage)
    assert verify(storage).problems == [] and verify(storage).versions == 1
    assert verify(storage).objects == len(manifest["objects"])
    pack = sorted(k for k in manifest["objects"] if k.startswith("raw/"))[0]
    good = store.get_bytes(f"datasets/{sha}/tensors/test.npy")
    store.put_bytes(f"datasets/{sha}/tensors/test.npy", good[:-1] + bytes([good[-1] ^ 1]))
    store.delete(f"datasets/{sha}/{pack}")
    report = verify(storage)
    assert len(report.problems) == 2
    missing, damaged = sorted(report.problems, key=lambda p: "damaged" in p)
    assert f"datasets/{sha}/{pack} is missing" in missing
    assert f"datasets/{sha}/tensors/test.npy is damaged: its sha256 is" in damaged
    for line in report.problems:
        assert "\n" not in line and f"pneumonia-kfp ingest --data {image_folder} --storage {storage}" in line
    assert verify(storage, sha).problems == report.problems
    # the repair it names works
    ingest(str(image_folder), storage, image_size=32)
    assert verify(storage).problems == []


def test_verify_a_damaged_manifest_and_an_unknown_version(storage, version):
    sha, manifest = version
    store = open_store(storage)
    store.put_bytes(f"datasets/{sha}/manifest.json", b"{not json")
    [problem] = verify(storage).problems
    assert f"datasets/{sha}/manifest.json is damaged" in problem and "pneumonia-kfp ingest" in problem
    with pytest.raises(StorageError) as e:
        verify(storage, "ffffffffffffffff")
    assert "datasets/ffffffffffffffff is no published dataset version" in str(e.value)
    assert f"published: {sha}" in str(e.value)


def test_verify_notes_what_gc_would_remove_without_calling_it_a_problem(storage, version):
    sha, _ = version
    open_store(storage).put_bytes(f"datasets/{sha}/raw/loser.pack", b"x")
    report = verify(storage)
    assert report.problems == [] and len(report.notes) == 1
    assert "1 object(s) no published version references" in report.notes[0] and "pneumonia-kfp gc" in report.notes[0]


def test_cli_verify_exit_status_and_lines(tmp_path, image_folder):
    storage = (tmp_path / "store").as_uri()
    info = ingest(str(image_folder), storage, image_size=32)
    ok = subprocess.run([*CLI, "verify", "--storage", storage], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "" and "1 version(s)" in ok.stderr and "no problem" in ok.stderr
    (tmp_path / "store" / "datasets" / info["sha"] / "validation.json").write_text("{}")
    bad = subprocess.run([*CLI, "verify", "--storage", storage], capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stdout.splitlines()) == 1 and "validation.json is damaged" in bad.stdout
    assert "Traceback" not in bad.stderr
    unknown = subprocess.run([*CLI, "verify", "--storage", storage, "--version", "abc"], capture_output=True, text=True)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "datasets/abc is no published dataset version" in unknown.stderr
    dur = subprocess.run([*CLI, "gc", "--storage", storage, "--older-than", "soon"], capture_output=True, text=True)
    assert dur.returncode == 2 and dur.stderr.strip().splitlines() == [
        "pneumonia-kfp gc: error: duration 'soon': use a number with s, m, h, d or w (e.g. 1d, 12h, 90s)"]


def test_verify_of_a_store_without_versions_says_so(tmp_path):
    report = verify((tmp_path / "nothing-here").as_uri())
    assert report.problems == [] and report.versions == 0
    assert report.notes == [f"{(tmp_path / 'nothing-here').as_uri()} holds no published dataset version"]
