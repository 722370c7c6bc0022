"""Many nodes (settings nodes > 1): the TrainJob / PyTorchJob manifests validate against each release's CRD
schema, the compiled pipeline launches them, and the launcher's create -> wait -> delete cycle runs
against a fake Kubernetes API server (a real HTTP server answering the kubernetes client's REST calls):
success with rank 0's log, failure in one line, cancellation by SIGTERM, a job left by an earlier attempt."""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pneumonia_kfp.distributed import RESULT
from pneumonia_kfp.jobs import JobConfig, JobError, config_from_settings, job_name, manifest, torchrun_command
from pneumonia_kfp.pipelines.settings import SettingsError, load
from pneumonia_kfp.storage import ACCESS_KEY_ENV, open_store
from tests.test_kfp_compat import BACKENDS, DEGRADATIONS, PROBE, features, venv
from tests.test_kubeflow_manifests import render

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# (apiVersion, kind) -> the CRD schema of each release the manifests must satisfy
RELEASES = {
    "pytorchjob": ["pytorchjob.kubeflow.org_v1_training-operator-v1.8.1.json.gz",
                   "pytorchjob.kubeflow.org_v1_training-operator-v1.9.2.json.gz"],
    "trainjob": ["trainjob.trainer.kubeflow.org_v1alpha1_trainer-v2.1.0.json.gz"],
}
PET = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
GPU_SETTINGS = ["nodes=2", "train.accelerator_count=4", "train.node_selector={gpu: h100}",
                "image=registry.example.com/pneumonia-kfp:1", "image_pull_secrets=[regcred]"]


def schema(file: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / file).read_bytes()))


def unknown_fields(value, schema: dict, path: str) -> list[str]:
    """Keys the structural schema does not declare (what the API server's strict field validation
    rejects), also inside maps (additionalProperties: PyTorchJob's pytorchReplicaSpecs) and lists."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        known = schema["properties"]
        return [u for k, v in value.items()
                for u in (unknown_fields(v, known[k], f"{path}.{k}") if k in known else [f"{path}.{k}"])]
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [u for k, v in value.items() for u in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")]
    if isinstance(value, list) and "items" in schema:
        return [u for i, v in enumerate(value) for u in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def check(job: dict, file: str) -> None:
    """What the API server checks of a custom object: the CRD's structural schema, no unknown field
    (strict field validation), and the TrainJob's CEL rules on its name."""
    s = schema(file)
    jsonschema.validate(job["spec"], s["properties"]["spec"])
    assert unknown_fields(job["spec"], s["properties"]["spec"], "spec") == []
    if job["kind"] == "TrainJob":  # the CRD's x-kubernetes-validations on metadata.name
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
        assert len(job["metadata"]["name"]) <= 63


def build(engine: str, overrides=GPU_SETTINGS, backbone="convnext_tiny.fb_in22k") -> dict:
    config = config_from_settings(load(None, overrides, environ={}))
    config.engine = engine
    command = torchrun_command(config, ["--dataset", "s3://b/p/datasets/v1", "--backbone", backbone,
                                        "--output", "s3://b/p/jobs/x", "--params", "{}"])
    return manifest(engine, config, job_name("minio://mlpipeline/v2/artifacts/run/train/model", backbone),
                    "team-a", command, owner={"name": "run-train-pod", "uid": "1234"}, labels={"x": "y"})


def container(job: dict) -> dict:
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("engine,file", [(e, f) for e, files in RELEASES.items() for f in files])
@pytest.mark.parametrize("overrides", [GPU_SETTINGS, ["nodes=3", "train.accelerator_count=0"]], ids=["gpu", "cpu"])
def test_manifests_validate_against_each_release_schema(engine, file, overrides):
    job = build(engine, overrides)
    check(job, file)
    settings = load(None, overrides, environ={})
    gpus, nodes = settings.train.accelerator_count, settings.nodes
    c = container(job)
    env = {e["name"]: e for e in c["env"]}
    assert not PET & set(env)  # the engines set those; Trainer v2 refuses a TrainJob that sets them
    assert env[ACCESS_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "mlpipeline-minio-artifact", "key": "accesskey"}
    assert "value" not in env[ACCESS_KEY_ENV]  # a Secret by reference, never its value
    assert c["command"][:3] == ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}"]
    assert c["command"][3:5] == ["-m", "pneumonia_kfp.train_worker"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "1234"
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pneumonia-kfp"
    if engine == "trainjob":
        spec = job["spec"]
        assert spec["runtimeRef"]["name"] == "torch-distributed"
        assert (spec["trainer"]["numNodes"], spec["trainer"]["numProcPerNode"]) == (nodes, max(gpus, 1))
        limits = spec["trainer"]["resourcesPerNode"]["limits"]
        pod = spec["podTemplateOverrides"][0]["spec"]
        assert spec["podTemplateOverrides"][0]["targetJobs"] == [{"name": "node"}]
    else:
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, nodes - 1)
        assert job["spec"]["nprocPerNode"] == str(max(gpus, 1))
        assert c["name"] == "pytorch"  # the operator sets its env and port on this container only
        limits = c["resources"]["limits"]
        pod = replicas["Worker"]["template"]["spec"]
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    pod_meta = job["spec"]["podTemplateOverrides"][0]["metadata"] if engine == "trainjob" else \
        job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]
    assert pod_meta["annotations"] == {"sidecar.istio.io/inject": "false"}  # a sidecar would keep the pod running
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if gpus:
        assert pod["nodeSelector"] == {"gpu": "h100"} and pod["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("engine", sorted(RELEASES))
def test_the_schema_check_catches_a_misspelt_field(engine):
    job = build(engine)
    if engine == "trainjob":
        job["spec"]["trainer"]["numProcsPerNode"] = job["spec"]["trainer"].pop("numProcPerNode")
    else:
        job["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 1
    with pytest.raises(AssertionError):
        check(job, RELEASES[engine][-1])
    job = build(engine)
    job["spec"]["runPolicy" if engine == "pytorchjob" else "trainer"]["backoffLimit" if engine == "pytorchjob"
                                                                       else "numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        check(job, RELEASES[engine][-1])


def test_torchrun_and_the_worker_accept_the_command():
    from torch.distributed.run import get_args_parser

    from pneumonia_kfp.train_worker import main

    config = JobConfig(nodes=2, gpus_per_node=8)
    command = torchrun_command(config, ["--dataset", "s3://b/d", "--backbone", "resnet18", "--output", "s3://b/o"])
    args = get_args_parser().parse_args(command[1:])
    assert (args.nnodes, args.nproc_per_node, args.module, args.training_script) == ("2", "8", True,
                                                                                      "pneumonia_kfp.train_worker")
    with pytest.raises(SystemExit) as exit_:  # the worker's own parser: it knows every flag given
        main(args.training_script_args + ["--help"])
    assert exit_.value.code == 0


def test_job_names_are_per_task_and_valid():
    backbone = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    a = job_name("minio://mlpipeline/v2/artifacts/run-1/train/model", backbone)
    assert a == job_name("minio://mlpipeline/v2/artifacts/run-1/train/model", backbone)  # a retry: the same name
    assert a != job_name("minio://mlpipeline/v2/artifacts/run-2/train/model", backbone)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 40


def test_settings_for_many_nodes():
    assert load(None, ["nodes=2", "train.accelerator_count=8"], environ={}).train.accelerator_count == 8
    # one node with several GPUs: the train task runs one torchrun rank per GPU (pneumonia_kfp.distributed)
    assert load(None, ["train.accelerator_count=2"], environ={}).train.accelerator_count == 2
    for bad, key in ((["nodes=0"], "nodes"), (["train.distributed_engine=mpi"], "train.distributed_engine"),
                     (["train.accelerator_count=-1"], "train.accelerator_count")):
        with pytest.raises(SettingsError, match=re.escape(key)):
            load(None, bad, environ={})


def test_the_pipeline_launches_a_job_when_nodes_exceed_one(tmp_path):
    from pneumonia_kfp.pipelines.cli import main

    target = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(target), "--set", "nodes=2", "--set", "train.accelerator_count=4",
                 "--set", "train.distributed_engine=pytorchjob"]) == 0
    ir, platform = [d for d in yaml.safe_load_all(target.read_text()) if d]
    tasks = ir["components"]["comp-train-and-evaluate"]["dag"]["tasks"]
    tasks = ir["components"][tasks["for-loop-1"]["componentRef"]["name"]]["dag"]["tasks"]
    assert "train-op" not in tasks
    launch = tasks["train-distributed-op"]
    config = JobConfig.from_json(launch["inputs"]["parameters"]["job"]["runtimeValue"]["constant"])
    assert (config.engine, config.nodes, config.gpus_per_node) == ("pytorchjob", 2, 4)
    assert launch["retryPolicy"]["maxRetryCount"] == 2  # a retry reruns the job, resuming after the last epoch
    assert tasks["evaluate-op"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == \
        "train-distributed-op"
    executor = ir["deploymentSpec"]["executors"]["exec-train-distributed-op"]["container"]
    assert "accelerator" not in executor["resources"]  # the GPUs are the job's, not the launcher's
    assert (executor["resources"]["resourceCpuLimit"], executor["resources"]["resourceMemoryLimit"]) == ("1", "2Gi")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-distributed-op"]
    assert "tolerations" not in k8s and k8s["secretAsEnv"]  # the store's keys: it copies the model back


# --- the launcher against a fake API server ---------------------------------------------------------------

KINDS = {"trainer.kubeflow.org/v1alpha1": ("TrainJob", "trainjobs"), "kubeflow.org/v1": ("PyTorchJob", "pytorchjobs")}


def cond(*types: str, reason: str = "", message: str = "") -> list[dict]:
    return [{"type": t, "status": "True", "reason": reason if t == types[-1] else "", "message":
             message if t == types[-1] else ""} for t in types]


def pod(name: str, labels: dict, phase: str = "Running", terminated: dict | None = None) -> dict:
    state = {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": name, "labels": labels}, "status": {"phase": phase, "containerStatuses": [
        {"name": "pytorch", "ready": phase == "Running", "restartCount": 0, "image": "i", "imageID": "",
         "state": state}]}}


class FakeApiServer(ThreadingHTTPServer):
    """The calls the launcher makes: API discovery, custom objects (create, get, delete) and pods (list,
    log). Each read of the job moves it one step along ``script`` (lists of status conditions); when it
    reaches Succeeded/Complete, ``on_success`` plays rank 0 (writes the model to the job's --output)."""

    def __init__(self, served, script, pods=(), log=b"", existing=None, on_success=None, create_status=201):
        super().__init__(("127.0.0.1", 0), Handler)
        self.served, self.script, self.pods, self.log = set(served), script, list(pods), log
        self.jobs = {existing["metadata"]["name"]: existing} if existing else {}
        self.on_success, self.create_status = on_success, create_status
        self.calls, self.created, self.reads, self.lock = [], [], 0, threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def client(self):
        from kubernetes import client

        c = client.Configuration()
        c.host = self.url
        return client.ApiClient(c)

    def conditions(self, job: dict) -> list[dict]:
        conditions = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        if conditions and conditions[-1]["type"] in ("Succeeded", "Complete") and self.on_success:
            self.on_success(job)
            self.on_success = None
        return conditions

    def pod_log(self) -> bytes:
        return self.log

    def methods(self) -> list[str]:
        return [f"{m} {p.split('?')[0].rsplit('/', 1)[-1]}" for m, p in self.calls if "/pods" not in p]


class Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, *args):
        pass

    def reply(self, status: int, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def status(self, code: int, reason: str, message: str):
        self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})

    def route(self, method: str):
        s = self.server
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        with s.lock:
            s.calls.append((method, self.path))
        if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"]:
            return self.pods(parts, parse_qs(url.query))
        group_version = "/".join(parts[1:3])
        if group_version not in s.served:
            return self.status(404, "NotFound", "the server could not find the requested resource")
        kind, plural = KINDS[group_version]
        if len(parts) == 3:  # discovery
            return self.reply(200, {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
                {"name": plural, "singularName": "", "namespaced": True, "kind": kind, "verbs": ["create", "get"]}]})
        name = parts[6] if len(parts) > 6 else None
        if method == "POST":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["metadata"]["name"] in s.jobs:
                return self.status(409, "AlreadyExists", f'{plural} "{body["metadata"]["name"]}" already exists')
            if s.create_status != 201:
                return self.status(s.create_status, "Forbidden", f"cannot create resource {plural!r}")
            s.jobs[body["metadata"]["name"]] = body
            s.created.append(body)
            return self.reply(201, body)
        if name not in s.jobs:
            return self.status(404, "NotFound", f'{plural} "{name}" not found')
        if method == "DELETE":
            return self.reply(200, s.jobs.pop(name))
        job = s.jobs[name]
        if "status" not in job or job["status"].get("fake") is not False:  # a job this server runs
            job["status"] = {"conditions": s.conditions(job)}
        return self.reply(200, job)

    def pods(self, parts, query):
        if parts[-1] == "log":
            return self.reply(200, self.server.pod_log(), "text/plain")
        wanted = dict(kv.split("=") for kv in query.get("labelSelector", [""])[0].split(",") if kv)
        items = [p for p in self.server.pods if wanted.items() <= p["metadata"]["labels"].items()]
        self.reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")


CONFIG = JobConfig(engine="auto", nodes=2, gpus_per_node=0, image="registry.example.com/pneumonia-kfp:1").to_json()


def write_model(job: dict) -> None:
    """Rank 0's part: the model directory and job-result.json, at the job's --output."""
    command = (job["spec"].get("trainer") or job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
               ["containers"][0])["command"]
    store = open_store(command[command.index("--output") + 1])
    store.put_bytes("checkpoint.pt", b"weights")
    store.put_bytes("triton/m/config.pbtxt", b"name: m")
    store.put_bytes(RESULT, json.dumps({"backbone": "resnet18", "best_epoch": 2}).encode())


@pytest.fixture
def dataset(tmp_path):
    return f"file://{tmp_path}/store/datasets/v1"


def run(server, dataset, tmp_path, **kwargs):
    from pneumonia_kfp.job_launcher import run_training_job

    out = _Out()
    meta = run_training_job(CONFIG, dataset, "resnet18", str(tmp_path / "model"), "task-1", {"epochs": 2},
                            client=server.client(), namespace="team-a", poll=0.01, out=out, **kwargs)
    return meta, out.text


class _Out:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


MASTER = {"training.kubeflow.org/job-name": job_name("task-1", "resnet18"),
          "training.kubeflow.org/replica-type": "master"}


def test_success_streams_rank0_log_and_brings_the_model_back(dataset, tmp_path):
    worker = {**MASTER, "training.kubeflow.org/replica-type": "worker"}
    server = FakeApiServer({"kubeflow.org/v1"}, [cond("Created"), cond("Created", "Running"),
                                                 cond("Created", "Running"), cond("Created", "Running", "Succeeded")],
                           pods=[pod("j-worker-0", worker), pod("j-master-0", MASTER)],
                           log=b"epoch 1/2 val_auc 0.9\nepoch 2/2 val_auc 0.95", on_success=write_model)
    meta, text = run(server, dataset, tmp_path)
    assert meta == {"backbone": "resnet18", "best_epoch": 2}
    assert (tmp_path / "model" / "checkpoint.pt").read_bytes() == b"weights"
    assert (tmp_path / "model" / "triton" / "m" / "config.pbtxt").exists()
    assert list(open_store(f"file://{tmp_path}/store/jobs").list()) == []  # the store's copy is removed
    name = job_name("task-1", "resnet18")
    assert "[j-master-0] epoch 2/2 val_auc 0.95" in text and "j-worker-0" not in text  # rank 0's log only
    assert f"PyTorchJob team-a/{name}: Created -> Running -> Succeeded" in text
    assert server.methods()[:2] == ["GET v1alpha1", "GET v1"]  # auto: TrainJob asked first, PyTorchJob served
    assert [m for m in server.methods() if m.startswith(("POST", "DELETE"))] == ["POST pytorchjobs",
                                                                                 f"DELETE {name}"]
    assert "propagationPolicy=Foreground" in [p for m, p in server.calls if m == "DELETE"][0]
    assert server.jobs == {}


def test_failure_is_one_line_naming_the_job_and_the_pods_reason(dataset, tmp_path):
    name = job_name("task-1", "resnet18")
    rank0 = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
             "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": "0"}
    oom = pod(f"{name}-node-0-1-abcde", {**rank0, "batch.kubernetes.io/job-completion-index": "1"}, "Failed",
              {"exitCode": 137, "reason": "OOMKilled"})
    # the engine's message and the pod's termination message (the log's tail) may span lines
    server = FakeApiServer({"trainer.kubeflow.org/v1alpha1", "kubeflow.org/v1"},
                           [[], cond("Failed", reason="FailedJobs", message="jobset failed:\nnode-0 failed")],
                           pods=[pod(f"{name}-node-0-0-xyz", rank0, "Failed", {"exitCode": 1, "reason": "Error",
                                                                              "message": "Traceback\n  x\nError: y\n"}),
                                 oom])
    with pytest.raises(JobError) as e:
        run(server, dataset, tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"distributed training job TrainJob team-a/{name} failed: FailedJobs jobset failed")
    assert "node-0-0-xyz: Error (exit 1), Traceback x Error: y" in message  # the first failed pod and its reason
    assert server.methods()[-1] == f"DELETE {name}" and server.jobs == {}  # TrainJob preferred when both served


def test_a_pod_that_cannot_start_fails_the_task(dataset, tmp_path):
    """An image that cannot be pulled leaves the job Created forever (neither engine fails it): the task fails."""
    stuck = pod("j-master-0", MASTER, "Pending")
    stuck["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ImagePullBackOff",
                                                                   "message": 'Back-off pulling image "i:1"'}}
    server = FakeApiServer({"kubeflow.org/v1"}, [cond("Created")], pods=[stuck])
    with pytest.raises(JobError, match=r"cannot start: j-master-0: ImagePullBackOff, Back-off pulling image"):
        run(server, dataset, tmp_path)
    assert server.jobs == {}


def test_a_job_of_an_earlier_attempt_is_replaced(dataset, tmp_path):
    """409 on create: the name is per task, so the job is an earlier attempt of this one; replaced, not reused."""
    name = job_name("task-1", "resnet18")
    old = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name, "labels": {
        "app.kubernetes.io/part-of": "pneumonia-kfp", "app.kubernetes.io/component": "train"}},
           "spec": {}, "status": {"fake": False, "conditions": cond("Created", "Running")}}
    server = FakeApiServer({"kubeflow.org/v1"}, [cond("Created", "Running", "Succeeded")], existing=old,
                           on_success=write_model)
    meta, text = run(server, dataset, tmp_path)
    assert meta["best_epoch"] == 2 and "exists (an earlier attempt of this task): replacing it" in text
    assert [m for m in server.methods() if m.startswith(("POST", "DELETE"))] == [
        "POST pytorchjobs", f"DELETE {name}", "POST pytorchjobs", f"DELETE {name}"]


def test_a_job_not_ours_is_left_alone_and_rbac_is_named(dataset, tmp_path):
    name = job_name("task-1", "resnet18")
    theirs = {"metadata": {"name": name, "labels": {}}, "spec": {}, "status": {"fake": False}}
    server = FakeApiServer({"kubeflow.org/v1"}, [[]], existing=theirs)
    with pytest.raises(JobError, match="pneumonia-kfp did not create it"):
        run(server, dataset, tmp_path)
    assert name in server.jobs and not [m for m, _ in server.calls if m == "DELETE" and name in _]
    with pytest.raises(JobError, match=r"creating PyTorchJob .*403 Forbidden.*manifests/distributed-training"):
        run(FakeApiServer({"kubeflow.org/v1"}, [[]], create_status=403), dataset, tmp_path)
    with pytest.raises(JobError, match="serves neither"):
        run(FakeApiServer(set(), [[]]), dataset, tmp_path)


def test_sigterm_deletes_the_job(dataset, tmp_path):
    """The task cancelled (KFP terminates the pod: SIGTERM): the launcher deletes the running job."""
    server = FakeApiServer({"kubeflow.org/v1"}, [cond("Created", "Running")])
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": "team-a"}}]}))
    script = ("import sys; from pneumonia_kfp.job_launcher import run_training_job; "
              "run_training_job(sys.argv[1], sys.argv[2], 'resnet18', sys.argv[3], 'task-1', {}, poll=0.05)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(kubeconfig), KFP_POD_NAME="run-1-system-container-impl-42", KFP_POD_UID="uid-42")
    proc = subprocess.Popen([sys.executable, "-c", script, CONFIG, dataset, str(tmp_path / "model")],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while server.reads < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert server.reads >= 3, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Stopped: SIGTERM" in stderr
    name = job_name("task-1", "resnet18")
    assert server.jobs == {} and f"DELETE {name}" in server.methods()
    assert f"deleted PyTorchJob team-a/{name}" in stdout
    [job] = server.created  # in the kubeconfig's namespace, owned by the task pod KFP names in the environment
    assert job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "uid": "uid-42",
                                                   "name": "run-1-system-container-impl-42",
                                                   "blockOwnerDeletion": False, "controller": False}]
    assert job["metadata"]["labels"]["pneumonia-kfp/task-pod-uid"] == "uid-42"


def test_rbac_lets_the_pipeline_runner_launch_and_nothing_more():
    for path, namespace, account in (("distributed-training/kubeflow", "kubeflow-user-example-com", "default-editor"),
                                     ("distributed-training/standalone", "kubeflow", "pipeline-runner")):
        objects = render(path)
        for o in objects:
            kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)
            assert o["metadata"]["namespace"] == namespace
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pneumonia-kfp"
        role = next(o for o in objects if o["kind"] == "Role")
        granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                   for v in rule["verbs"]}
        jobs = {("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs")}
        assert granted == {(g, r, v) for g, r in jobs for v in ("create", "get", "list", "watch", "delete")} | {
            ("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
        binding = next(o for o in objects if o["kind"] == "RoleBinding")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]


class LocalEngine(FakeApiServer):
    """A PyTorchJob that really runs: each node's container command as a process on this machine, with the
    environment the Training Operator gives it (PET_NODE_RANK, PET_MASTER_ADDR/PORT, WORLD_SIZE, RANK ...)
    and the manifest's own variables; Running while they run, then Succeeded or Failed by their exit codes."""

    def __init__(self, rank0_log: Path):
        super().__init__({"kubeflow.org/v1"}, [[]], pods=[pod("job-master-0", MASTER)])
        self.procs: list[subprocess.Popen] = []
        self.rank0_log = rank0_log

    def start(self, job: dict) -> None:
        from tests.conftest import free_port

        spec = job["spec"]["pytorchReplicaSpecs"]
        nodes = sum(r["replicas"] for r in spec.values())
        container = spec["Master"]["template"]["spec"]["containers"][0]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})  # the store is a file://
        port = str(free_port())
        command = [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:]]
        for rank in range(nodes):
            pet = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PET_MASTER_ADDR": "127.0.0.1",
                   "PET_MASTER_PORT": port, "WORLD_SIZE": str(nodes * int(job["spec"]["nprocPerNode"])),
                   "RANK": str(rank), "PET_NODE_RANK": str(rank), "PET_NNODES": str(nodes),
                   "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"]}
            with open(self.rank0_log if rank == 0 else os.devnull, "wb") as out:
                self.procs.append(subprocess.Popen(command, env={**env, **pet}, stdout=out, stderr=subprocess.STDOUT))

    def conditions(self, job: dict) -> list[dict]:
        if not self.procs:
            self.start(job)
        codes = [p.poll() for p in self.procs]
        if None in codes:
            return cond("Created", "Running")
        if any(codes):
            return cond("Created", "Running", "Failed", reason="PyTorchJobFailed", message=f"exit codes {codes}")
        return cond("Created", "Running", "Succeeded")

    def pod_log(self) -> bytes:
        while any(p.poll() is None for p in self.procs):  # follow=True: the log ends when the container does
            time.sleep(0.1)
        return self.rank0_log.read_bytes()


def test_the_jobs_command_trains_across_two_local_nodes(tmp_path):
    """The launch as far as this machine goes: the PyTorchJob's command, run as two CPU "nodes" under the
    environment the engine sets, trains, exports and hands the model back to the launcher."""
    from pneumonia_kfp.ingest import ingest
    from pneumonia_kfp.job_launcher import run_training_job

    server = LocalEngine(tmp_path / "rank0.log")
    uri = ingest(str(make_folder(tmp_path)), (tmp_path / "store").as_uri(), image_size=32)["uri"]

    out = _Out()
    config = JobConfig(engine="pytorchjob", nodes=2, gpus_per_node=0, image="i:1", env={"PYTHONHASHSEED": "0"})
    meta = run_training_job(config.to_json(), uri, "resnet18", str(tmp_path / "model"), "task-1",
                            {"epochs": 1, "batch_size": 16, "seed": 0}, client=server.client(), namespace="team-a",
                            poll=0.2, out=out)
    assert [p.returncode for p in server.procs] == [0, 0], out.text
    assert meta["backbone"] == "resnet18" and meta["best_epoch"] == 1 and "onnx" in str(meta["formats"])
    assert {"checkpoint.pt", "model.onnx", "model.pt2", "metadata.json"} <= {
        p.name for p in (tmp_path / "model").iterdir()}
    assert "rank 0" in out.text and "PyTorchJob team-a/" in out.text and "Succeeded" in out.text
    assert server.jobs == {}


def make_folder(tmp_path):
    from pneumonia_kfp.synthetic import make_synthetic

    return make_synthetic(tmp_path / "xray", {"train": 24, "test": 8}, size=48)


@pytest.fixture(scope="module")
def distributed_pipeline(tmp_path_factory) -> Path:
    from pneumonia_kfp.pipelines.cli import main

    target = tmp_path_factory.mktemp("nodes") / "pipeline.yaml"
    assert main(["compile", "-o", str(target), "--set", "nodes=2", "--set", "train.accelerator_count=8"]) == 0
    return target


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_many_node_pipeline_is_still_one_yaml_for_every_backend(backend, distributed_pipeline):
    """tests/test_kfp_compat.py's strict parse with each backend's protos, on the nodes=2 compile; what degrades
    is what degrades in the default compile (retries inside the ParallelFor before 2.14)."""
    result = subprocess.run([str(venv(backend) / "bin" / "python"), "-c", PROBE, str(distributed_pipeline)],
                            capture_output=True, text=True, check=True)
    probe = json.loads(result.stdout)
    assert (probe["ir"], probe["platform"]) == (None, None)
    assert {name: e for name, e in probe["executors"].items() if e} == {}
    ir = next(yaml.safe_load_all(distributed_pipeline.read_text()))
    found = features(ir)
    assert set(found) <= set(DEGRADATIONS) and found["retry_inside_sub_dag"] == ["train-distributed-op"]


def test_an_api_error_is_one_line_with_the_servers_message():
    from kubernetes.client.exceptions import ApiException

    from pneumonia_kfp.kube import api_error

    def error(status, reason, body):
        e = ApiException(status=status, reason=reason)
        e.body = body
        return api_error(e)

    assert error(403, "Forbidden", json.dumps({"message": "pods is forbidden:\n  no"})) == \
        "403 Forbidden: pods is forbidden: no"
    assert error(502, "Bad Gateway", "<html>\nproxy down</html>") == "502 Bad Gateway: <html> proxy down</html>"
    assert error(500, "Internal Server Error", None) == "500 Internal Server Error"
