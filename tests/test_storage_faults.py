"""Storage faults with real fault injection: 503s, a server that goes away, a killed ingest."""
import os
import signal
import subprocess
import sys
import time

import pytest

from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.storage import StorageError, open_store
from tests.s3_proxy import FaultyProxy


@pytest.fixture
def via_proxy(s3_env, monkeypatch):
    proxies = []

    def start(**kwargs):
        proxy = FaultyProxy(s3_env, **kwargs)
        proxies.append(proxy)
        monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{proxy.port}")
        return proxy

    yield start
    for p in proxies:
        try:
            p.stop()
        except OSError:
            pass


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpeg"))


def test_transient_503s_are_retried(image_folder, via_proxy):
    proxy = via_proxy(fail_every=4)
    info = ingest(str(image_folder), "s3://flaky/p", image_size=32)
    assert proxy.failed >= 10  # faults really happened...
    ds = StoredDataset(info["uri"])  # ...and every object arrived whole
    assert sorted(k.removeprefix("raw/") for k in ds.store.list("raw")) == _files(image_folder)
    assert ds.split("train")[0].shape[0] == 80


def test_server_going_away_mid_ingest_is_a_clear_error_and_a_rerun_completes(image_folder, via_proxy):
    proxy = via_proxy(die_after=30)
    with pytest.raises(StorageError, match=f"127.0.0.1:{proxy.port} is unreachable"):
        ingest(str(image_folder), "s3://outage/p", image_size=32)
    via_proxy(port=proxy.port)  # the server is back
    store = open_store("s3://outage/p")
    assert not [k for k in store.list() if k.endswith("manifest.json")]  # the half version is invisible
    info = ingest(str(image_folder), "s3://outage/p", image_size=32)
    ds = StoredDataset(info["uri"])
    assert sorted(k.removeprefix("raw/") for k in ds.store.list("raw")) == _files(image_folder)
    assert sum(len(ds.entries(s)) for s in ("train", "test")) == len(_files(image_folder))


def test_killed_ingest_rerun_has_nothing_missing_or_duplicated(tmp_path, s3_env):
    from pneumonia_kfp.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", {"train": 150, "test": 20}, size=64)
    cmd = [sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data", str(data), "--storage", "s3://killed/p",
           "--image-size", "32"]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = open_store("s3://killed/p")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len([k for k in store.list() if "/raw/" in k]) >= 5:
                break
        except StorageError:
            pass  # the bucket does not exist yet
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(store.list())
    assert partial and not [k for k in partial if k.endswith("manifest.json")]  # killed before completing

    out = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, check=True)
    ds = StoredDataset(out.stdout.strip().splitlines()[-1])
    raw = [k.removeprefix("raw/") for k in ds.store.list("raw")]
    assert sorted(raw) == _files(data) and len(raw) == len(set(raw))
    assert len(ds.manifest["files"]) == len(_files(data))
    assert sum(sum(c.values()) for c in ds.manifest["counts"].values()) == len(_files(data))
