"""Many writers, one store: concurrent ingests (real processes) into file and s3 stores, killed writers,
gc racing ingests, and verify. A gate in the writers (a wrapper around ingest.publish, test-side only)
holds each one after it has written every object and before it publishes, so the race the store must
survive -- all writers publishing one version at the same moment -- happens every time, not by luck."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.synthetic import make_synthetic

CLI = [sys.executable, "-m", "pneumonia_kfp.pipelines.cli"]
GATED = """
import os, sys, time
from pathlib import Path
import pneumonia_kfp.ingest as ingest
gate, name = Path(os.environ["GATE"]), os.environ["WRITER"]
original = ingest.publish

def gated(*args):
    (gate / f"{name}.arrived").touch()
    deadline = time.monotonic() + 120
    while not (gate / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return original(*args)

ingest.publish = gated
from pneumonia_kfp.pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("race-data")
    return (make_synthetic(root / "a", {"train": 24, "test": 6}, size=48, seed=1),
            make_synthetic(root / "b", {"train": 20, "test": 6}, size=48, seed=2))


def _env(tmp_path, **extra):
    (tmp_path / "tmp").mkdir(exist_ok=True)  # a SIGKILLed ingest cannot remove its temporary directory
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"), **extra}


def _writer(data, storage, tmp_path, name=None):
    args = ["ingest", "--data", str(data), "--storage", storage, "--image-size", "32"]
    if name is None:
        return subprocess.Popen([*CLI, *args], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    gate = tmp_path / "gate"
    gate.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", GATED, *args], env=_env(tmp_path, GATE=str(gate), WRITER=name),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_arrived(tmp_path, names, procs):
    deadline = time.monotonic() + 180
    while not all((tmp_path / "gate" / f"{n}.arrived").exists() for n in names):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)


def _finish(procs):
    out = [p.communicate(timeout=180) for p in procs]
    for p, (_, stderr) in zip(procs, out, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    return [(stdout.strip().splitlines()[-1], stderr) for stdout, stderr in out]


def _cli(*args, tmp_path):
    return subprocess.run([*CLI, *args], env=_env(tmp_path), capture_output=True, text=True, timeout=300)


def _versions(storage):
    store = open_store(storage)
    return {k.split("/")[1]: json.loads(store.get_bytes(k)) for k in store.list("datasets")
            if k.endswith("/manifest.json")}


def _whole(uri, data):
    """Every file of ``data`` is in the version, byte for byte (each read checked by its sha256), and the
    tensors verify."""
    ds = StoredDataset(uri)
    entries = ds.manifest["files"]
    assert sorted(e["path"] for e in entries) == sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpeg"))
    assert all(ds.raw(e) == (data / e["path"]).read_bytes() for e in entries)
    assert sum(len(ds.split(s)[0]) for s in ds.manifest["counts"]) == len(entries)


def _unreferenced(storage):
    store, out = open_store(storage), []
    for sha, manifest in _versions(storage).items():
        out += [k for k in store.list(f"datasets/{sha}") if k.split("/", 2)[2] not in manifest["objects"]
                and not k.endswith("/manifest.json")]
    return out


def test_six_writers_same_and_different_data_publish_complete_versions(storage, datasets, tmp_path):
    a, b = datasets
    names = ["a1", "a2", "a3", "a4", "b1", "b2"]
    procs = [_writer(a if n[0] == "a" else b, storage, tmp_path, n) for n in names]
    _wait_arrived(tmp_path, names, procs)  # all six have written every object, none has published
    (tmp_path / "gate" / "go").touch()  # now all publish at once
    results = _finish(procs)
    uris_a, uris_b = {u for u, _ in results[:4]}, {u for u, _ in results[4:]}
    assert len(uris_a) == 1 and len(uris_b) == 1 and uris_a != uris_b  # one version each, all agree
    assert len(_versions(storage)) == 2
    _whole(uris_a.pop(), a)
    _whole(uris_b.pop(), b)
    # exactly one writer of each version won; the others adopted its manifest
    adopted = ["published by another ingest meanwhile" in err for _, err in results]
    assert adopted[:4].count(False) == 1 and adopted[4:].count(False) == 1
    assert _unreferenced(storage) == []  # the losers removed their own packs, and nothing else
    check = _cli("verify", "--storage", storage, tmp_path=tmp_path)
    assert check.returncode == 0 and check.stdout == "" and "2 version(s)" in check.stderr, check.stderr


def test_killed_writers_leave_published_versions_whole_and_gc_removes_their_leftovers(storage, datasets, tmp_path):
    a, b = datasets
    names = ["a1", "a2", "a3", "b1", "b2"]
    procs = [_writer(a if n[0] == "a" else b, storage, tmp_path, n) for n in names]
    early = _writer(a, storage, tmp_path)  # killed at whatever point it has reached
    time.sleep(1.5)
    early.send_signal(signal.SIGKILL)
    _wait_arrived(tmp_path, names, procs)
    for victim in (procs[0], procs[3]):  # killed with every object written, before publishing
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    early.wait()
    (tmp_path / "gate" / "go").touch()
    results = _finish([p for i, p in enumerate(procs) if i not in (0, 3)])
    _whole(results[0][0], a)
    _whole(results[2][0], b)
    before = _cli("verify", "--storage", storage, tmp_path=tmp_path)
    assert before.returncode == 0 and before.stdout == "", before.stdout
    leftovers = _unreferenced(storage)
    assert len([k for k in leftovers if k.endswith(".pack")]) >= 2  # the two killed at the gate left theirs
    assert f"{len(leftovers)} object(s) no published version references" in before.stderr
    kept = _cli("gc", "--storage", storage, "--older-than", "1h", tmp_path=tmp_path)  # all too young
    assert kept.returncode == 0 and kept.stdout == "" and _unreferenced(storage) == leftovers
    gc = _cli("gc", "--storage", storage, "--older-than", "0s", tmp_path=tmp_path)
    assert gc.returncode == 0 and set(leftovers) <= {line.removeprefix("removed ") for line in gc.stdout.splitlines()}
    assert _unreferenced(storage) == [] and open_store(storage).unfinished() == []
    store = open_store(storage)
    assert {k.split("/")[1] for k in store.list("datasets")} == set(_versions(storage))  # no unpublished version
    after = _cli("verify", "--storage", storage, tmp_path=tmp_path)
    assert after.returncode == 0 and after.stdout == "" and "note" not in after.stderr
    _whole(results[0][0], a)
    _whole(results[2][0], b)


def test_gc_racing_ingests_removes_old_garbage_and_nothing_in_flight(storage, datasets, tmp_path):
    a, b = datasets
    store = open_store(storage)
    garbage = ["datasets/00000000deadbeef/raw/old.pack", "datasets/00000000deadbeef/validation.json"]
    for key in garbage:
        store.put_bytes(key, b"left by a run killed long ago")
    grace = 10
    if storage.startswith("file://"):
        past = time.time() - 3600
        for key in garbage:
            os.utime(store._path(key), (past, past))
        (store.root / "datasets" / ".partial-killed").write_bytes(b"half")
        os.utime(store.root / "datasets" / ".partial-killed", (past, past))
    else:
        time.sleep(grace + 1)  # an S3 object's time cannot be set back
    names = ["a1", "a2", "b1", "b2"]
    procs = [_writer(a if n[0] == "a" else b, storage, tmp_path, n) for n in names]
    _wait_arrived(tmp_path, names, procs)
    in_flight = [k for k in store.list("datasets") if k not in garbage]
    assert len([k for k in in_flight if k.endswith(".pack")]) >= 4  # each writer's packs, unpublished
    gc = _cli("gc", "--storage", storage, "--older-than", f"{grace}s", tmp_path=tmp_path)
    assert gc.returncode == 0, gc.stderr
    removed = {line.removeprefix("removed ") for line in gc.stdout.splitlines()}
    assert set(garbage) <= removed and not removed & set(in_flight)  # only the old garbage
    assert [k for k in store.list("datasets") if k not in garbage] == in_flight
    if storage.startswith("file://"):
        assert "datasets/.partial-killed" in removed and not (store.root / "datasets" / ".partial-killed").exists()
    (tmp_path / "gate" / "go").touch()
    racing = [subprocess.Popen([*CLI, "gc", "--storage", storage, "--older-than", f"{grace}s"], env=_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = _finish(procs)
    assert all(g.wait(timeout=120) == 0 for g in racing)
    _whole(results[0][0], a)
    _whole(results[2][0], b)
    assert _cli("verify", "--storage", storage, tmp_path=tmp_path).returncode == 0


def test_writers_in_threads_publishing_at_once_agree_on_one_manifest(storage, datasets, monkeypatch):
    """The same race in one process (fast; mutation testing runs this one): four ingests held at
    publish by a barrier, then released together."""
    import threading

    from pneumonia_kfp import ingest as ingest_module

    barrier, original, won = threading.Barrier(4, timeout=120), ingest_module.publish, []

    def gated(root, sha, manifest, writer, index):
        barrier.wait()
        result = original(root, sha, manifest, writer, index)
        won.append(result[1] is manifest)  # its own manifest was published (the others adopt the winner's)
        return result

    monkeypatch.setattr(ingest_module, "publish", gated)
    a = datasets[0]
    results = [None] * 4

    def run(i):
        results[i] = ingest_module.ingest(str(a), storage, image_size=32, workers=1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(results) and len({r["uri"] for r in results}) == 1
    assert won.count(True) == 1  # exactly one published; three adopted it
    assert len(_versions(storage)) == 1 and _unreferenced(storage) == []
    _whole(results[0]["uri"], a)
    winner = json.loads(open_store(storage).get_bytes(f"datasets/{results[0]['sha']}/manifest.json"))
    assert all(StoredDataset(r["uri"]).manifest == winner for r in results)
