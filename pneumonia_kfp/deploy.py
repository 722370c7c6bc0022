"""deploy: the best model (chosen on validation) served by KServe, and registered in the Model Registry.

What it applies, in the profile's namespace, is what KServe users write by hand for a custom container:

    Secret          <name>-s3: the store's keys under the names KServe's credential builder reads
                    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), annotated serving.kserve.io/s3-endpoint
                    and serving.kserve.io/s3-usehttps
    ServiceAccount  <name>: lists that Secret, so KServe hands its keys to the storage-initializer
    InferenceService <name>: predictor.containers runs the project's image's `pneumonia-kfp serve`; the
                    STORAGE_URI env (KServe's storageUri for custom containers, 0.13 -> 0.16) makes the
                    storage-initializer copy the model from the store into /mnt/models before serve starts

The model is read by KServe's storage-initializer, not by serve itself: that is how every KServe runtime
gets its model, the serving container needs no store keys, and a model that cannot be fetched fails
the pod's init container where `kubectl describe` shows it.

The model files are first copied into the store under ``models/<backbone>-<sha>/`` (the model id that
predict and serve report), so the URI names one model and never changes under a running service.

Create or update (create; on 409 get + replace with its resourceVersion), then wait until the service
is Ready at the generation just written, and return its URL. Every verb used (create, get, update on
secrets, serviceaccounts and inferenceservices) is in Kubeflow's ``kubeflow-edit`` role that a profile's
``default-editor`` holds: inferenceservices through KServe's aggregated ``kubeflow-kserve-edit``.
The same code runs in the pipeline's deploy step and in ``pneumonia-kfp deploy`` on a laptop.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pneumonia_kfp.errors import PneumoniaKfpError, UsageError
from pneumonia_kfp.kube import api_client, api_error, current_namespace
from pneumonia_kfp.storage import parse_endpoint

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
CONTAINER = "kserve-container"  # the name KServe looks for in predictor.containers
MODEL_MOUNT = "/mnt/models"  # where KServe's storage-initializer puts STORAGE_URI's files
PORT = 8080
# KServe's inferenceservice-config credentials.s3 default key names (0.13 -> 0.16)
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
S3_ENDPOINT, S3_USE_HTTPS, S3_REGION = (f"{GROUP}/s3-endpoint", f"{GROUP}/s3-usehttps", f"{GROUP}/s3-region")
# the files serve reads; the checkpoint too, so the served model id is the one predict reports
MODEL_FILES = ("metadata.json", "model.onnx", "model.pt2", "checkpoint.pt")
MODELS = "models"  # <storage>/models/<backbone>-<sha>/
REGISTRY_ENV = "PNEUMONIA_KFP_MODEL_REGISTRY"  # the Model Registry's REST address; unset: no registration
REDACTED = "<redacted>"
LABELS = {"app.kubernetes.io/part-of": "pneumonia-kfp", "app.kubernetes.io/managed-by": "pneumonia-kfp-deploy"}
SERVE_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


class DeployError(PneumoniaKfpError):
    """The service could not be deployed or did not become Ready; the message says where and why."""


# --- which model -------------------------------------------------------------------------------------------

def best_trained_model(results: dict, where: str) -> dict:
    """results.json's best model by validation (report's rule), among the trained ones: the ensemble is
    no single model that serve could run, so when it wins, the best of its members is deployed."""
    from pneumonia_kfp.evaluation import best_model

    trained = [m for m in results["models"] if "members" not in m]
    if not trained:
        raise DeployError(f"{where}: no trained model to deploy")
    best = best_model(trained)
    if results.get("best") and results["best"]["backbone"] != best["backbone"]:
        log.info("the best by validation is %s, which serve cannot run alone; deploying the best trained model, %s",
                 results["best"]["backbone"], best["backbone"])
    return best


def read_results_file(path: str | Path) -> dict:
    """results.json (a file, or a run-local output folder holding one), checked."""
    import json

    from pneumonia_kfp.documents import read_results

    p = Path(path)
    file = p / "results.json" if p.is_dir() else p
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--run {path}: cannot read {file} ({e}): pass a run-local output folder or its "
                         "results.json") from None
    return read_results(doc, str(file))


def model_source(results: dict, run: str | Path) -> str:
    """Where the best trained model's directory is: run-local's OUT/models/<backbone> when it is there, else
    the model_uri that evaluate recorded (the pipeline's model artifact)."""
    where = str(run)
    best = best_trained_model(results, where)
    local = Path(run) / MODELS / best["backbone"] if Path(run).is_dir() else None
    if local is not None and local.is_dir():
        return str(local)
    if not best.get("model_uri"):
        raise DeployError(f"{where}: the results of {best['backbone']} name no model_uri and there is no "
                          f"{local or 'models/' + best['backbone']}: pass --model DIR")
    return best["model_uri"]


def store_uri(uri: str) -> str:
    """A model URI the project's store can open: KFP writes artifact URIs as minio://bucket/key for its
    MinIO/SeaweedFS store, which is the same S3 endpoint and keys as the profile's store."""
    parsed = urlparse(uri)
    if parsed.scheme == "minio":
        return "s3://" + uri[len("minio://"):]
    if parsed.scheme in ("s3", "file", ""):
        return uri
    raise DeployError(f"model {uri}: a {parsed.scheme}:// artifact cannot be read through the project's S3 store; "
                      "copy the model directory there, or deploy from a local copy with --model DIR")


# --- the model in the store --------------------------------------------------------------------------------

@dataclass
class Published:
    uri: str  # the model's folder in the store: KServe's storageUri
    model_id: str  # backbone@sha256:<16 hex>, what predict and serve report
    backbone: str
    info: dict = field(default_factory=dict)  # metadata.json: thresholds, image size, ... (documents.ModelInfo)


def _local_dir(source: str) -> Path | None:
    """The directory of a plain path or file:// URI; None for a store URI."""
    if "://" in source and not source.startswith("file://"):
        return None
    local = Path(urlparse(source).path if source.startswith("file://") else source)
    if not local.is_dir():
        raise DeployError(f"model {source} is not a directory: pass a model directory (OUT/models/<backbone>)")
    return local


def _download(source: str, folder: Path) -> None:
    """The model files of the store URI ``source`` into ``folder``; the optional ones may be missing."""
    from pneumonia_kfp.storage import NotFound, open_store

    store = open_store(store_uri(source))
    for name in MODEL_FILES:
        try:
            store.get_file(name, folder / name)
        except NotFound:
            pass
    if not (folder / MODEL_FILES[0]).is_file():
        raise DeployError(f"model {source}: no {MODEL_FILES[0]} there; is it a model directory of train?")


def publish(source: str, storage: str, dry_run: bool = False) -> Published:
    """Copy the model directory ``source`` into ``<storage>/models/<backbone>-<sha>/`` (unless it is there
    already, or ``dry_run``); the model is loaded first, so a broken one is refused before anything is applied."""
    import json

    from pneumonia_kfp.documents import read_model_info
    from pneumonia_kfp.predict import load_model
    from pneumonia_kfp.scratch import scratch_dir
    from pneumonia_kfp.storage import open_store

    if urlparse(storage).scheme != "s3":
        raise UsageError(f"storage={storage!r}: KServe's storage-initializer reads the model from S3: use an "
                         "s3://bucket/prefix store that the cluster reaches")
    with scratch_dir("deploy-") as tmp:
        folder = _local_dir(source)
        if folder is None:
            folder = Path(tmp)
            _download(source, folder)
        model = load_model(folder)  # what serve will run, with the id it will report
        info = read_model_info(json.loads((folder / MODEL_FILES[0]).read_text()), str(folder / MODEL_FILES[0]))
        target = open_store(storage).child(f"{MODELS}/{model.model_id.replace('@sha256:', '-')}")
        if not dry_run and not target.exists(MODEL_FILES[0]):
            for name in MODEL_FILES[1:] + MODEL_FILES[:1]:  # metadata last: its presence means complete
                if (folder / name).is_file():
                    target.put_file(name, folder / name)
        return Published(target.uri, model.model_id, model.backbone, info)


# --- the objects ------------------------------------------------------------------------------------------

@dataclass
class Target:
    """Where and how to serve: everything the objects depend on besides the model."""
    name: str
    namespace: str
    image: str
    endpoint: str  # the store's S3 endpoint as the cluster reaches it: host:port or http(s)://host:port
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None


def objects(target: Target, model: Published) -> list[dict]:
    """Secret, ServiceAccount and InferenceService, in the order they are applied."""
    t = target
    host, https = parse_endpoint(t.endpoint)
    secret_name = f"{t.name}-s3"
    labels = {**LABELS, "app.kubernetes.io/name": t.name}
    annotations = {S3_ENDPOINT: host, S3_USE_HTTPS: "1" if https else "0",
                   **({S3_REGION: t.region} if t.region else {})}
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": secret_name, "namespace": t.namespace, "labels": labels, "annotations": annotations},
              "stringData": {ACCESS_KEY_ID: t.access_key or "", SECRET_ACCESS_KEY: t.secret_key or ""}}
    account = {"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": t.name, "namespace": t.namespace, "labels": labels},
               "secrets": [{"name": secret_name}]}
    container = {
        "name": CONTAINER, "image": t.image,
        "command": ["pneumonia-kfp", "serve"],
        # the model answers under the service's name, as KServe's own runtimes do: /v2/models/<name>/infer
        "args": ["--model", MODEL_MOUNT, "--port", str(PORT), "--name", t.name],
        "env": [{"name": "STORAGE_URI", "value": model.uri}],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "resources": SERVE_RESOURCES,
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},  # the image runs as 1000
    }
    service = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
               "metadata": {"name": t.name, "namespace": t.namespace,
                            "labels": {**labels, "pneumonia-kfp/backbone": model.backbone},
                            "annotations": {"pneumonia-kfp/model-id": model.model_id,
                                            "pneumonia-kfp/storage-uri": model.uri}},
               "spec": {"predictor": {"serviceAccountName": t.name, "minReplicas": 1, "containers": [container]}}}
    return [secret, account, service]


def to_yaml(items: list[dict]) -> str:
    """The objects as one multi-document YAML stream, as ``kubectl apply --dry-run=client -o yaml`` shows
    them, but the Secret's values redacted (terminals and logs are kept)."""
    import copy

    import yaml

    shown = copy.deepcopy(items)
    for o in shown:
        if o["kind"] == "Secret":
            o["stringData"] = {k: REDACTED for k in o["stringData"]}
    return "---\n".join(yaml.safe_dump(o, sort_keys=False) for o in shown)


# --- apply and wait ---------------------------------------------------------------------------------------

class _Api:
    """create / get / replace of the three kinds through the kubernetes client (its typed and custom APIs)."""

    def __init__(self, api_client):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def create(self, o: dict):
        ns = o["metadata"]["namespace"]
        if o["kind"] == "Secret":
            return self.core.create_namespaced_secret(ns, o)
        if o["kind"] == "ServiceAccount":
            return self.core.create_namespaced_service_account(ns, o)
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, o)

    def get(self, kind: str, name: str, ns: str) -> dict:
        if kind == "Secret":
            return self.core.read_namespaced_secret(name, ns).to_dict()
        if kind == "ServiceAccount":
            return self.core.read_namespaced_service_account(name, ns).to_dict()
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def replace(self, o: dict):
        name, ns = o["metadata"]["name"], o["metadata"]["namespace"]
        if o["kind"] == "Secret":
            return self.core.replace_namespaced_secret(name, ns, o)
        if o["kind"] == "ServiceAccount":
            return self.core.replace_namespaced_service_account(name, ns, o)
        return self.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, o)


FORBIDDEN_HINT = ("; this identity may not create, get or update secrets, serviceaccounts or inferenceservices "
                  "here (Kubeflow profiles: default-editor may; standalone Kubeflow Pipelines: "
                  "kubectl apply -k manifests/deploy/standalone)")


def _generation(answer) -> int | None:
    meta = answer.get("metadata", {}) if isinstance(answer, dict) else answer.metadata.to_dict()
    return meta.get("generation")


def apply(api_client, items: list[dict], attempts: int = 3) -> int | None:
    """Create each object, or replace it when it exists (409) at the resourceVersion just read; a conflict
    with another writer (409 on the replace) is retried. The InferenceService's generation written."""
    from kubernetes.client.exceptions import ApiException

    api, generation = _Api(api_client), None
    for o in items:
        what = f"{o['kind']} {o['metadata']['namespace']}/{o['metadata']['name']}"
        for attempt in range(attempts):
            try:
                try:
                    answer = api.create(o)
                    log.info("created %s", what)
                except ApiException as e:
                    if e.status != 409:
                        raise
                    current = api.get(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"])
                    version = current["metadata"].get("resource_version") or current["metadata"]["resourceVersion"]
                    answer = api.replace({**o, "metadata": {**o["metadata"], "resourceVersion": version}})
                    log.info("updated %s", what)
                break
            except ApiException as e:
                if e.status == 409 and attempt + 1 < attempts:
                    continue
                hint = FORBIDDEN_HINT if e.status == 403 else ""
                raise DeployError(f"{what}: the API server answered {api_error(e)}{hint}") from None
        generation = _generation(answer) if o["kind"] == "InferenceService" else generation
    return generation


def _ready(service: dict, generation: int | None) -> tuple[bool, str]:
    """(ready at ``generation``, what its Ready condition says)."""
    status = service.get("status") or {}
    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), None)
    said = f"{ready.get('status')} {ready.get('reason', '')} {ready.get('message', '')}".strip() if ready else "none"
    observed = status.get("observedGeneration")
    current = generation is None or observed is None or observed >= generation
    return bool(ready and ready.get("status") == "True" and status.get("url") and current), said


def wait_ready(api_client, name: str, namespace: str, generation: int | None = None, timeout: float = 900,
               poll: float = 5) -> str:
    """Poll the InferenceService until it is Ready at ``generation`` (not an earlier revision's Ready); its URL."""
    from kubernetes.client.exceptions import ApiException

    api, deadline, said = _Api(api_client), time.monotonic() + timeout, "none"
    while True:
        try:
            service = api.get("InferenceService", name, namespace)
        except ApiException as e:
            raise DeployError(f"InferenceService {namespace}/{name}: the API server answered {api_error(e)}"
                              ) from None
        ok, said = _ready(service, generation)
        if ok:
            return service["status"]["url"]
        if time.monotonic() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} is not Ready after {timeout:g} s (Ready: {said}); "
                              f"see `kubectl describe inferenceservice -n {namespace} {name}` and its pods' logs")
        time.sleep(poll)


# --- the Model Registry -----------------------------------------------------------------------------------

def register(address: str, name: str, model: Published, author: str = "pneumonia-kfp") -> str:
    """Register the model (name: the service's; version: its model id) unless that version exists; the version's
    id. ``address``: http(s)://host[:port] of the registry's REST service; in a pod the ServiceAccount token
    authenticates (the client reads it)."""
    from importlib.metadata import version as installed

    from model_registry import ModelRegistry
    from mr_openapi.exceptions import NotFoundException

    try:
        registry = ModelRegistry(address, author=author)
    except NotFoundException:
        raise DeployError(f"Model Registry {address} does not answer /api/model_registry/v1/registered_models: the "
                          f"client here (model-registry {installed('model-registry')}) speaks the v1 REST API, which "
                          "a registry serving only v1alpha3 lacks; upgrade the registry, or leave "
                          f"{REGISTRY_ENV} unset to deploy without registering") from None
    except Exception as e:  # the client raises its own, aiohttp's and ValueError: one line naming the registry
        raise DeployError(f"Model Registry {address}: {type(e).__name__}: {_first_line(e)}") from None
    try:
        found = registry.get_registered_model(name) and registry.get_model_version(name, model.model_id)
        if not found:
            registry.register_model(
                name, model.uri, model_format_name="onnx", model_format_version="1", version=model.model_id,
                version_description=f"{model.backbone}, thresholds chosen on validation",
                metadata={"backbone": model.backbone, "threshold": float(model.info["threshold"]),
                          "threshold_rule": model.info["threshold_rule"], "image_size": int(model.info["image_size"])})
            found = registry.get_model_version(name, model.model_id)
    except Exception as e:
        raise DeployError(f"Model Registry {address}: registering {name} {model.model_id}: {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    log.info("Model Registry %s: %s version %s (id %s)", address, name, model.model_id, found.id)
    return str(found.id)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# --- the whole deploy -------------------------------------------------------------------------------------

def store_keys() -> tuple[str | None, str | None, str | None]:
    """(access key, secret key, region) of the store as this process has them (MINIO_*): the Secret's values."""
    from pneumonia_kfp.storage import ACCESS_KEY_ENV, SECRET_KEY_ENV

    return os.environ.get(ACCESS_KEY_ENV), os.environ.get(SECRET_KEY_ENV), os.environ.get("MINIO_REGION")


@dataclass
class Deployed:
    url: str
    model: Published
    registry_version: str = ""


def deploy(source: str, storage: str, target: Target, api_client, registry: str = "", timeout: float = 900,
           poll: float = 5) -> Deployed:
    """Publish the model, register it when a registry is given, apply the objects and wait for Ready."""
    from pneumonia_kfp.storage import ACCESS_KEY_ENV, SECRET_KEY_ENV

    if not (target.access_key and target.secret_key):  # else the storage-initializer fails, far from here
        raise UsageError(f"the store's keys are not set ({ACCESS_KEY_ENV}, {SECRET_KEY_ENV}): KServe's "
                         "storage-initializer reads the model with them")
    model = publish(source, storage)
    version = register(registry, target.name, model) if registry else ""
    generation = apply(api_client, objects(target, model))
    url = wait_ready(api_client, target.name, target.namespace, generation, timeout=timeout, poll=poll)
    log.info("InferenceService %s/%s serves %s at %s", target.namespace, target.name, model.model_id, url)
    return Deployed(url, model, version)


def command(name: str, settings, model: str | None = None, run: str | None = None, namespace: str | None = None,
            storage: str | None = None, registry: str = "", dry_run: bool = False, timeout: float = 900) -> str:
    """``pneumonia-kfp deploy``: what it prints. ``settings`` (the pipeline's platform settings) give the image and
    the store's endpoint as the cluster reaches it; the keys come from MINIO_* as for every store access here."""
    from pneumonia_kfp.service_name import check_name

    check_name(name, "--name")
    source = model if model else model_source(read_results_file(run), run)
    namespace = namespace or current_namespace()
    storage = storage or settings.storage.format(namespace=namespace)
    target = Target(name, namespace, settings.image, settings.minio.endpoint, *store_keys())
    if dry_run:  # the model is loaded (its id names its folder) but nothing is copied or applied
        return to_yaml(objects(target, publish(source, storage, dry_run=True)))
    done = deploy(source, storage, target, api_client(), registry=registry, timeout=timeout)
    return done.url + "\n"
