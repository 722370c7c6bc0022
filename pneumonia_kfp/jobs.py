"""The manifests of a distributed train job (settings ``nodes`` > 1): pure functions, no Kubernetes calls.

Two engines run torchrun across nodes, and a cluster has one of them:

* ``trainjob``: Kubeflow Trainer v2 (Kubeflow >= 1.11, Trainer v2.1.0), a ``TrainJob`` on the
  ``torch-distributed`` ClusterTrainingRuntime; its torch plugin sets PET_NNODES, PET_NPROC_PER_NODE,
  PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in the container named ``node``.
* ``pytorchjob``: the Training Operator v1 (Kubeflow 1.9.1 - 1.10, v1.8.1 - v1.9.2), a ``PyTorchJob``
  with a Master and N-1 Workers; it sets the same PET_* variables (and MASTER_ADDR/PORT, WORLD_SIZE,
  RANK) in the container named ``pytorch``.

torchrun reads the PET_* variables as its defaults, so both run the same image and the same command:
``torchrun --nnodes N --nproc-per-node G -m pneumonia_kfp.train_worker ...``. The worker trains with the
library's train() and rank 0 writes the model directory to the store, where the launcher
(:mod:`pneumonia_kfp.job_launcher`) picks it up.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from pneumonia_kfp.device import REQUIRE_GPU_ENV
from pneumonia_kfp.errors import PneumoniaKfpError
from pneumonia_kfp.storage import ACCESS_KEY_ENV, CREATE_BUCKET_ENV, ENDPOINT_ENV, SECRET_KEY_ENV

ENGINES = {  # engine -> (group, version, kind, plural)
    "trainjob": ("trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs"),
    "pytorchjob": ("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs"),
}
RUNTIME = "torch-distributed"  # Trainer v2's ClusterTrainingRuntime for torchrun
TRAINJOB_NODE = "node"  # the runtime's replicated job and container
PYTORCH_CONTAINER = "pytorch"  # the Training Operator finds its port and sets its env by this name
PART_OF = {"app.kubernetes.io/part-of": "pneumonia-kfp", "app.kubernetes.io/component": "train"}
# the uid of the KFP task pod that launched the job (a pod's name may exceed a label value's 63 characters)
TASK_LABEL = "pneumonia-kfp/task-pod-uid"
WORKER = "pneumonia_kfp.train_worker"


class JobError(PneumoniaKfpError):
    """A distributed train job could not be made, started or finished; the message names the job."""


@dataclass
class JobConfig:
    """What a cluster compile fixes about the job (from the platform settings); travels as JSON in the
    pipeline, so it holds names of Secrets, never their values."""

    engine: str = "auto"  # auto | trainjob | pytorchjob
    nodes: int = 2
    gpus_per_node: int = 1  # 0: CPU nodes (gloo), one process each
    accelerator: str = "nvidia.com/gpu"
    image: str = ""
    image_pull_secrets: list = field(default_factory=list)
    tolerations: list = field(default_factory=list)
    node_selector: dict = field(default_factory=dict)
    shm_size: str = "8Gi"
    requests: dict = field(default_factory=dict)  # cpu/memory of each node
    limits: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # plain variables
    secret_env: dict = field(default_factory=dict)  # variable -> [Secret name, key]

    @property
    def nproc_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobConfig":
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise JobError(f"job configuration {text[:80]!r}: {e} (compile the pipeline again)") from None


def config_from_settings(settings) -> JobConfig:
    """The job's configuration from platform settings (pipelines.settings.Settings, read by attribute
    so that this module needs no kfp): the train step's scheduling and resources, per node."""
    t, m = settings.train, settings.minio
    env = dict(settings.env)
    env[ENDPOINT_ENV] = m.endpoint
    if not m.create_bucket:
        env[CREATE_BUCKET_ENV] = "false"
    if t.accelerator_count:
        env[REQUIRE_GPU_ENV] = "1"  # as on the one-GPU train task: a GPU that CUDA cannot use fails the job
    return JobConfig(
        engine=t.distributed_engine, nodes=settings.nodes, gpus_per_node=t.accelerator_count,
        accelerator=t.accelerator, image=settings.image, image_pull_secrets=list(settings.image_pull_secrets),
        tolerations=list(t.tolerations), node_selector=dict(t.node_selector), shm_size=t.shm_size,
        requests={k: v for k, v in (("cpu", t.cpu_request), ("memory", t.memory_request)) if v},
        limits={k: v for k, v in (("cpu", t.cpu_limit), ("memory", t.memory_limit)) if v},
        env=env,
        secret_env={ACCESS_KEY_ENV: [m.secret, m.access_key_key], SECRET_KEY_ENV: [m.secret, m.secret_key_key]},
    )


def job_name(task_key: str, backbone: str) -> str:
    """A DNS-1035 label, the same for every attempt of one task (``task_key``: its model artifact's URI,
    which a KFP retry keeps) and short enough for the engines' pod and Service names."""
    slug = re.sub(r"[^a-z0-9]+", "-", backbone.lower()).strip("-")[:20].strip("-")
    return f"pkfp-{slug}-{hashlib.sha256(task_key.encode()).hexdigest()[:10]}".replace("--", "-")


def torchrun_command(config: JobConfig, worker_args: list[str]) -> list[str]:
    """One command for both engines; node rank and the master's address come from their PET_* env."""
    return ["torchrun", f"--nnodes={config.nodes}", f"--nproc-per-node={config.nproc_per_node}", "-m", WORKER,
            *worker_args]


def _env(config: JobConfig) -> list[dict]:
    env = [{"name": k, "value": str(v)} for k, v in sorted(config.env.items())]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": s, "key": key}}}
            for k, (s, key) in sorted(config.secret_env.items())]
    return env  # no PYTHONUNBUFFERED: the Training Operator adds it (twice would be a duplicate); logging flushes


def _resources(config: JobConfig) -> dict:
    limits = dict(config.limits)
    if config.gpus_per_node:
        limits[config.accelerator] = str(config.gpus_per_node)
    out = {"limits": limits} if limits else {}
    return {**out, "requests": dict(config.requests)} if config.requests else out


def _pod_scheduling(config: JobConfig) -> dict:
    """Tolerations, node selector, pull secrets and /dev/shm (PyTorch's inter-process tensors, NCCL)."""
    spec = {"volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}}]}
    if config.tolerations:
        spec["tolerations"] = [dict(t) for t in config.tolerations]
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in config.image_pull_secrets]
    return spec


SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}
# Kubeflow's profile namespaces inject an Istio sidecar into every pod: it would outlive the trainer (the pod, and
# so the job, never completes) and stand between the nodes' rendezvous; KFP keeps it off its own pods the same way
NO_SIDECAR = {"sidecar.istio.io/inject": "false"}


def _metadata(name: str, namespace: str, owner: dict | None, labels: dict) -> dict:
    meta = {"name": name, "namespace": namespace, "labels": {**PART_OF, **labels}}
    if owner:  # the task pod: when Kubernetes removes it (run deleted), the job goes too
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"],
                                    "blockOwnerDeletion": False, "controller": False}]
    return meta


def trainjob(config: JobConfig, name: str, namespace: str, command: list[str], owner: dict | None = None,
             labels: dict | None = None) -> dict:
    """A Trainer v2 TrainJob on the torch-distributed runtime."""
    trainer = {"image": config.image, "command": command, "numNodes": config.nodes,
               "numProcPerNode": config.nproc_per_node, "env": _env(config)}
    if _resources(config):
        trainer["resourcesPerNode"] = _resources(config)
    node = {"name": TRAINJOB_NODE, "volumeMounts": [SHM_MOUNT]}
    override = {"targetJobs": [{"name": TRAINJOB_NODE}], "metadata": {"annotations": dict(NO_SIDECAR)},
                "spec": {**_pod_scheduling(config), "containers": [node]}}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": _metadata(name, namespace, owner, labels or {}),
            "spec": {"runtimeRef": {"name": RUNTIME, "apiGroup": "trainer.kubeflow.org",
                                    "kind": "ClusterTrainingRuntime"},
                     "trainer": trainer, "podTemplateOverrides": [override]}}


def pytorchjob(config: JobConfig, name: str, namespace: str, command: list[str], owner: dict | None = None,
               labels: dict | None = None) -> dict:
    """A Training Operator v1 PyTorchJob: one Master (rank 0's node) and nodes - 1 Workers. A failed pod
    fails the job (no restarts inside it): the KFP task's retries rerun the whole job, which resumes
    from the last finished epoch."""
    container = {"name": PYTORCH_CONTAINER, "image": config.image, "command": command, "env": _env(config),
                 "volumeMounts": [SHM_MOUNT]}
    if _resources(config):
        container["resources"] = _resources(config)
    template = {"metadata": {"labels": {**PART_OF, **(labels or {})}, "annotations": dict(NO_SIDECAR)},
                "spec": {"containers": [container], **_pod_scheduling(config)}}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if config.nodes > 1:
        replicas["Worker"] = {"replicas": config.nodes - 1, "restartPolicy": "Never", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": _metadata(name, namespace, owner, labels or {}),
            "spec": {"nprocPerNode": str(config.nproc_per_node),
                     "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
                     "pytorchReplicaSpecs": replicas}}


MANIFESTS = {"trainjob": trainjob, "pytorchjob": pytorchjob}


def manifest(engine: str, *args, **kwargs) -> dict:
    if engine not in MANIFESTS:
        raise JobError(f"distributed engine {engine!r}: expected trainjob or pytorchjob")
    return MANIFESTS[engine](*args, **kwargs)


def rank0_selector(engine: str, name: str) -> str:
    """The label selector of the pod whose logs are rank 0's (torchrun's node 0)."""
    if engine == "trainjob":  # JobSet's labels on the torch-distributed runtime's pods
        return (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={TRAINJOB_NODE},"
                "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0")
    return f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"


def pods_selector(engine: str, name: str) -> str:
    if engine == "trainjob":
        return f"jobset.sigs.k8s.io/jobset-name={name}"
    return f"training.kubeflow.org/job-name={name}"


def container_of(engine: str) -> str:
    return TRAINJOB_NODE if engine == "trainjob" else PYTORCH_CONTAINER
