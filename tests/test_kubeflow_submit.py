"""`pneumonia-kfp submit` against a local HTTP server speaking the KFP v2beta1 REST API."""
import builtins
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from pneumonia_kfp.pipelines.cli import main
from tests.conftest import free_port

TOKEN = "t0ken-for-tests"
S3 = ["--param", "data=s3://bucket/chest_xray", "--param", "storage=s3://bucket/pneumonia"]
PRINT = builtins.print  # collection runs before any test: still Python's own


@pytest.fixture(autouse=True)
def clean_process_state(monkeypatch):
    """A `submit` process starts clean; in this test process an earlier kfp local run can leave
    builtins.print indented and a root log handler on a closed capture stream (kfp's local runner
    patches both per task, and its ParallelFor threads restore them out of order)."""
    monkeypatch.setattr(builtins, "print", PRINT)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


class FakeKFP(ThreadingHTTPServer):
    """Just enough of the KFP API server: healthz, experiments (list, create), runs (create, get).

    ``token``: the bearer token it accepts (None: any request). ``states``: what successive
    GET /runs/{id} report. ``fail``: "METHOD /path" -> (status, body) to answer instead.
    """

    def __init__(self):
        super().__init__(("127.0.0.1", free_port()), Handler)
        self.requests, self.token, self.fail = [], None, {}
        self.experiments, self.states = [], ["SUCCEEDED"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, method: str, path: str, query: dict, body):
        if f"{method} {path}" in self.fail:
            return self.fail[f"{method} {path}"]
        if path == "/apis/v2beta1/healthz":
            return 200, {"multi_user": False}
        if (method, path) == ("GET", "/apis/v2beta1/experiments"):
            wanted = json.loads(query["filter"][0])["predicates"][0]["stringValue"]
            found = [e for e in self.experiments if e["display_name"] == wanted]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", "/apis/v2beta1/experiments"):
            experiment = {**body, "experiment_id": f"exp-{len(self.experiments) + 1}"}
            self.experiments.append(experiment)
            return 200, experiment
        if (method, path) == ("POST", "/apis/v2beta1/runs"):
            return 200, {**body, "run_id": "run-1", "state": "PENDING"}
        if (method, path) == ("GET", "/apis/v2beta1/runs/run-1"):
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return 200, {"run_id": "run-1", "state": state}
        return 404, {"error": f"no route {method} {path}", "code": 5}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _serve(self):
        url = urlparse(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        self.server.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                     "auth": self.headers.get("Authorization"), "body": body})
        if self.server.token and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            status, answer = 401, {"error": "Unauthorized", "code": 16}
        else:
            status, answer = self.server.answer(self.command, url.path, parse_qs(url.query), body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "/dex/auth")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve


@pytest.fixture
def kfp_api():
    server = FakeKFP()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def submit(kfp_api, *args):
    return main(["submit", "--host", kfp_api.url, "--poll-seconds", "0.05", *args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_submit_creates_experiment_and_run_and_waits(kfp_api, capsys):
    kfp_api.token = TOKEN
    kfp_api.states = ["RUNNING", "RUNNING", "SUCCEEDED"]
    rc = submit(kfp_api, "--token", TOKEN, "--experiment", "xray", "--run-name", "nightly", *S3,
                "--param", "backbones=resnet18,densenet121", "--param", "epochs=3", "--param", "learning_rate=0.01",
                "--param", "pretrained=true", "--image", "registry.example.com/pneumonia-kfp:1.2.3", "--wait")
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().splitlines()[-1] == "run-1" and "run run-1: SUCCEEDED" in out

    calls = [(r["method"], r["path"]) for r in kfp_api.requests]
    assert calls[:5] == [("GET", "/apis/v2beta1/healthz"), ("GET", "/apis/v2beta1/healthz"),
                         ("GET", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/experiments"),
                         ("POST", "/apis/v2beta1/runs")]
    assert calls[5:] == [("GET", "/apis/v2beta1/runs/run-1")] * 3
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in kfp_api.requests)
    assert kfp_api.requests[3]["body"]["display_name"] == "xray"

    run = kfp_api.requests[4]["body"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {
        "data": "s3://bucket/chest_xray", "storage": "s3://bucket/pneumonia", "backbones": ["resnet18", "densenet121"],
        "epochs": 3, "learning_rate": 0.01, "pretrained": True}
    # the whole compiled pipeline travels in the request: IR spec plus the Kubernetes platform spec
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "pneumonia-kfp"
    images = {e["container"]["image"] for e in spec["pipeline_spec"]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/pneumonia-kfp:1.2.3"}
    train = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-op"]
    assert train["emptyDirMounts"][0]["mountPath"] == "/dev/shm"


def test_existing_experiment_is_reused_and_namespace_sent(kfp_api, capsys):
    kfp_api.experiments.append({"experiment_id": "exp-7", "display_name": "pneumonia-kfp", "namespace": "team-a"})
    assert submit(kfp_api, "--namespace", "team-a", *S3) == 0
    assert [r["method"] for r in kfp_api.requests if r["path"] == "/apis/v2beta1/experiments"] == ["GET"]
    listing = next(r for r in kfp_api.requests if r["path"] == "/apis/v2beta1/experiments")
    assert listing["query"]["namespace"] == ["team-a"]
    run = next(r["body"] for r in kfp_api.requests if r["path"] == "/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-7" and run["runtime_config"]["parameters"]["storage"] == "s3://bucket/pneumonia"
    assert all(r["auth"] is None for r in kfp_api.requests)  # no token given, none in a pod here


def test_in_cluster_service_account_token(kfp_api, tmp_path, monkeypatch, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-from-projected-volume\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    kfp_api.token = "sa-token-from-projected-volume"
    assert submit(kfp_api, *S3) == 0
    assert all(r["auth"] == "Bearer sa-token-from-projected-volume" for r in kfp_api.requests)


def test_failed_run_exits_1(kfp_api, capsys):
    kfp_api.states = ["RUNNING", "FAILED"]
    assert submit(kfp_api, *S3, "--wait") == 1
    assert "run run-1 finished FAILED" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--param", "epoch=3"], "--param epoch: unknown parameter; the pipeline takes backbones, batch_size,"),
    (["--param", "epochs=three"], "--param epochs=three: epochs takes an integer"),
    (["--param", "learning_rate=fast"], "learning_rate takes a number"),
    (["--param", "pretrained=maybe"], "pretrained takes true or false"),
    (["--param", "backbones=[1"], "backbones takes a list"),
    (["--param", "epochs"], "expected KEY=VALUE"),
    (["--param", "epochs=0"], "epochs=0: must be at least 1"),
    (["--param", "backbones=resnet18,resnet18"], "backbones lists resnet18 more than once"),
    (["--param", "backbones=resnet19"], "unknown backbone 'resnet19'"),
    (["--param", "image_size=16"], "image_size=16: must be at least 32"),
])
def test_bad_parameter_is_rejected_before_any_request(kfp_api, capsys, args, message):
    assert submit(kfp_api, *S3, *args) == 2
    assert message in one_error_line(capsys)
    assert kfp_api.requests == []


@pytest.mark.parametrize("params, message", [
    (["--param", "storage=s3://bucket/x"], "missing --param data=... (no default)"),
    (["--param", "data=/home/me/xray", "--param", "storage=s3://store/p"], "--param data=/home/me/xray: a path"),
    (["--param", "data=s3://datasets/x", "--param", "storage=file:///tmp/store"], "use s3://bucket/prefix"),
])
def test_missing_or_local_parameters(kfp_api, capsys, params, message):
    assert submit(kfp_api, *params) == 2
    assert message in one_error_line(capsys)
    assert kfp_api.requests == []


def test_unreachable_host(capsys):
    assert main(["submit", "--host", f"http://127.0.0.1:{free_port()}", *S3]) == 2
    err = one_error_line(capsys)
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:" in err and "(NewConnectionError)" in err  # the cause
    assert err.endswith("(NewConnectionError); check --host, e.g. http://localhost:8080 after kubectl port-forward "
                        "svc/ml-pipeline-ui 8080:80")


def test_host_without_scheme(capsys):
    assert main(["submit", "--host", "kubeflow.example.com", *S3]) == 2
    assert "expected http(s)://host[:port]" in one_error_line(capsys)


@pytest.mark.parametrize("token, message", [
    (None, "refused the request (HTTP 401): no token was sent: pass --token"),
    ("wrong", "refused the request (HTTP 401): the token was refused"),
])
def test_failed_authentication(kfp_api, capsys, token, message):
    kfp_api.token = TOKEN
    assert submit(kfp_api, *S3, *(["--token", token] if token else [])) == 2
    err = one_error_line(capsys)
    assert f"error: {kfp_api.url} {message}" in err and TOKEN not in err and "wrong" not in err
    assert len(kfp_api.requests) == 1  # one health request, not kfp.Client's retries


def test_forbidden_namespace(kfp_api, capsys):
    """Multi-user Kubeflow: the token is valid, but not for this profile's experiments."""
    kfp_api.fail["GET /apis/v2beta1/experiments"] = (403, {"error": "PermissionDenied", "code": 7})
    assert submit(kfp_api, "--namespace", "someone-else", *S3) == 2
    assert "refused the request (HTTP 403)" in one_error_line(capsys)


@pytest.mark.parametrize("status", [300, 302, 399])
def test_login_redirect(kfp_api, capsys, status):
    kfp_api.fail["GET /apis/v2beta1/healthz"] = (status, {})
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith(f"redirected the API request (HTTP {status}, to a login page?): "
                                           "authenticate with --token")


def test_server_rejects_the_run(kfp_api, capsys):
    kfp_api.fail["POST /apis/v2beta1/runs"] = (400, {"error": "bad", "message": "Invalid input error: spec\nmore"})
    assert submit(kfp_api, *S3) == 2
    assert one_error_line(capsys).endswith("answered HTTP 400: Invalid input error: spec")


@pytest.mark.parametrize("status", [400, 404])
def test_not_a_kfp_server(kfp_api, capsys, status):
    kfp_api.fail["GET /apis/v2beta1/healthz"] = (status, {})
    assert submit(kfp_api, *S3) == 2
    err = one_error_line(capsys)
    assert f"is not a Kubeflow Pipelines API: GET /apis/v2beta1/healthz answered HTTP {status}" in err


@pytest.mark.parametrize("namespace, storage", [
    (["--namespace", "team-a"], "s3://mlpipeline/private/team-a/pneumonia-kfp"),  # the profile's prefix
    ([], "s3://mlpipeline/private/kubeflow/pneumonia-kfp"),  # standalone KFP runs in kubeflow
])
def test_storage_defaults_to_the_prefix_the_profile_may_write(kfp_api, capsys, namespace, storage):
    assert submit(kfp_api, *namespace, "--param", "data=s3://mlpipeline/private/team-a/data/chest_xray") == 0
    run = next(r["body"] for r in kfp_api.requests if r["path"] == "/apis/v2beta1/runs")
    assert run["runtime_config"]["parameters"]["storage"] == storage


def test_storage_setting_and_param_override_the_default(kfp_api, capsys):
    assert submit(kfp_api, "--namespace", "team-a", "--set", "storage=s3://team-store/{namespace}/xray",
                  "--param", "data=s3://datasets/x") == 0
    run = next(r["body"] for r in kfp_api.requests if r["path"] == "/apis/v2beta1/runs")
    assert run["runtime_config"]["parameters"]["storage"] == "s3://team-store/team-a/xray"


def test_kfp_value_error_is_one_line(kfp_api, capsys):
    """kfp.Client raises ValueError of its own, e.g. for an experiment name that is not unique."""
    kfp_api.experiments += [{"experiment_id": f"exp-{i}", "display_name": "pneumonia-kfp"} for i in (1, 2)]
    assert submit(kfp_api, *S3) == 2
    err = one_error_line(capsys)
    assert "Multiple experiments is found with name pneumonia-kfp" in err and kfp_api.url in err
    assert not [r for r in kfp_api.requests if r["path"] == "/apis/v2beta1/runs"]
