"""pneumonia-kfp serve: the real KServe model server in a subprocess on 127.0.0.1, answering the Open
Inference Protocol v2 (BYTES, and UINT8 in JSON and the binary extension) and KServe v1 with predict's
probabilities; hostile requests get a 4xx with a reason and the server carries on; /metrics."""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pneumonia_kfp.export import CHECKPOINT, export_model
from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.predict import predict_paths
from pneumonia_kfp.training import train
from pneumonia_kfp.validation import load_image
from tests.conftest import free_port
from tests.hostile import png_header

NAME = "xray"
LIMIT_MB = 1


@pytest.fixture(scope="module")
def model(dataset, tmp_path_factory) -> Path:
    """A 32 px resnet18 trained under the youden rule (its threshold is not 0.5), exported."""
    out = tmp_path_factory.mktemp("model")
    train(dataset["uri"], "resnet18", str(out / CHECKPOINT), epochs=2, batch_size=16, seed=0, threshold_rule="youden")
    export_model(out)
    return out


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """``pneumonia-kfp serve`` on a free port; its base URL once /v2/health/ready answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("pneumonia-kfp")), "serve", "--model", str(model),
                                 "--port", str(port), "--name", NAME, "--max-request-mb", str(LIMIT_MB)],
                                stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _get(url, "/v2/health/ready")[0] != 200:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"serve not ready in 120 s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
        assert proc.poll() is None, "the server died during the tests"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def files(image_folder) -> list[Path]:
    return sorted((image_folder / "test").glob("*/*.jpeg"))


def _request(url: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one request; an HTTP error status is an answer too."""
    request = urllib.request.Request(url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except OSError:  # not listening yet
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _get(url, path):
    return _request(url, path)


def _post(url, path, doc) -> tuple:
    return _request(url, path, json.dumps(doc).encode(), {"Content-Type": "application/json"})


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _v2_bytes(files) -> dict:
    return {"inputs": [{"name": "image_files", "datatype": "BYTES", "shape": [len(files)],
                        "data": [_b64(f) for f in files]}]}


def _outputs(doc) -> dict:
    return {o["name"]: o for o in doc["outputs"]}


def test_every_protocol_gives_predicts_probabilities_labels_and_threshold(server, model, files):
    """v2 BYTES (base64 in JSON), v2 UINT8 (JSON and the binary extension) and v1 base64 all give predict's
    answers for the same files."""
    expected = predict_paths(model, [str(f) for f in files])
    want_p = [r["probability"] for r in expected.rows]
    want_labels = [r["label"] for r in expected.rows]
    assert expected.failed == [] and len(set(want_labels)) == 2, "the check needs both labels"
    about = {"threshold": expected.threshold, "threshold_rule": "youden", "model_id": expected.model.model_id}

    status, doc = _post(server, f"/v2/models/{NAME}/infer", _v2_bytes(files))
    assert status == 200, doc
    out = _outputs(doc)
    assert out["probability"]["shape"] == [len(files)] and out["probability"]["datatype"] == "FP32"
    assert out["probability"]["data"] == pytest.approx(want_p, abs=1e-6)
    assert out["label"]["data"] == want_labels and doc["parameters"] == about and doc["model_name"] == NAME

    pixels = np.stack([load_image(f, 32) for f in files])[:, None]
    status, doc = _post(server, f"/v2/models/{NAME}/infer", {"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}]})
    assert status == 200, doc
    assert _outputs(doc)["probability"]["data"] == pytest.approx(want_p, abs=1e-6)

    # the binary extension: the JSON header, then the tensor's raw bytes
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()
    binary = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    status, doc = _request(server, f"/v2/models/{NAME}/infer", head + pixels.tobytes(), binary)
    assert status == 200, doc
    assert _outputs(doc)["probability"]["data"] == pytest.approx(want_p, abs=1e-6)

    status, doc = _post(server, f"/v1/models/{NAME}:predict",
                        {"instances": [{"b64": _b64(f)} if k % 2 else {"image_bytes": {"b64": _b64(f)}}
                                       for k, f in enumerate(files)]})
    assert status == 200, doc
    assert [p["probability"] for p in doc["predictions"]] == pytest.approx(want_p, abs=1e-6)
    assert [p["label"] for p in doc["predictions"]] == want_labels
    assert {k: doc[k] for k in about} == about


def test_health_metadata_and_metrics(server, files):
    assert _get(server, "/v2/health/live") == (200, {"live": True})
    assert _get(server, "/v2/health/ready") == (200, {"ready": True})
    assert _get(server, f"/v2/models/{NAME}/ready")[0] == 200
    status, meta = _get(server, f"/v2/models/{NAME}")
    assert status == 200 and meta["name"] == NAME
    assert {(i["name"], i["datatype"], tuple(i["shape"])) for i in meta["inputs"]} == \
        {("images", "UINT8", (-1, 1, 32, 32)), ("image_files", "BYTES", (-1,))}
    assert [o["name"] for o in meta["outputs"]] == ["probability", "label"]
    assert _get(server, "/v2/models/nope")[0] == 404

    def predictions_counted() -> float:
        status, text = _get(server, "/metrics")
        assert status == 200
        line = [s for s in text.splitlines() if s.startswith(f'request_predict_seconds_count{{model_name="{NAME}"}}')]
        return float(line[0].split()[-1]) if line else 0.0

    before = predictions_counted()
    assert _post(server, f"/v2/models/{NAME}/infer", _v2_bytes(files[:1]))[0] == 200
    assert predictions_counted() == before + 1


def _hostile(files) -> dict:
    """name: (path, body bytes, content type, status, words the reason holds)."""
    v2, v1, json_type = f"/v2/models/{NAME}/infer", f"/v1/models/{NAME}:predict", "application/json"
    image = _b64(files[0])

    def v2_doc(datatype, shape, data):
        return json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}).encode()

    return {
        "not an image": (v2, v2_doc("BYTES", [1], [base64.b64encode(b"hello, not a picture").decode()]), json_type,
                         400, "not an image"),
        "bomb header": (v2, v2_doc("BYTES", [1], [base64.b64encode(png_header(30000, 30000)).decode()]), json_type,
                        400, "too large: 30000x30000"),
        "not base64": (v2, v2_doc("BYTES", [1], ["%%%"]), json_type, 400, "not base64"),
        "wrong shape": (v2, v2_doc("UINT8", [1, 1, 16, 16], [0] * 256), json_type, 400, "[N, 1, 32, 32]"),
        "shape and data disagree": (v2, v2_doc("UINT8", [1, 1, 32, 32], [0] * 10), json_type, 400, "do not make"),
        "out of uint8": (v2, v2_doc("UINT8", [1, 1, 32, 32], [300] * 1024), json_type, 400, "do not make"),
        "wrong dtype": (v2, v2_doc("FP32", [1, 1, 32, 32], [0.5] * 1024), json_type, 400, "datatype FP32"),
        "too many images": (v2, v2_doc("BYTES", [65], [image] * 65), json_type, 400, "1 to 64 images"),
        "two inputs": (v2, json.dumps({"inputs": [json.loads(v2_doc("BYTES", [1], [image]))["inputs"][0]] * 2})
                       .encode(), json_type, 400, "2 inputs"),
        "over the limit": (v2, v2_doc("BYTES", [1], ["A" * (LIMIT_MB * 2**20)]), json_type, 413, "over 1 MiB"),
        "malformed JSON v2": (v2, b'{"inputs": [', json_type, 422, "json"),
        "malformed JSON v1": (v1, b'{"instances": [', json_type, 400, "unrecognized request format"),
        "v1 without instances": (v1, b'{"images": []}', json_type, 400, "instances"),
        "v1 not an image": (v1, json.dumps({"instances": [{"b64": base64.b64encode(b"GIF89a...").decode()}]}).encode(),
                            json_type, 400, "instances[0]"),
    }


CASES = list(_hostile([Path(__file__)]))  # the names only


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_request_gets_a_4xx_with_its_reason_and_the_server_carries_on(server, files, case):
    path, body, kind, want, words = _hostile(files)[case]
    status, doc = _request(server, path, body, {"Content-Type": kind})
    assert status == want, doc
    reason = json.dumps(doc).lower()
    assert words.lower() in reason, reason
    status, doc = _post(server, f"/v2/models/{NAME}/infer", _v2_bytes(files[:2]))
    assert status == 200 and len(_outputs(doc)["probability"]["data"]) == 2, doc


def test_a_chunked_body_over_the_limit_is_refused_too(server):
    """No Content-Length: the limit is counted as the body streams in."""
    def chunks():
        for _ in range(LIMIT_MB * 4):
            yield b"x" * 2**18
        yield b"x"
    request = urllib.request.Request(server + f"/v2/models/{NAME}/infer", data=chunks(), method="POST",
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 413 and b"over 1 MiB" in e.value.read()
    assert _get(server, "/v2/health/ready") == (200, {"ready": True})


def test_a_client_waiting_for_100_continue_gets_the_413_without_sending_the_body(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {10 * LIMIT_MB * 2**20}\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    assert answer.startswith("HTTP/1.1 413") and "over 1 MiB" in answer, answer
    assert _get(server, "/v2/health/ready") == (200, {"ready": True})


def test_a_busy_port_or_a_missing_model_is_one_line(model, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(model), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pneumonia-kfp serve: error: --port {port}: cannot listen there") and "\n" not in err
    assert main(["serve", "--model", str(tmp_path / "gone"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and str(tmp_path / "gone") in err and "\n" not in err
    assert os.path.isdir(model)
