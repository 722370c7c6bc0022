"""deploy: the objects it applies validate against the InferenceService CRD of every KServe release Kubeflow
ships (0.13 -> 0.16) and Kubernetes' own schemas; the create-or-update, wait-for-Ready, URL cycle runs through
the real kubernetes client against a small real HTTP server playing the API server; it asks for nothing the
profile's default-editor lacks; --dry-run prints the objects and applies nothing; the pipeline runs it only
when serve_name is set."""
import gzip
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pneumonia_kfp import deploy as d
from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.params import check_run_params
from pneumonia_kfp.pipelines.cli import main
from tests.test_kubeflow_manifests import render, unknown_fields

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# KServe release -> the Kubeflow release that ships it
KSERVE = {"0.13.0": "1.9.1", "0.14.1": "1.10.0", "0.15.0": "1.10.1-1.10.2", "0.15.2": "1.11", "0.16.0": "26.03"}
ROLES = SCHEMAS / "kubeflow-edit-roles.yaml"
NAMESPACE = "kubeflow-user-example-com"


def crd_schema(release: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / f"inferenceservice.serving.kserve.io_v1beta1-kserve-{release}.json.gz")
                                      .read_bytes()))


def check_service(o: dict, release: str) -> None:
    """What the API server checks of a custom resource: the structural schema, no unknown field."""
    spec = crd_schema(release)["properties"]["spec"]
    jsonschema.validate(o["spec"], spec)
    assert unknown_fields(o["spec"], spec, "spec") == []


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A 32 px resnet18 trained for one epoch and exported, as run-local leaves it in OUT/models/resnet18, and
    its evaluation (its entry of results.json)."""
    from pneumonia_kfp.evaluation import evaluate
    from pneumonia_kfp.export import CHECKPOINT, export_model
    from pneumonia_kfp.training import train

    out = tmp_path_factory.mktemp("model")
    train(dataset["uri"], "resnet18", str(out / CHECKPOINT), epochs=1, batch_size=16, seed=0)
    export_model(out)
    return out, evaluate(dataset["uri"], str(out))


@pytest.fixture(scope="module")
def model_dir(trained):
    return trained[0]


def published(uri="s3://bucket/p/models/resnet18-0123456789abcdef") -> d.Published:
    return d.Published(uri, "resnet18@sha256:0123456789abcdef", "resnet18",
                       {"threshold": 0.31, "threshold_rule": "youden", "image_size": 32})


def target(**kw) -> d.Target:
    return d.Target(**{"name": "pneumonia", "namespace": NAMESPACE, "image": "ghcr.io/x/pneumonia-kfp:1",
                       "endpoint": "minio-service.kubeflow:9000", "access_key": "ak", "secret_key": "sk", **kw})


def main_parser_accepts(argv: list[str]) -> bool:
    """The command line parses with this checkout's CLI (the image runs the same one)."""
    from pneumonia_kfp.pipelines.cli import parser

    return parser().parse_args(argv).func.__name__ == "serve_cmd"


# --- the objects ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("release", sorted(KSERVE))
def test_the_inference_service_validates_against_each_kserve_release(release):
    service = d.objects(target(), published())[2]
    check_service(service, release)
    container = service["spec"]["predictor"]["containers"][0]
    # the names KServe reads: its container, and STORAGE_URI for the storage-initializer
    assert container["name"] == "kserve-container"
    assert {"name": "STORAGE_URI", "value": published().uri} in container["env"]
    assert container["args"] == ["--model", "/mnt/models", "--port", "8080", "--name", "pneumonia"]
    assert main_parser_accepts(container["command"][1:] + container["args"])


@pytest.mark.parametrize("release", ["0.13.0", "0.16.0"])
def test_the_schema_check_catches_a_misspelt_field(release):
    service = d.objects(target(), published())[2]
    service["spec"]["predictor"]["container"] = service["spec"]["predictor"].pop("containers")
    with pytest.raises(AssertionError):
        check_service(service, release)
    service = d.objects(target(), published())[2]
    service["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        check_service(service, release)


def test_secret_and_service_account_are_what_kserve_reads():
    secret, account, _ = d.objects(target(endpoint="https://s3.example.org", region="eu-1"), published())
    for o in (secret, account):
        kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)
    assert secret["metadata"]["annotations"] == {"serving.kserve.io/s3-endpoint": "s3.example.org",
                                                 "serving.kserve.io/s3-usehttps": "1",
                                                 "serving.kserve.io/s3-region": "eu-1"}
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"}
    assert account["secrets"] == [{"name": "pneumonia-s3"}]
    plain = d.objects(target(), published())[0]["metadata"]["annotations"]
    assert plain["serving.kserve.io/s3-usehttps"] == "0"
    assert plain["serving.kserve.io/s3-endpoint"] == "minio-service.kubeflow:9000"


@pytest.mark.parametrize("name", ["Pneumonia", "1abc", "a" * 46, "abc-", "a_b", " x"])
def test_a_bad_serve_name_is_refused_before_any_work(name):
    with pytest.raises(UsageError, match="serve_name"):
        check_run_params({"serve_name": name})
    assert check_run_params({"serve_name": "pneumonia-v2"}) == {"serve_name": "pneumonia-v2"}
    assert check_run_params({"serve_name": ""}) == {"serve_name": ""}  # off


def test_the_ensemble_is_never_deployed_and_test_scores_play_no_part():
    def entry(backbone, val_auc, test_auc, **extra):
        return {"backbone": backbone, "val": {"auc": val_auc, "f1": 0.5}, "test": {"auc": test_auc}, **extra}

    results = {"models": [entry("resnet18", 0.90, 0.99), entry("resnet50", 0.95, 0.80),
                          entry("ensemble", 0.97, 0.99, members=["resnet18", "resnet50"])],
               "best": {"backbone": "ensemble"}}
    assert d.best_trained_model(results, "results.json")["backbone"] == "resnet50"


# --- a fake API server ------------------------------------------------------------------------------------

class JsonServer:
    """A real HTTP server on 127.0.0.1 in a thread: each request goes to ``handle(handler, method)``."""

    def __init__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.handle(self, "POST")

            def do_GET(self):
                server.handle(self, "GET")

            def do_PUT(self):
                server.handle(self, "PUT")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()

    @staticmethod
    def body(h):
        return json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)) or b"null")

    @staticmethod
    def answer(h, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


class FakeApiServer(JsonServer):
    """Answers the kubernetes client's create / get / update of secrets, serviceaccounts and inferenceservices
    like the API server: 409 AlreadyExists, resourceVersion conflicts, generation bumped by a spec change. An
    InferenceService's status plays KServe's controller: Ready, at an observedGeneration that catches up after
    ``lag`` reads."""

    def __init__(self, lag: int = 0):
        self.objects, self.requests, self.lag, self.reads = {}, [], lag, 0
        self.version = 0
        self.conflicts = 0  # replaces answered 409 Conflict first, as when another writer got in between
        self.forbidden: set[str] = set()  # resources this identity may not touch (RBAC)
        super().__init__()

    @staticmethod
    def parse(path: str) -> tuple[str, str, str, str | None]:
        """(api group, namespace, resource, name) of /api/v1/... or /apis/<group>/<version>/..."""
        parts = path.split("?")[0].strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        assert rest[0] == "namespaces", path
        return group, rest[1], rest[2], rest[3] if len(rest) > 3 else None

    def status(self, h, code: int, reason: str, message: str) -> None:
        self.answer(h, code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                              "message": message, "code": code})

    def handle(self, h, method: str) -> None:
        group, ns, resource, name = self.parse(h.path)
        body = self.body(h)
        self.requests.append((method, group, resource))
        if resource in self.forbidden:
            return self.status(h, 403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:'
                               f'{ns}:pipeline-runner" cannot {method.lower()} resource "{resource}"')
        if method == "POST":
            key = (group, ns, resource, body["metadata"]["name"])
            if key in self.objects:
                return self.status(h, 409, "AlreadyExists", f"{resource} \"{key[3]}\" already exists")
            return self.answer(h, 201, self.store(key, body, generation=1))
        key = (group, ns, resource, name)
        if key not in self.objects:
            return self.status(h, 404, "NotFound", f"{resource} \"{name}\" not found")
        if method == "PUT":
            current = self.objects[key]
            if self.conflicts:
                self.conflicts -= 1
                current = self.store(key, current, current["metadata"]["generation"])  # another writer's change
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                return self.status(h, 409, "Conflict", "the object has been modified")
            changed = body.get("spec") != current.get("spec")
            generation = current["metadata"]["generation"] + changed
            return self.answer(h, 200, self.store(key, {**body, "status": current.get("status")}, generation))
        if resource == "inferenceservices":
            self.reads += 1
            self.reconcile(key)
        return self.answer(h, 200, self.objects[key])

    def store(self, key, body: dict, generation: int) -> dict:
        self.version += 1
        body = json.loads(json.dumps(body))
        body["metadata"].update(resourceVersion=str(self.version), generation=generation, uid=str(uuid.uuid4()))
        self.objects[key] = body
        return body

    def reconcile(self, key) -> None:
        """KServe's controller: Ready at the latest generation once ``lag`` reads have passed since a change."""
        o = self.objects[key]
        status = o.get("status") or {}
        if status.get("observedGeneration") != o["metadata"]["generation"] and self.reads > self.lag:
            o["status"] = {"url": f"http://{key[3]}.{key[1]}.example.com", "observedGeneration":
                           o["metadata"]["generation"], "conditions": [{"type": "Ready", "status": "True"}]}


@pytest.fixture
def api():
    server = FakeApiServer()
    yield server
    server.close()


def client_of(server: FakeApiServer):
    from kubernetes import client

    config = client.Configuration()
    config.host = server.url
    return client.ApiClient(config)


def test_create_then_update_waits_for_the_new_generation(api):
    """First deploy creates all three; a second with another model gets 409s and replaces each at the
    resourceVersion it reads, and is not taken as Ready on the previous generation's Ready."""
    kube = client_of(api)
    first = d.objects(target(), published())
    generation = d.apply(kube, first)
    assert generation == 1
    assert d.wait_ready(kube, "pneumonia", NAMESPACE, generation, timeout=5, poll=0.01) == \
        f"http://pneumonia.{NAMESPACE}.example.com"
    assert [m for m, _, _ in api.requests[:3]] == ["POST"] * 3

    api.lag, api.reads = 3, 0  # the controller takes three reads to reconcile the change
    api.conflicts = 1  # and someone else writes the Secret between our read and our replace: read again
    second = d.objects(target(), published("s3://bucket/p/models/resnet18-fedcba9876543210"))
    generation = d.apply(kube, second)
    assert generation == 2
    url = d.wait_ready(kube, "pneumonia", NAMESPACE, generation, timeout=5, poll=0.01)
    assert url.startswith("http://pneumonia.") and api.reads == 4  # waited past the stale Ready
    stored = api.objects[("serving.kserve.io", NAMESPACE, "inferenceservices", "pneumonia")]
    assert stored["spec"]["predictor"]["containers"][0]["env"][0]["value"].endswith("fedcba9876543210")
    assert {(m, r) for m, _, r in api.requests[3:]} >= {("POST", "secrets"), ("GET", "secrets"), ("PUT", "secrets"),
                                                        ("PUT", "serviceaccounts"), ("PUT", "inferenceservices")}
    assert [m for m, _, r in api.requests[3:] if r == "secrets"] == ["POST", "GET", "PUT", "POST", "GET", "PUT"]


def test_forbidden_is_one_line_saying_which_role_grants_it(api):
    api.forbidden = {"inferenceservices"}
    with pytest.raises(d.DeployError, match=r"^InferenceService .*/pneumonia: the API server answered 403 "
                       r"Forbidden: .*cannot post.*manifests/deploy/standalone\)$"):
        d.apply(client_of(api), d.objects(target(), published()))


def test_not_ready_in_time_is_one_line_with_the_condition(api):
    kube = client_of(api)
    api.lag = 10 ** 6
    generation = d.apply(kube, d.objects(target(), published()))
    with pytest.raises(d.DeployError, match=r"not Ready after 0.05 s \(Ready: none\).*kubectl describe"):
        d.wait_ready(kube, "pneumonia", NAMESPACE, generation, timeout=0.05, poll=0.01)


def test_an_api_error_is_one_line_naming_the_object(api):
    with pytest.raises(d.DeployError, match=r"^InferenceService other/pneumonia: the API server answered 404 "
                       r"Not Found: inferenceservices \"pneumonia\" not found$"):
        d.wait_ready(client_of(api), "pneumonia", "other", 1, timeout=1, poll=0.01)


VERB = {"POST": "create", "GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def granted(path: Path) -> set[tuple[str, str, str]]:
    """(api group, resource, verb) that the vendored ClusterRoles aggregated into kubeflow-edit grant."""
    return {(g, r, v) for role in yaml.safe_load_all(path.read_text()) for rule in role["rules"]
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_every_request_is_granted_by_kubeflow_edit_and_the_standalone_role(api, registry, model_dir, s3_env):
    """A whole deploy asks only for what kubeflow-edit (the profile's default-editor) grants: the
    InferenceService through KServe's aggregated kubeflow-kserve-edit, the Secret and ServiceAccount through
    Kubeflow's kubeflow-kubernetes-edit/-view. The roles are vendored from KServe 0.13.0 (the narrowest
    kubeflow-kserve-edit of 0.13 -> 0.16) and kubeflow/manifests."""
    storage = f"s3://deploy-{uuid.uuid4().hex[:8]}/p"
    done = d.deploy(str(model_dir), storage, target(), client_of(api), registry=registry.url, timeout=5, poll=0.01)
    assert done.registry_version == registry.of("model_versions", name=done.model.model_id)[0]["id"]
    d.deploy(str(model_dir), storage, target(), client_of(api), timeout=5, poll=0.01)  # the update path too
    asked = {(g, r, VERB[m]) for m, g, r in api.requests}
    assert ("serving.kserve.io", "inferenceservices", "update") in asked
    assert asked <= granted(ROLES)
    assert done.url == f"http://pneumonia.{NAMESPACE}.example.com"
    # standalone Kubeflow Pipelines: manifests/deploy grants pipeline-runner exactly what was asked, no more
    objects = render("deploy/standalone")
    for o in objects:
        kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)
        assert o["metadata"]["namespace"] == "kubeflow"
    role = next(o for o in objects if o["kind"] == "Role")
    assert {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]} == asked
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]


# --- the Model Registry ---------------------------------------------------------------------------------

class FakeRegistry(JsonServer):
    """The Model Registry's REST API, as much of it as registering a model and finding it again uses (v1, or
    ``api``: the v1alpha3 of registries before v1)."""

    def __init__(self, api: str = "v1"):
        self.objects, self.requests, self.ids = {}, [], iter(range(1, 10 ** 6))
        self.API = f"/api/model_registry/{api}/"
        super().__init__()

    def of(self, kind: str, **match) -> list[dict]:
        return [o for (k, _), o in self.objects.items() if k == kind and all(o.get(f) == v for f, v in match.items())]

    def handle(self, h, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self.body(h)
        self.requests.append((method, url.path, query, body))
        path = url.path[len(self.API):].split("/") if url.path.startswith(self.API) else []
        if method == "GET" and path == ["registered_models"]:
            items = self.of("registered_models")
            return self.answer(h, 200, {"items": items, "nextPageToken": "", "pageSize": len(items),
                                        "size": len(items)})
        if method == "GET" and path in (["registered_model"], ["model_version"]):  # find by name (and parent)
            parent = {"registeredModelId": query["parentResourceId"]} if "parentResourceId" in query else {}
            found = self.of(path[0] + "s", name=query["name"], **parent)
            return self.answer(h, 200, found[0]) if found else self.answer(h, 404, {"code": "404", "message": "none"})
        if method == "POST" and len(path) == 1:
            return self.answer(h, 201, self.create(path[0], body))
        if method == "POST" and len(path) == 3 and path[0] == "model_versions" and path[2] == "artifacts":
            return self.answer(h, 201, self.create("model_artifacts", {**body, "modelVersionId": path[1]}))
        return self.answer(h, 404, {"code": "404", "message": f"no route {method} {url.path}"})

    def create(self, kind: str, body: dict) -> dict:
        n = str(next(self.ids))
        self.objects[(kind, n)] = {**body, "id": n, "createTimeSinceEpoch": "1", "lastUpdateTimeSinceEpoch": "1"}
        return self.objects[(kind, n)]


@pytest.fixture
def registry():
    server = FakeRegistry()
    yield server
    server.close()


def test_registers_the_model_once_through_the_registry_client(registry):
    """The real model-registry client against its REST API: the registered model is the service's name, the
    version the model id, the artifact the store folder in ONNX; deploying the same model again adds nothing."""
    model = published()
    first = d.register(registry.url, "pneumonia", model)
    [rm] = registry.of("registered_models")
    [version] = registry.of("model_versions")
    [artifact] = registry.of("model_artifacts")
    assert rm["name"] == "pneumonia" and first == version["id"]
    assert (version["name"], version["registeredModelId"]) == (model.model_id, rm["id"])
    assert version["customProperties"]["threshold"]["double_value"] == 0.31
    assert (artifact["uri"], artifact["modelFormatName"], artifact["modelVersionId"]) == (model.uri, "onnx", first)
    posts = sum(m == "POST" for m, *_ in registry.requests)
    assert d.register(registry.url, "pneumonia", model) == first
    assert sum(m == "POST" for m, *_ in registry.requests) == posts  # nothing new


def test_a_registry_without_the_v1_api_is_one_line():
    """The locked client speaks /api/model_registry/v1; a registry serving only v1alpha3 is refused in one line
    that says so and how to deploy without registering."""
    old = FakeRegistry("v1alpha3")
    try:
        with pytest.raises(d.DeployError, match=r"^Model Registry http://127.*does not answer /api/model_registry/v1/"
                           r".*v1alpha3.*PNEUMONIA_KFP_MODEL_REGISTRY unset") as e:
            d.register(old.url, "pneumonia", published())
        assert "\n" not in str(e.value) and old.objects == {}
    finally:
        old.close()


# --- the model in the store, the CLI ----------------------------------------------------------------------

def test_publish_copies_the_model_once_under_its_id(model_dir, s3_env):
    from pneumonia_kfp.predict import load_model
    from pneumonia_kfp.storage import open_store

    storage = f"s3://deploy-{uuid.uuid4().hex[:8]}/p"
    model = d.publish(str(model_dir), storage)
    expected = load_model(model_dir).model_id
    assert model.model_id == expected and model.uri == f"{storage}/models/{expected.replace('@sha256:', '-')}"
    store = open_store(model.uri)
    assert {k for k in store.list()} == {"metadata.json", "model.onnx", "model.pt2", "checkpoint.pt"}
    # from the store (a pipeline artifact's way; KFP names its MinIO/SeaweedFS artifacts minio://): the same id
    again = d.publish(model.uri.replace("s3://", "minio://"), storage)
    assert again.uri == model.uri
    with pytest.raises(d.DeployError, match=r"^model gs://b/m: a gs:// artifact cannot be read .* --model DIR$"):
        d.publish("gs://b/m", storage)
    assert load_model(model_dir).model_id == expected


def test_dry_run_prints_every_object_and_applies_nothing(model_dir, s3_env, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    bucket = f"deploy-{uuid.uuid4().hex[:8]}"
    code = main(["deploy", "--model", str(model_dir), "--name", "pneumonia", "--namespace", NAMESPACE,
                 "--storage", f"s3://{bucket}/p", "--image", "ghcr.io/x/pneumonia-kfp:1", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    objects = list(yaml.safe_load_all(out))
    assert [o["kind"] for o in objects] == ["Secret", "ServiceAccount", "InferenceService"]
    assert objects[0]["stringData"] == {"AWS_ACCESS_KEY_ID": d.REDACTED, "AWS_SECRET_ACCESS_KEY": d.REDACTED}
    assert "test-secret-key" not in out
    service = objects[2]
    check_service(service, "0.16.0")
    assert service["spec"]["predictor"]["containers"][0]["image"] == "ghcr.io/x/pneumonia-kfp:1"
    assert service["metadata"]["namespace"] == NAMESPACE
    # the Secret's endpoint is the cluster's (the setting minio.endpoint), not this machine's MINIO_ENDPOINT
    assert objects[0]["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == "minio-service.kubeflow:9000"
    from minio.error import S3Error

    from pneumonia_kfp.storage import minio_client_from_env

    client, _ = minio_client_from_env()
    try:
        assert list(client.list_objects(bucket, recursive=True)) == []
    except S3Error as e:
        assert e.code == "NoSuchBucket"


def use_kubeconfig(api: FakeApiServer, tmp_path, monkeypatch) -> None:
    """A kube config whose current context is the fake API server, namespace team-a, as on a laptop."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": "team-a"}}],
        "users": [{"name": "me", "user": {"token": "t"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_deploy_without_the_stores_keys_is_one_line_and_applies_nothing(api, model_dir, s3_env, tmp_path, capsys,
                                                                       monkeypatch):
    use_kubeconfig(api, tmp_path, monkeypatch)
    monkeypatch.delenv("MINIO_SECRET_KEY")
    code = main(["deploy", "--model", str(model_dir), "--name", "xray", "--storage", "s3://bucket/p"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MINIO_SECRET_KEY" in err
    assert api.requests == []


def test_deploy_from_a_run_local_output_through_the_kube_config(api, trained, s3_env, tmp_path, capsys,
                                                                  monkeypatch):
    """`pneumonia-kfp deploy --run OUT` picks OUT/models/<best by validation> and applies through the kube
    config, as from a laptop; it prints the URL."""
    import shutil

    from pneumonia_kfp.evaluation import combine
    from pneumonia_kfp.outputs import document

    model_dir, result = trained
    out = tmp_path / "out"
    shutil.copytree(model_dir, out / "models" / "resnet18")
    (out / "results.json").write_text(document(combine({}, [result])))
    use_kubeconfig(api, tmp_path, monkeypatch)
    code = main(["deploy", "--run", str(out), "--name", "xray", "--storage", f"s3://deploy-{uuid.uuid4().hex[:8]}/p",
                 "--timeout", "5"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout == "http://xray.team-a.example.com\n"  # the kube config context's namespace
    assert ("serving.kserve.io", "team-a", "inferenceservices", "xray") in api.objects


def test_a_file_store_is_refused_in_one_line(model_dir, capsys):
    code = main(["deploy", "--model", str(model_dir), "--name", "pneumonia", "--namespace", "x",
                 "--storage", "file:///tmp/store", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "s3://" in err


# --- the pipeline -----------------------------------------------------------------------------------------

def test_the_pipeline_steps_code_deploys_the_reports_best_model(api, trained, s3_env, tmp_path, monkeypatch):
    """deploy_op's own function (what the step's container runs): results.json from report -> the best model's
    artifact (model_uri) -> store -> objects applied in the pod's namespace -> the URL as an output."""
    from types import SimpleNamespace

    from pneumonia_kfp.components.deploy import deploy_op
    from pneumonia_kfp.evaluation import combine
    from pneumonia_kfp.outputs import document

    model_dir, result = trained
    summary = tmp_path / "summary"
    summary.write_text(document(combine({}, [{**result, "model_uri": str(model_dir)}])))
    use_kubeconfig(api, tmp_path, monkeypatch)  # the kube config's namespace stands in for the pod's
    storage = f"s3://deploy-{uuid.uuid4().hex[:8]}/p"
    out = deploy_op.python_func(summary=SimpleNamespace(path=str(summary)), storage=storage, serve_name="xray",
                                image="ghcr.io/x/pneumonia-kfp:1", timeout_seconds=5)
    assert out.url == "http://xray.team-a.example.com" and out.registry_version == ""
    assert out.model_uri.startswith(f"{storage}/models/resnet18-") and out.model_id.startswith("resnet18@sha256:")
    service = api.objects[("serving.kserve.io", "team-a", "inferenceservices", "xray")]
    assert service["spec"]["predictor"]["containers"][0]["image"] == "ghcr.io/x/pneumonia-kfp:1"
    secret = api.objects[("", "team-a", "secrets", "xray-s3")]
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key"}
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == s3_env  # the pod's MINIO_ENDPOINT


def test_run_local_takes_no_serve_name(capsys):
    """A local run deploys nothing: `pneumonia-kfp deploy --run OUT` does, with the cluster's settings."""
    with pytest.raises(SystemExit):
        main(["run-local", "--output", "out", "--serve-name", "pneumonia"])
    assert "unrecognized arguments: --serve-name" in capsys.readouterr().err


def test_the_pipeline_deploys_only_when_serve_name_is_set(tmp_path):
    path = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(path), "--image", "ghcr.io/x/pneumonia-kfp:1"]) == 0
    spec, platform = yaml.safe_load_all(path.read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["serve_name"]["defaultValue"] == ""
    conditions = [t for t in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in t]
    assert [c["triggerPolicy"]["condition"] for c in conditions] == [
        "inputs.parameter_values['pipelinechannel--serve_name'] != ''"]
    branch = spec["components"][conditions[0]["componentRef"]["name"]]["dag"]["tasks"]["deploy-op"]
    assert branch["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == "ghcr.io/x/pneumonia-kfp:1"
    assert branch["inputs"]["artifacts"]["summary"]["componentInputArtifact"]
    executor = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-deploy-op"]
    assert executor["secretAsEnv"][0]["secretName"] == "mlpipeline-minio-artifact"
