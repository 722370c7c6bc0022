"""One small object-store interface with two backends.

* ``file:///abs/path`` -- a directory on local disk, the embedded default for local runs.
* ``s3://bucket/prefix`` -- any S3 server (MinIO, Kubeflow's own MinIO, AWS) through the
  ``minio`` client. Endpoint and credentials come from the environment:

  ``MINIO_ENDPOINT``    host:port or http(s)://host:port   (default ``localhost:9000``)
  ``MINIO_ACCESS_KEY``  access key
  ``MINIO_SECRET_KEY``  secret key
  ``MINIO_SECURE``      ``true`` for TLS when the endpoint has no scheme (default ``false``)
  ``MINIO_REGION``      optional region
  ``MINIO_CREATE_BUCKET`` ``false``: never check for or create the bucket (multi-user Kubeflow's keys may
                        only write under their prefix; the bucket is Kubeflow's). Default ``true``.

Keys are ``/``-separated and relative to the store's root. Every write is atomic for readers:
an object appears whole or not at all, so a manifest written last marks a complete dataset.
``put_new`` writes an object only where none exists (S3's conditional ``If-None-Match: *``; a hard
link, which never replaces, on a file store), so of writers racing to publish one name, exactly one
wins. Files a file store writes are readable as the umask says (0644 with the usual 022), like any
other tool's. A full file system is a one-line StorageError naming the file and the bytes needed,
and leaves no partial file behind.

Uploads a killed writer leaves (``.partial-*`` files, incomplete multipart uploads) are listed by
``unfinished`` and removed by ``discard``: that is ``pneumonia-kfp gc``'s job, never a writer's.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

from pneumonia_kfp.errors import PneumoniaKfpError


class StorageError(PneumoniaKfpError):
    """A store could not be opened or answered with an error; the message says which store."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class NotFound(StorageError):
    """The object, or its bucket, does not exist: the one "not found" every reader tests for."""


@dataclass(frozen=True)
class Unfinished:
    """An upload a writer began and never finished: a ``.partial-*`` file or an incomplete multipart upload."""

    key: str  # the object it was to become (a file store: the partial file itself)
    started: float  # Unix time
    upload_id: str | None = None  # S3's multipart upload id


_NOT_FOUND = ("NoSuchKey", "NoSuchBucket", "ResourceNotFound", "NoSuchObject")
# the environment variables the s3 backend reads (a cluster compile sets them from the Secret)
ENDPOINT_ENV, ACCESS_KEY_ENV, SECRET_KEY_ENV = "MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"
CREATE_BUCKET_ENV = "MINIO_CREATE_BUCKET"


class Store:
    """Base class: the operations every step uses."""

    uri: str

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self.get_bytes(key))

    def put_chunks(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> None:
        """Write an object from a stream of byte chunks, never holding it whole in memory. ``size``: its
        length where the caller knows it (a full disk's message then says how much was needed)."""
        raise NotImplementedError

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object has that name: True if this call created it, False if one
        existed (it is left as it was). Atomic against any number of writers."""
        raise NotImplementedError

    def modified(self, prefix: str = "") -> dict[str, float]:
        """{key: last-modified Unix time} of the objects under ``prefix``."""
        raise NotImplementedError

    def unfinished(self, prefix: str = "") -> list[Unfinished]:
        """Uploads begun under ``prefix`` and never finished (a killed writer's, or one in flight)."""
        raise NotImplementedError

    def discard(self, upload: Unfinished) -> None:
        """Remove an unfinished upload."""
        raise NotImplementedError

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of an object from ``offset``."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def sha256(self, key: str, chunk: int = 64 * 1024 * 1024) -> str:
        """sha256 of a stored object, read a range at a time (packs and tensors can be large)."""
        digest, offset = hashlib.sha256(), 0
        while True:
            data = self.get_range(key, offset, chunk)
            digest.update(data)
            offset += len(data)
            if len(data) < chunk:
                return digest.hexdigest()

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (recursive), relative to the store root."""
        raise NotImplementedError

    def signatures(self, prefix: str = "") -> dict[str, list]:
        """{key: signature} under ``prefix``: a cheap fingerprint of each object as stored (size,
        times and inode of a file; size and ETag of an S3 object) that changes whenever it is
        rewritten, so a checksum verified once need not be recomputed while it stays the same."""
        raise NotImplementedError

    def child(self, prefix: str) -> "Store":
        return open_store(self.uri_of(prefix))

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key.strip('/')}" if key else self.uri


class FileStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        # normpath, not resolve(): keys are ours (no symlinks to follow), and resolve() costs an lstat per part
        path = os.path.normpath(os.path.join(self.root, key))
        if path != str(self.root) and not path.startswith(str(self.root).rstrip(os.sep) + os.sep):
            raise StorageError(f"key {key!r} escapes the store {self.uri}")
        return Path(path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.uri_of(key)} does not exist", "NoSuchKey") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data), len(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f), os.fstat(src.fileno()).st_size)

    def put_chunks(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> None:
        self._atomic_write(key, lambda f: [f.write(c) for c in chunks], size)

    def put_new(self, key: str, data: bytes) -> bool:
        return self._atomic_write(key, lambda f: f.write(data), len(data), replace=False)

    def _atomic_write(self, key: str, write, size: int | None = None, replace: bool = True) -> bool:
        """Write to a ``.partial-*`` file beside the target, then rename it into place (``replace``) or
        hard-link it there, which fails where the name exists (returns False)."""
        target = self._path(key)
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
            with os.fdopen(fd, "wb") as f:
                write(f)
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a store is shared
            if replace:
                os.replace(tmp, target)
                tmp = None
                return True
            try:
                os.link(tmp, target)  # never replaces: of racing writers, one wins
            except FileExistsError:
                return False
            return True
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            full = e
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        raise self._full(target, size, full) from None  # after the partial file is gone: the space it took is free

    def _full(self, target: Path, size: int | None, e: OSError) -> StorageError:
        """One line for a full file system (or quota): the file, what it needed, what is free."""
        free = None
        for d in (target.parent, *target.parents):
            try:
                st = os.statvfs(d)
                free = st.f_bavail * st.f_frsize
                break
            except OSError:
                continue
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        need = f"{size} bytes" if size is not None else "its size is not known in advance"
        have = f", {free} bytes free there" if free is not None else ""
        return StorageError(f"writing {target}: {what} (it needs {need}{have}); free space there or use another "
                            "--storage. Nothing partial was left.", "NoSpace")

    def modified(self, prefix: str = "") -> dict[str, float]:
        return {k: sig[1] / 1e9 for k, sig in self.signatures(prefix).items()}

    def unfinished(self, prefix: str = "") -> list[Unfinished]:
        base = self._path(prefix) if prefix else self.root
        found = []
        for p in base.rglob(".partial-*") if base.is_dir() else ():
            try:
                found.append(Unfinished(p.relative_to(self.root).as_posix(), p.lstat().st_mtime))
            except FileNotFoundError:
                continue  # finished (renamed) since the listing
        return sorted(found, key=lambda u: u.key)

    def discard(self, upload: Unfinished) -> None:
        if not Path(upload.key).name.startswith(".partial-"):
            raise StorageError(f"{self.uri_of(upload.key)} is not an unfinished upload")
        self._path(upload.key).unlink(missing_ok=True)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise NotFound(f"{self.uri_of(key)} does not exist", "NoSuchKey") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise NotFound(f"{self.uri_of(key)} does not exist", "NoSuchKey") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith(".partial-"):
                yield p.relative_to(self.root).as_posix()

    def signatures(self, prefix: str = "") -> dict[str, list]:
        found, dirs = {}, [prefix.strip("/")]
        while dirs:  # scandir, not rglob: one stat per object (re-ingest lists every raw file)
            rel = dirs.pop()
            try:
                entries = list(os.scandir(self._path(rel) if rel else self.root))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                key = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    dirs.append(key)
                elif not e.name.startswith(".partial-"):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the listing (another writer's discarded pack, gc)
                    if stat.S_ISREG(st.st_mode):
                        found[key] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        return found


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, client=None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client, self.endpoint = client or minio_client_from_env()
        self._bucket_checked = False
        self._lock = threading.Lock()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key.strip("/")

    def _call(self, what: str, fn, *args, **kwargs):
        from minio.error import InvalidResponseError, S3Error, ServerError
        from urllib3.exceptions import HTTPError, MaxRetryError, ResponseError

        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            if e.code in _NOT_FOUND:
                raise NotFound(f"{what}: does not exist ({e.code})", e.code) from None
            status = getattr(e.response, "status", None)
            raise StorageError(f"{what}: S3 error {e.code} (HTTP {status}) from {self.endpoint}: {e.message}",
                               e.code) from None
        except ServerError as e:
            raise StorageError(f"{what}: S3 endpoint {self.endpoint} answered HTTP {e.status_code}", "ServerError") \
                from None
        except InvalidResponseError as e:
            raise StorageError(
                f"{what}: {self.endpoint} is not an S3 server (it answered HTTP {e._code} "
                f"{e._content_type or 'without a content type'}, not S3 XML). Check MINIO_ENDPOINT.", "NotS3",
            ) from None
        except MaxRetryError as e:
            if isinstance(e.reason, ResponseError):  # the server answered, with errors, every time
                status = re.search(r"\d{3}", str(e.reason))
                raise StorageError(
                    f"{what}: S3 endpoint {self.endpoint} answered HTTP {status.group() if status else 'errors'} "
                    f"to every try ({_retries()} retries): the server is failing, see its logs", "ServerError",
                ) from None
            raise self._unreachable(what, e.reason or e) from None
        except (HTTPError, OSError) as e:
            if getattr(e, "filename", None):  # a local file (put_file's source), not the connection
                raise StorageError(f"{what}: {e.strerror}: {e.filename}") from None
            raise self._unreachable(what, e) from None
        except ValueError as e:  # the client refuses a name before sending anything
            raise StorageError(f"{what}: {e}") from None

    def _unreachable(self, what: str, e: BaseException) -> StorageError:
        return StorageError(f"{what}: S3 endpoint {self.endpoint} is unreachable ({type(e).__name__}). "
                            "Check MINIO_ENDPOINT and that the server is running.")

    def _ensure_bucket(self) -> None:
        with self._lock:
            if self._bucket_checked:
                return
            if os.environ.get(CREATE_BUCKET_ENV, "true").lower() == "false":  # not ours: never touch it
                self._bucket_checked = True
                return
            if not self._call(f"check bucket {self.bucket}", self.client.bucket_exists, self.bucket):
                self._call(f"create bucket {self.bucket}", self.client.make_bucket, self.bucket)
            self._bucket_checked = True

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {self.uri_of(key)}", self.client.stat_object, self.bucket, self._key(key))
            return True
        except NotFound:
            return False

    def get_bytes(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._read(key, offset=offset, length=length)

    def _read(self, key: str, **window) -> bytes:
        def fetch():
            resp = self.client.get_object(self.bucket, self._key(key), **window)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"read {self.uri_of(key)}", fetch)

    def delete(self, key: str) -> None:
        self._call(f"delete {self.uri_of(key)}", self.client.remove_object, self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        self._call(
            f"write {self.uri_of(key)}", self.client.put_object,
            self.bucket, self._key(key), io.BytesIO(data), len(data),
        )

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self._ensure_bucket()
        self._call(f"write {self.uri_of(key)}", self.client.fput_object, self.bucket, self._key(key), str(path))

    def put_new(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): S3 answers 412 where the key exists. minio's put_object
        turns extra headers into user metadata, so this goes through its PutObject request itself."""
        self._ensure_bucket()
        try:
            self._call(f"write {self.uri_of(key)}", self.client._put_object, self.bucket, self._key(key), data,
                       headers={"If-None-Match": "*", "Content-Type": "application/octet-stream"})
        except StorageError as e:
            if e.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if e.code != "NotImplemented":
                raise
            # a server without conditional writes: the last complete manifest stands, which is still
            # complete, as no writer deletes what another may reference
            self.put_bytes(key, data)
        return True

    def modified(self, prefix: str = "") -> dict[str, float]:
        return self._by_name(prefix, lambda o: o.last_modified.timestamp())

    def unfinished(self, prefix: str = "") -> list[Unfinished]:
        """Incomplete multipart uploads (ListMultipartUploads, a page at a time)."""
        base, strip = self._key(prefix), len(self.prefix) + 1 if self.prefix else 0
        found, marker, id_marker = [], None, None
        while True:
            try:
                page = self._call(f"list unfinished uploads under {self.uri_of(prefix)}",
                                  self.client._list_multipart_uploads, self.bucket, prefix=base + "/" if base else "",
                                  key_marker=marker, upload_id_marker=id_marker)
            except NotFound:
                return []
            found += [Unfinished(u.object_name[strip:], u.initiated_time.timestamp(), u.upload_id)
                      for u in page.uploads]
            if not page.is_truncated or not page.uploads:
                return found
            marker, id_marker = page.uploads[-1].object_name, page.uploads[-1].upload_id

    def discard(self, upload: Unfinished) -> None:
        self._call(f"abort the upload of {self.uri_of(upload.key)}", self.client._abort_multipart_upload,
                   self.bucket, self._key(upload.key), upload.upload_id)

    def put_chunks(self, key: str, chunks: Iterable[bytes], size: int | None = None) -> None:
        self._ensure_bucket()
        self._call(f"write {self.uri_of(key)}", self.client.put_object, self.bucket, self._key(key),
                   _ChunkReader(chunks), -1, part_size=16 * 1024 * 1024)  # multipart, one part in memory

    def _objects(self, prefix: str) -> list:
        base = self._key(prefix)
        return self._call(
            f"list {self.uri_of(prefix)}",
            lambda: list(self.client.list_objects(self.bucket, prefix=base + "/" if base else "", recursive=True)),
        )

    def list(self, prefix: str = "") -> Iterator[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        for o in sorted(self._objects(prefix), key=lambda o: o.object_name):
            yield o.object_name[strip:]

    def signatures(self, prefix: str = "") -> dict[str, list]:
        return self._by_name(prefix, lambda o: [o.size, o.etag])

    def _by_name(self, prefix: str, value) -> dict:
        """{name: value(object)} of the objects under ``prefix``; empty when the bucket or prefix is missing."""
        try:
            objs = self._objects(prefix)
        except NotFound:
            return {}
        strip = len(self.prefix) + 1 if self.prefix else 0
        return {o.object_name[strip:]: value(o) for o in objs}


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterable of byte chunks (for minio's streamed multipart upload)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks, self._buf = iter(chunks), bytearray()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        if size < 0:
            size = len(self._buf)
        out = bytes(self._buf[:size])
        del self._buf[:size]  # cheap at the front of a bytearray
        return out


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _retries() -> int:
    return int(os.environ.get("MINIO_RETRIES", "4"))


def storage_root(dataset_uri: str) -> str:
    """The store a dataset version (``<storage>/datasets/<sha>``) lives in: checkpoints, runs and jobs go
    beside it."""
    return dataset_uri.rsplit("/datasets/", 1)[0]


def parse_endpoint(raw: str) -> tuple[str, bool]:
    """(host:port, TLS?) of MINIO_ENDPOINT's forms: host:port (TLS with MINIO_SECURE=true) or
    http(s)://host:port."""
    parsed = urlparse(raw if "://" in raw else f"//{raw}")
    if not parsed.netloc:
        raise StorageError(f"MINIO_ENDPOINT={raw!r} is not host:port or http(s)://host:port")
    secure = parsed.scheme == "https" if parsed.scheme else os.environ.get("MINIO_SECURE", "false").lower() == "true"
    return parsed.netloc, secure


def minio_client_from_env():
    """A minio client from MINIO_* variables, with bounded retries and short connect timeouts."""
    import urllib3
    from minio import Minio

    endpoint, secure = parse_endpoint(os.environ.get(ENDPOINT_ENV, "localhost:9000"))
    retries = urllib3.Retry(
        total=_retries(),
        connect=2,
        backoff_factor=0.2,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=None,  # S3 writes of whole objects are idempotent: retry them too
    )
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=float(os.environ.get("MINIO_CONNECT_TIMEOUT", "3")), read=120),
        retries=retries,
        maxsize=16,
    )
    client = Minio(
        endpoint,
        access_key=os.environ.get(ACCESS_KEY_ENV),
        secret_key=os.environ.get(SECRET_KEY_ENV),
        secure=secure,
        region=os.environ.get("MINIO_REGION") or None,
        http_client=http,
    )
    return client, f"{'https' if secure else 'http'}://{endpoint}"


def check_uri(uri: str, what: str = "storage") -> str:
    """``uri`` if it names a store this module can open (no I/O), else a StorageError saying why."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and not parsed.netloc:
        raise StorageError(f"{what} URI {uri!r} names no bucket: use s3://bucket/prefix")
    if parsed.scheme == "s3":
        from minio.helpers import check_bucket_name

        try:
            check_bucket_name(parsed.netloc, s3_check=True)
        except ValueError as e:
            raise StorageError(f"{what} URI {uri!r}: {e} (S3 bucket names are 3-63 lowercase letters, digits, "
                               "dots and hyphens)") from None
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise StorageError(f"{what} URI {uri!r} names the host {parsed.netloc!r}, which a file URI cannot "
                           f"reach: use file:///abs/path (three slashes) for a local directory")
    if parsed.scheme not in ("s3", "file", ""):
        raise StorageError(f"{what} URI {uri!r}: scheme {parsed.scheme}:// is not supported; "
                           "use file:///abs/path or s3://bucket/prefix")
    return uri


def open_store(uri: str) -> Store:
    """``file:///abs/path``, a plain absolute/relative path, or ``s3://bucket/prefix``."""
    parsed = urlparse(check_uri(uri))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return FileStore(parsed.path)
    return FileStore(uri)
