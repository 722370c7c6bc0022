"""Storage faults with real fault injection: 503s and 500s, a server that goes away, a killed ingest."""
import os
import signal
import subprocess
import sys
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest

from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.procs import alive, descendants
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


def _all_files_whole(ds, root):
    entries = ds.manifest["files"]
    assert sorted(e["path"] for e in entries) == _files(root)
    assert all(ds.raw(e) == (root / e["path"]).read_bytes() for e in entries)  # each checked by its sha256


def test_transient_503s_are_retried(image_folder, via_proxy):
    proxy = via_proxy(fail_every=3)
    info = ingest(str(image_folder), "s3://flaky/p", image_size=32)
    assert proxy.failed >= 4  # faults really happened...
    ds = StoredDataset(info["uri"])  # ...and every object arrived whole
    _all_files_whole(ds, image_folder)
    assert ds.split("train")[0].shape[0] == 80


def test_a_500_on_every_try_names_the_status_and_endpoint_not_unreachable(via_proxy, monkeypatch):
    monkeypatch.setenv("MINIO_RETRIES", "2")
    proxy = via_proxy(fail_every=1, status=500)
    with pytest.raises(StorageError) as e:
        open_store("s3://broken/p").put_bytes("k", b"v")
    message = str(e.value)
    assert f"127.0.0.1:{proxy.port} answered HTTP 500" in message and "unreachable" not in message
    assert proxy.failed == 3  # the first try and 2 retries, then it gave up


def test_a_non_s3_endpoint_is_one_line(tmp_path, monkeypatch, s3_env):
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: SimpleHTTPRequestHandler(*a, directory=str(tmp_path)))
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "MINIO_ENDPOINT": f"127.0.0.1:{server.server_address[1]}"}
        data = tmp_path / "data"
        from pneumonia_kfp.synthetic import make_synthetic

        make_synthetic(data, {"train": 4, "test": 2}, size=40)
        out = subprocess.run([sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data", str(data),
                              "--storage", "s3://some-bucket/p", "--image-size", "32"], env=env, capture_output=True,
                             text=True, timeout=120)
    finally:
        server.shutdown()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "is not an S3 server" in last and f"127.0.0.1:{server.server_address[1]}" in last


def test_server_going_away_mid_ingest_is_a_clear_error_and_a_rerun_completes(image_folder, via_proxy):
    proxy = via_proxy(die_after=6)
    with pytest.raises(StorageError, match=f"127.0.0.1:{proxy.port} is unreachable"):
        ingest(str(image_folder), "s3://outage/p", image_size=32)
    via_proxy(port=proxy.port)  # the server is back
    store = open_store("s3://outage/p")
    assert not [k for k in store.list() if k.endswith("manifest.json")]  # the half version is invisible
    info = ingest(str(image_folder), "s3://outage/p", image_size=32)
    _all_files_whole(StoredDataset(info["uri"]), image_folder)


def test_killed_ingest_rerun_has_nothing_missing_or_duplicated(tmp_path, via_proxy):
    from pneumonia_kfp.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", {"train": 150, "test": 20}, size=64)  # 340 files: worker processes
    proxy = via_proxy(delay=0.3)  # a slow store: the kill lands while the version is being written
    cmd = [sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data", str(data), "--storage",
           "s3://killed/p", "--image-size", "32"]
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}  # a SIGKILLed ingest cannot remove its temporary dir
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = open_store("s3://killed/p")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if [k for k in store.list() if k.endswith("validation.json")]:
                break
        except StorageError:
            pass  # the bucket does not exist yet
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(store.list())
    assert partial and not [k for k in partial if k.endswith("manifest.json")]  # killed before completing

    proxy.delay = 0
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    ds = StoredDataset(out.stdout.strip().splitlines()[-1])
    _all_files_whole(ds, data)
    assert len({e["path"] for e in ds.manifest["files"]}) == len(ds.manifest["files"])
    assert sum(sum(c.values()) for c in ds.manifest["counts"].values()) == len(_files(data))
    # the killed run's objects are referenced by no manifest: gc removes them, and only them
    gc = subprocess.run([*cmd[:3], "gc", "--storage", "s3://killed/p", "--older-than", "0s"], env=env,
                        capture_output=True, text=True, check=True)
    assert "removed" in gc.stderr
    packs = {k.split("/", 2)[2] for k in store.list(ds.uri.split("s3://killed/p/", 1)[1] + "/raw")}
    assert packs == {e["pack"] for e in ds.manifest["files"]}  # no pack left over from the killed run
    _all_files_whole(StoredDataset(ds.uri), data)


def test_killed_ingest_leaves_no_worker_process(tmp_path):
    from pneumonia_kfp.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", {"train": 400, "test": 20}, size=256)  # slow enough to kill while reading
    cmd = [sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data", str(data), "--storage",
           str(tmp_path / "store"), "--image-size", "32"]
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(workers) < 2:  # the reader processes (and multiprocessing's tracker)
        workers = [p for p in descendants(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        time.sleep(0.05)
    assert len(workers) >= 2, "no worker processes seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)]


def test_ingest_into_a_full_file_system_is_one_line_and_leaves_nothing_partial(image_folder, tmp_path):
    """A real full file system without root: a 64 KB tmpfs mounted in a user namespace of its own
    (``unshare -Urm``), which vanishes with the command, so nothing is left mounted."""
    import re
    import shlex

    mnt = tmp_path / "small"
    mnt.mkdir()
    (tmp_path / "tmp").mkdir()
    ingest_cmd = shlex.join([sys.executable, "-m", "pneumonia_kfp.pipelines.cli", "ingest", "--data",
                             str(image_folder), "--storage", f"file://{mnt}/store", "--image-size", "32"])
    script = (f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mnt))} || exit 99; {ingest_cmd}; "
              f"echo rc=$? >&2; find {shlex.quote(str(mnt))} -type f -printf 'left %P\\n'")
    out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "rc=2" and "Traceback" not in out.stderr, out.stderr[-3000:]
    error = lines[-2]
    m = re.fullmatch(rf"pneumonia-kfp ingest: error: writing {mnt}/store/datasets/\w+/"
                     r"(raw/\w+\.pack|tensors/\w+\.npy): "
                     r"no space left on the device \(it needs (\d+) bytes, (\d+) bytes "
                     r"free there\); free space there or use another --storage\. Nothing partial was left\.", error)
    assert m, error
    assert int(m.group(3)) < int(m.group(2))  # what it needed did not fit in what was free
    left = [line.removeprefix("left ") for line in out.stdout.splitlines()]
    assert left and not [k for k in left if ".partial-" in k or k.endswith("manifest.json")], left
    assert list(mnt.iterdir()) == []  # the mount went with its namespace
