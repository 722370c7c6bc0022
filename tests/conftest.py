import shutil
import socket
import time
import uuid

import pytest

from pneumonia_kfp import image_reader
from pneumonia_kfp.source_index import RACY_NS
from pneumonia_kfp.synthetic import make_synthetic

pytest_plugins = ["tests.pushgateway"]  # its `pushgateway` fixture, for every test module



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on 127.0.0.1: the minio client talks HTTP + SigV4 to it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """MINIO_* variables pointing at the test S3 server (subprocesses inherit them)."""
    monkeypatch.setenv("MINIO_ENDPOINT", f"http://{s3_server}")
    monkeypatch.setenv("MINIO_ACCESS_KEY", "test-access-key")
    monkeypatch.setenv("MINIO_SECRET_KEY", "test-secret-key")
    monkeypatch.setenv("MINIO_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A small synthetic Kermany-style ImageFolder with train and test (no val)."""
    return make_synthetic(tmp_path_factory.mktemp("xray"), {"train": 40, "test": 12}, size=48)


@pytest.fixture
def data(image_folder, tmp_path):
    """A private copy of the image folder, older than the racy window (its stats can be trusted)."""
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    time.sleep(RACY_NS / 1e9)
    return root


@pytest.fixture
def reads(monkeypatch):
    """The paths the image reader opens (in-process reads: fewer files than need worker processes)."""
    opened = []
    original = image_reader._Reader.read

    def counting(self, i, path):
        opened.append(path)
        return original(self, i, path)

    monkeypatch.setattr(image_reader._Reader, "read", counting)
    return opened


@pytest.fixture(scope="module")
def dataset(image_folder, tmp_path_factory):
    """The image folder ingested at 32 px into a store of the module's own."""
    from pneumonia_kfp.ingest import ingest

    return ingest(str(image_folder), tmp_path_factory.mktemp("store").as_uri(), image_size=32)


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    """A fresh store URI, once on the file store and once on the test S3 server."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    request.getfixturevalue("s3_env")
    return f"s3://store-{uuid.uuid4().hex[:8]}/p"
