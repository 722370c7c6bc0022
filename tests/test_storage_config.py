"""The s3 backend's configuration (MINIO_SECURE, https://, MINIO_REGION, MINIO_RETRIES) and its
error mapping (AccessDenied and other non-404 errors are errors, never "missing"), over real HTTP.

A small S3 endpoint here answers with S3 error documents the way MinIO and AWS do and records
every request; the moto server (conftest) stands in for a working S3.
"""
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pneumonia_kfp import resume
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.runs import load_results
from pneumonia_kfp.storage import NotFound, StorageError, open_store
from tests.conftest import free_port

ERROR = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
         "<Resource>{path}</Resource><RequestId>1</RequestId></Error>")


class S3Endpoint(ThreadingHTTPServer):
    """Answers every request with ``status``/``code`` (an S3 error), or 200 when ``code`` is None."""

    def __init__(self, status=200, code=None, message="injected"):
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.daemon_threads = True
        self.status, self.code, self.message, self.requests = status, code, message, []
        self.only = None  # answer the error only to these methods (others: 200)
        self.by_method = {}  # method -> (status, code) instead

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        s = self.server
        s.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization", "")})
        status, code = s.by_method.get(self.command, (s.status, s.code))
        failing = code is not None and (s.only is None or self.command in s.only)
        body = ERROR.format(code=code, message=s.message, path=self.path).encode() if failing else b""
        if not failing and "location" in self.path:  # GetBucketLocation
            body = b'<LocationConstraint xmlns="http://s3.amazonaws.com/doc/2006-03-01/">us-east-1</LocationConstraint>'
        self.send_response(status if failing or status == 404 else 200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer


@pytest.fixture
def endpoint(monkeypatch):
    servers = []

    def start(status=200, code=None, message="injected", region="us-east-1", retries="0"):
        server = S3Endpoint(status, code, message)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        monkeypatch.setenv("MINIO_ENDPOINT", f"http://{server.address}")
        monkeypatch.setenv("MINIO_ACCESS_KEY", "k")
        monkeypatch.setenv("MINIO_SECRET_KEY", "s")
        monkeypatch.setenv("MINIO_RETRIES", retries)
        if region:
            monkeypatch.setenv("MINIO_REGION", region)
        else:
            monkeypatch.delenv("MINIO_REGION", raising=False)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize("code, status", [("AccessDenied", 403), ("InvalidAccessKeyId", 403),
                                          ("SignatureDoesNotMatch", 403), ("InvalidBucketName", 400)])
def test_non_404_errors_are_errors_naming_code_and_endpoint(endpoint, code, status):
    server = endpoint(status, code, message="Access Denied.")
    store = open_store("s3://bucket/prefix")
    with pytest.raises(StorageError) as e:
        store.get_bytes("manifest.json")
    assert e.value.code == code
    assert str(e.value) == (f"read s3://bucket/prefix/manifest.json: S3 error {code} (HTTP {status}) from "
                            f"http://{server.address}: Access Denied.")


def test_access_denied_on_exists_is_an_error_not_missing(endpoint):
    server = endpoint(403, "AccessDenied")
    with pytest.raises(StorageError, match="AccessDenied") as e:
        open_store("s3://bucket/prefix").exists("manifest.json")  # a HEAD: the status alone says it
    assert e.value.code == "AccessDenied"
    assert str(e.value).startswith(f"stat s3://bucket/prefix/manifest.json: S3 error AccessDenied (HTTP 403) from "
                                   f"http://{server.address}: ")


def test_errors_checking_or_creating_the_bucket_name_the_step(endpoint):
    server = endpoint(403, "AccessDenied", message="Access Denied.")
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/prefix").put_bytes("a", b"1")
    # a HEAD answer has no body: minio words the message itself
    assert str(e.value) == (f"check bucket bucket: S3 error AccessDenied (HTTP 403) from http://{server.address}: "
                            "Access denied")
    server.by_method = {"HEAD": (404, "NoSuchBucket"), "PUT": (403, "AccessDenied")}  # missing, and not ours to make
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/prefix").put_bytes("a", b"1")
    assert str(e.value) == (f"create bucket bucket: S3 error AccessDenied (HTTP 403) from http://{server.address}: "
                            "Access Denied.")
    assert [r["method"] for r in server.requests[-2:]] == ["HEAD", "PUT"] and server.requests[-1]["path"] == "/bucket"


@pytest.mark.parametrize("code", ["NoSuchKey", "NoSuchBucket", "ResourceNotFound", "NoSuchObject"])
def test_missing_object_or_bucket_is_missing(endpoint, code):
    """Every S3 "not found" code is storage.NotFound, the one test every reader makes (each reader tested its
    own subset of codes before)."""
    endpoint(404, code)
    store = open_store("s3://bucket/prefix")
    assert store.exists("manifest.json") is False
    with pytest.raises(NotFound, match=f"does not exist \\({code}\\)") as e:
        store.get_bytes("manifest.json")
    assert e.value.code == code
    assert resume.load(store) is None  # no saved state: train starts afresh
    with pytest.raises(DataError, match="no results for resnet18"):  # the evaluate step left none
        load_results("s3://bucket/prefix", ["resnet18"])


def test_resume_does_not_mistake_access_denied_for_no_state(endpoint):
    endpoint(403, "AccessDenied")
    with pytest.raises(StorageError, match="AccessDenied"):
        resume.load(open_store("s3://bucket/checkpoints/abc"))


def test_access_denied_through_the_cli_is_one_line(endpoint, image_folder, capsys):
    endpoint(403, "AccessDenied", message="Access Denied.")
    assert main(["ingest", "--data", str(image_folder), "--storage", "s3://bucket/p", "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("pneumonia-kfp ingest: error: ") and "S3 error AccessDenied" in err


@pytest.mark.parametrize("retries", ["0", "2"])
def test_server_errors_are_retried_up_to_minio_retries(endpoint, retries):
    server = endpoint(503, "SlowDown", retries=retries)
    with pytest.raises(StorageError, match=server.address):
        open_store("s3://bucket/prefix").get_bytes("k")
    assert len(server.requests) == 1 + int(retries)


@pytest.mark.parametrize("status, code, requests", [(500, "InternalError", 2), (502, "BadGateway", 2),
                                                   (504, "GatewayTimeout", 2), (501, "NotImplemented", 1),
                                                   (400, "BadRequest", 1)])
def test_only_transient_server_errors_are_retried(endpoint, status, code, requests):
    server = endpoint(status, code, retries="1")
    with pytest.raises(StorageError, match=server.address):
        open_store("s3://bucket/prefix").get_bytes("k")
    assert len(server.requests) == requests


def test_a_server_error_on_every_try_names_status_retries_and_code(endpoint):
    server = endpoint(500, "InternalError", retries="1")
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/prefix").get_bytes("k")
    assert str(e.value) == (f"read s3://bucket/prefix/k: S3 endpoint http://{server.address} answered HTTP 500 to "
                            "every try (1 retries): the server is failing, see its logs")
    assert e.value.code == "ServerError"


class _Plain(BaseHTTPRequestHandler):
    """Not S3: answers ``server.answer`` = (status, content type or None, body) to everything; with
    ``cut`` it promises 100 bytes, sends 10 and hangs up."""

    def log_message(self, *args):
        pass

    def _answer(self):
        status, content_type, body = self.server.answer
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", "100" if self.server.cut else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.server.cut:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    do_GET = do_PUT = do_HEAD = _answer


@pytest.fixture
def plain(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Plain)
    server.daemon_threads, server.cut = True, False
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    for k, v in {"MINIO_ENDPOINT": f"127.0.0.1:{server.server_address[1]}", "MINIO_REGION": "us-east-1",
                 "MINIO_RETRIES": "0", "MINIO_ACCESS_KEY": "k", "MINIO_SECRET_KEY": "s"}.items():
        monkeypatch.setenv(k, v)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("content_type, said", [("text/html", "text/html"), (None, "without a content type")])
def test_a_web_server_that_is_not_s3_is_named_not_s3(plain, content_type, said):
    plain.answer = (404, content_type, b"<html>Not Found</html>")
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/p").get_bytes("k")
    assert str(e.value) == (f"read s3://bucket/p/k: http://127.0.0.1:{plain.server_address[1]} is not an S3 server "
                            f"(it answered HTTP 404 {said}, not S3 XML). Check MINIO_ENDPOINT.")
    assert e.value.code == "NotS3"


def test_a_5xx_without_an_s3_error_document_is_a_server_error(plain):
    plain.answer = (507, None, b"")
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/p").exists("k")  # a HEAD: S3 sends no error document with it
    port = plain.server_address[1]
    assert str(e.value) == f"stat s3://bucket/p/k: S3 endpoint http://127.0.0.1:{port} answered HTTP 507"
    assert e.value.code == "ServerError"


def test_a_connection_cut_mid_object_names_the_read_and_the_cause(plain):
    plain.answer, plain.cut = (200, "application/octet-stream", b"0123456789"), True
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/p").get_bytes("k")
    assert str(e.value) == (f"read s3://bucket/p/k: S3 endpoint http://127.0.0.1:{plain.server_address[1]} is "
                            "unreachable (ProtocolError). Check MINIO_ENDPOINT and that the server is running.")


@pytest.mark.parametrize("value", ["false", "FALSE", "False"])
def test_a_bucket_marked_not_ours_is_never_checked_or_created(endpoint, monkeypatch, value):
    server = endpoint()
    monkeypatch.setenv("MINIO_CREATE_BUCKET", value)
    store = open_store("s3://kubeflows-bucket/p")
    store.put_bytes("a", b"1")
    store.put_bytes("b", b"2")
    assert [r["method"] for r in server.requests] == ["PUT", "PUT"]  # the two objects, no bucket HEAD or PUT
    assert all(r["path"].startswith("/kubeflows-bucket/p/") for r in server.requests)


def test_multipart_uploads_retry_their_posts(endpoint, tmp_path):
    """A file over minio's 5 MiB part size starts a multipart upload with a POST: retried like the rest."""
    server = endpoint(503, "SlowDown", retries="2")
    server.only = {"POST"}
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (6 * 1024 * 1024))
    with pytest.raises(StorageError, match=server.address):
        open_store("s3://bucket/prefix").put_file("big.bin", big)
    assert [r["method"] for r in server.requests] == ["HEAD", "POST", "POST", "POST"]


def test_region_signs_requests_without_asking_the_server(endpoint):
    server = endpoint(region="eu-central-1")
    store = open_store("s3://bucket/prefix")
    store.put_bytes("a", b"1")
    store.put_bytes("b", b"2")
    assert server.requests and all("/eu-central-1/s3/aws4_request" in r["auth"] for r in server.requests)
    assert not [r for r in server.requests if "location" in r["path"]]
    # the bucket is checked once per store, then every write goes straight to its object
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("HEAD", "/bucket"), ("PUT", "/bucket/prefix/a"), ("PUT", "/bucket/prefix/b")]


def test_without_a_region_the_client_asks_the_bucket_location(endpoint):
    server = endpoint(region=None)
    open_store("s3://bucket/prefix").put_bytes("a", b"1")
    assert any("location" in r["path"] for r in server.requests)


@pytest.mark.parametrize("endpoint_env, secure, scheme", [
    ("{addr}", "true", "https"), ("{addr}", "TRUE", "https"), ("{addr}", "false", "http"), ("{addr}", None, "http"),
    ("https://{addr}", "false", "https"), ("http://{addr}", "true", "http"),
])
def test_tls_from_minio_secure_or_the_scheme(s3_env, monkeypatch, endpoint_env, secure, scheme):
    """The moto server speaks plain HTTP: a client that chose TLS cannot talk to it."""
    monkeypatch.setenv("MINIO_ENDPOINT", endpoint_env.format(addr=s3_env))
    monkeypatch.setenv("MINIO_RETRIES", "0")
    if secure is None:
        monkeypatch.delenv("MINIO_SECURE", raising=False)
    else:
        monkeypatch.setenv("MINIO_SECURE", secure)
    store = open_store(f"s3://tls-{uuid.uuid4().hex[:8]}/p")
    if scheme == "http":
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"
    else:
        with pytest.raises(StorageError, match=f"S3 endpoint https://{s3_env} is unreachable"):
            store.put_bytes("k", b"v")


@pytest.mark.parametrize("value", ["http://", "https:///bucket"])
def test_an_endpoint_without_a_host_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("MINIO_ENDPOINT", value)
    with pytest.raises(StorageError, match="is not host:port or http\\(s\\)://host:port"):
        open_store("s3://bucket/x")


def test_unreachable_endpoint_message(monkeypatch):
    port = free_port()  # nothing listens
    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("MINIO_RETRIES", "0")
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/p").get_bytes("k")
    assert str(e.value) == (f"read s3://bucket/p/k: S3 endpoint http://127.0.0.1:{port} is unreachable "
                            "(NewConnectionError). Check MINIO_ENDPOINT and that the server is running.")
    assert e.value.code is None


def test_a_missing_local_file_is_named_not_blamed_on_the_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{free_port()}")  # nothing listens, and nothing is sent
    monkeypatch.setenv("MINIO_CREATE_BUCKET", "false")
    with pytest.raises(StorageError) as e:
        open_store("s3://bucket/p").put_file("k", tmp_path / "gone.bin")
    assert str(e.value) == f"write s3://bucket/p/k: No such file or directory: {tmp_path / 'gone.bin'}"


def test_default_endpoint_is_local_minio(monkeypatch):
    monkeypatch.delenv("MINIO_ENDPOINT", raising=False)
    monkeypatch.delenv("MINIO_SECURE", raising=False)
    monkeypatch.setenv("MINIO_RETRIES", "0")
    monkeypatch.setenv("MINIO_CONNECT_TIMEOUT", "0.5")
    store = open_store("s3://bucket/x")
    assert store.endpoint == "http://localhost:9000" and store.uri == "s3://bucket/x"
    with pytest.raises(StorageError, match="http://localhost:9000 is unreachable"):
        store.put_bytes("k", b"v")


@pytest.mark.parametrize("uri, kind, root", [("s3://bkt", "S3Store", "s3://bkt"), ("s3://bkt/", "S3Store", "s3://bkt"),
                                             ("s3://bkt/p/q/", "S3Store", "s3://bkt/p/q")])
def test_s3_uris(s3_env, uri, kind, root):
    store = open_store(uri)
    assert type(store).__name__ == kind and store.uri == root and store.uri_of("k") == f"{root}/k"


def test_file_store_missing_key_code_and_escape(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(StorageError, match="does not exist") as e:
        store.get_bytes("nope")
    assert e.value.code == "NoSuchKey"
    store.put_bytes("a/b", b"x")
    assert store.get_bytes("a/../a/b") == b"x"
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(StorageError, match="escapes the store"):
            store.get_bytes(bad)
    assert store.exists("") is False  # the root itself is no object
