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
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from pneumonia_kfp.errors import PneumoniaKfpError


class StorageError(PneumoniaKfpError):
    """A store could not be opened or answered with an error; the message says which store."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


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

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (recursive), relative to the store root."""
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
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the store {self.uri}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri_of(key)} does not exist", "NoSuchKey") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f))

    def _atomic_write(self, key: str, write) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), path)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith(".partial-"):
                yield p.relative_to(self.root).as_posix()


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
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            if e.code in _NOT_FOUND:
                raise StorageError(f"{what}: does not exist ({e.code})", e.code) from None
            raise StorageError(f"{what}: S3 error {e.code} from {self.endpoint}: {e.message}", e.code) from None
        except (HTTPError, OSError) as e:
            raise StorageError(
                f"{what}: S3 endpoint {self.endpoint} is unreachable ({type(e).__name__}). "
                "Check MINIO_ENDPOINT and that the server is running."
            ) from None

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
        except StorageError as e:
            if e.code in _NOT_FOUND:
                return False
            raise

    def get_bytes(self, key: str) -> bytes:
        def fetch():
            resp = self.client.get_object(self.bucket, self._key(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"read {self.uri_of(key)}", fetch)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        self._call(
            f"write {self.uri_of(key)}", self.client.put_object,
            self.bucket, self._key(key), io.BytesIO(data), len(data),
        )

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self._ensure_bucket()
        self._call(f"write {self.uri_of(key)}", self.client.fput_object, self.bucket, self._key(key), str(path))

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._key(prefix)
        objs = self._call(
            f"list {self.uri_of(prefix)}",
            lambda: list(self.client.list_objects(self.bucket, prefix=base + "/" if base else "", recursive=True)),
        )
        strip = len(self.prefix) + 1 if self.prefix else 0
        for o in sorted(objs, key=lambda o: o.object_name):
            yield o.object_name[strip:]


def minio_client_from_env():
    """A minio client from MINIO_* variables, with bounded retries and short connect timeouts."""
    import urllib3
    from minio import Minio

    raw = os.environ.get(ENDPOINT_ENV, "localhost:9000")
    parsed = urlparse(raw if "://" in raw else f"//{raw}")
    secure = parsed.scheme == "https" if parsed.scheme else os.environ.get("MINIO_SECURE", "false").lower() == "true"
    endpoint = parsed.netloc
    if not endpoint:
        raise StorageError(f"MINIO_ENDPOINT={raw!r} is not host:port or http(s)://host:port")
    retries = urllib3.Retry(
        total=int(os.environ.get("MINIO_RETRIES", "4")),
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


def open_store(uri: str) -> Store:
    """``file:///abs/path``, a plain absolute/relative path, or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r} names no bucket: use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return FileStore(parsed.path)
    if parsed.scheme == "":
        return FileStore(uri)
    raise StorageError(f"storage URI {uri!r}: use file:///abs/path or s3://bucket/prefix")
