import os
import time
import uuid
from pathlib import Path

import pytest

from pneumonia_kfp.storage import FileStore, NotFound, S3Store, StorageError, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    request.getfixturevalue("s3_env")
    return open_store(f"s3://bucket-{uuid.uuid4().hex[:8]}/some/prefix")


def test_roundtrip_list_and_child(store, tmp_path):
    assert not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"hello")
    src = tmp_path / "src.txt"
    src.write_text("file body")
    store.put_file("a/c/d.txt", src)
    assert store.exists("a/b.bin") and store.get_bytes("a/b.bin") == b"hello"
    assert list(store.list("a")) == ["a/b.bin", "a/c/d.txt"]
    child = store.child("a/c")
    assert child.get_bytes("d.txt") == b"file body"
    assert list(child.list()) == ["d.txt"]
    store.get_file("a/c/d.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "file body"


def test_a_missing_key_is_not_found_naming_it(store, tmp_path):
    """Whatever reads a missing object (whole, a range, into a file) gets NotFound, naming it."""
    for read in (lambda: store.get_bytes("nothing-here"), lambda: store.get_range("nothing-here", 0, 4),
                 lambda: store.get_file("nothing-here", tmp_path / "copy")):
        with pytest.raises(NotFound, match="nothing-here"):
            read()


def test_backend_types(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path)), FileStore)
    assert isinstance(open_store(tmp_path.as_uri()), FileStore)
    assert isinstance(open_store("s3://bucket/x"), S3Store)
    with pytest.raises(StorageError, match="gs://"):
        open_store("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        open_store("s3:///x")


def test_file_store_write_is_atomic(tmp_path):
    store = FileStore(tmp_path)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        store._atomic_write("x.bin", lambda f: (f.write(b"half"), (_ for _ in ()).throw(Boom())))
    assert not store.exists("x.bin") and list(store.list()) == []
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    with pytest.raises(StorageError, match="escapes"):
        store.put_bytes("../outside", b"x")


def test_unreachable_endpoint_fails_fast_naming_it(monkeypatch):
    from tests.conftest import free_port

    port = free_port()  # nothing listens here
    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("MINIO_ACCESS_KEY", "k")
    monkeypatch.setenv("MINIO_SECRET_KEY", "s")
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"127.0.0.1:{port}.*unreachable"):
        open_store("s3://bucket/p").put_bytes("k", b"v")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_file_store_files_are_readable_as_the_umask_says(tmp_path, umask, mode):
    import subprocess
    import sys

    code = (f"import os; os.umask({umask}); from pneumonia_kfp.storage import FileStore;"
            f"s = FileStore({str(tmp_path)!r}); s.put_bytes('a/b.bin', b'x'); s.put_chunks('c.bin', [b'y']);"
            f"s.put_file('d.bin', {str(tmp_path / 'src')!r})")
    (tmp_path / "src").write_bytes(b"z")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a" / "b.bin", tmp_path / "c.bin", tmp_path / "d.bin")} \
        == {oct(mode)}


def test_streamed_writes_ranges_signatures_and_deletes(store):
    chunks = [bytes([i]) * 100_000 for i in range(50)]  # 5 MB in small chunks, never joined by the caller
    store.put_chunks("big/blob.bin", iter(chunks))
    assert store.get_bytes("big/blob.bin") == b"".join(chunks)
    assert store.get_range("big/blob.bin", 250_000, 10) == bytes([2]) * 10
    before = store.signatures("big")
    assert list(before) == ["big/blob.bin"] and before["big/blob.bin"][0] == 5_000_000
    store.put_bytes("big/blob.bin", b"rewritten")  # any rewrite changes the signature
    assert store.signatures("big")["big/blob.bin"] != before["big/blob.bin"]
    store.delete("big/blob.bin")
    assert not store.exists("big/blob.bin") and store.signatures("big") == {}


def test_put_new_has_exactly_one_winner_among_racing_writers(store):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [f"writer {i}".encode() for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda b: store.put_new("v/manifest.json", b), bodies))
    assert won.count(True) == 1  # S3's If-None-Match: * / a hard link: never a second winner
    assert store.get_bytes("v/manifest.json") == bodies[won.index(True)]  # the winner's bytes, untouched
    assert store.put_new("v/manifest.json", b"late") is False and store.get_bytes("v/manifest.json") == \
        bodies[won.index(True)]
    assert list(store.list()) == ["v/manifest.json"] and store.unfinished() == []  # nothing partial left


def test_modified_times_sha256_and_unfinished_uploads(store):
    before = time.time()
    store.put_bytes("d/a.bin", b"abc")
    times = store.modified("d")
    assert list(times) == ["d/a.bin"] and before - 2 <= times["d/a.bin"] <= time.time() + 2
    assert store.sha256("d/a.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert store.sha256("d/a.bin", chunk=2) == store.sha256("d/a.bin")  # read in ranges, the same
    if isinstance(store, FileStore):  # a writer killed mid-write leaves its .partial- file
        (store.root / "d" / ".partial-abc123").write_bytes(b"half")
        expected = "d/.partial-abc123"
    else:  # ... or an incomplete multipart upload
        store.client._create_multipart_upload(store.bucket, store._key("d/big.pack"), {})
        expected = "d/big.pack"
    [upload] = store.unfinished("d")
    assert upload.key == expected and upload.started <= time.time() + 2
    assert store.unfinished("elsewhere") == [] and list(store.list("d")) == ["d/a.bin"]
    store.discard(upload)
    assert store.unfinished() == [] and list(store.list("d")) == ["d/a.bin"]


def test_discard_refuses_a_finished_object(tmp_path):
    from pneumonia_kfp.storage import Unfinished

    store = FileStore(tmp_path)
    store.put_bytes("a.bin", b"x")
    with pytest.raises(StorageError, match="not an unfinished upload"):
        store.discard(Unfinished("a.bin", 0.0))
    assert store.exists("a.bin")


def test_a_full_file_system_is_one_line_naming_the_file_and_size(tmp_path, monkeypatch):
    import errno
    import os

    store = FileStore(tmp_path)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(StorageError) as e:
        store.put_bytes("v/raw/x.pack", b"y" * 5000)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "v" / "raw" / "x.pack") in message
    assert "no space left" in message and "5000 bytes" in message and "bytes free there" in message
    assert e.value.code == "NoSpace"
    with pytest.raises(StorageError, match="its size is not known in advance"):
        store.put_chunks("v/t.npy", iter([b"z" * 100]))
    with pytest.raises(StorageError, match="7 bytes"):
        store.put_new("v/manifest.json", b"1234567")
    monkeypatch.undo()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial file visible


def test_put_new_on_a_server_without_conditional_writes_falls_back_to_a_plain_put(s3_env, monkeypatch):
    from minio.error import S3Error

    store = open_store(f"s3://bucket-{uuid.uuid4().hex[:8]}/p")
    original = store.client._put_object

    def no_conditions(bucket, name, data, headers=None, query_params=None):
        if headers and "If-None-Match" in headers:
            raise S3Error(None, "NotImplemented", "A header you provided implies functionality that is not "
                          "implemented", name, "r", "h")
        return original(bucket, name, data, headers, query_params)

    monkeypatch.setattr(store.client, "_put_object", no_conditions)
    assert store.put_new("m.json", b"first") is True and store.get_bytes("m.json") == b"first"
    assert store.put_new("m.json", b"second") is True and store.get_bytes("m.json") == b"second"  # last one stands

    def refused(*a, **k):
        raise S3Error(None, "AccessDenied", "denied", "m.json", "r", "h")

    monkeypatch.setattr(store.client, "_put_object", refused)
    with pytest.raises(StorageError, match="AccessDenied"):
        store.put_new("m.json", b"third")


def test_a_file_removed_while_listing_is_left_out(tmp_path, monkeypatch):
    """Another writer discards its packs while a re-ingest lists the version: no FileNotFoundError."""
    from pneumonia_kfp import storage

    store = open_store(tmp_path.as_uri())
    store.put_bytes("v/raw/a.pack", b"a")
    store.put_bytes("v/raw/b.pack", b"b")
    real = os.scandir

    def racing(path):
        entries = list(real(path))
        if str(path).endswith("raw"):
            (Path(path) / "a.pack").unlink()  # gone after the directory was read, before its stat
        return iter(entries)

    monkeypatch.setattr(storage.os, "scandir", racing)
    assert list(store.signatures("v")) == ["v/raw/b.pack"]
