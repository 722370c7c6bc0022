"""Launch a distributed train job (pneumonia_kfp.jobs) from a KFP task, follow it, bring its model back.

The cycle, with the ``kubernetes`` client against the cluster's API server:

1. the engine: the configured one, or (``auto``) the one the API server serves, TrainJob first;
2. create the job in the task pod's namespace, owned by the task pod and labelled with it. The name is
   the same for every attempt of one task, so a 409 means an earlier attempt's job is still there:
   it is *replaced* (deleted, waited for, created again), never reused -- the launcher that watched it
   is gone and so is what it knew, and a new job resumes from the last finished epoch (resume.py), so
   at most one epoch is redone. A job of that name that pneumonia-kfp did not make is left alone (error);
3. poll its status conditions (Created, Running, Restarting / Succeeded, Complete, Failed), printing
   each change, and stream the rank-0 pod's log into the task's log;
4. on failure: one line naming the job and the failing pod's reason (OOMKilled, Error, exit code);
5. always (finished, failed, or the task stopped by SIGTERM/SIGINT): delete the job and its pods.

Then the model directory rank 0 wrote to the store is copied to the task's model artifact.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from pneumonia_kfp.distributed import RESULT
from pneumonia_kfp.jobs import (
    ENGINES,
    PART_OF,
    TASK_LABEL,
    JobConfig,
    JobError,
    container_of,
    job_name,
    manifest,
    pods_selector,
    rank0_selector,
    torchrun_command,
)
from pneumonia_kfp.kube import api_client, api_error, current_namespace
from pneumonia_kfp.procs import stop_signals_raise
from pneumonia_kfp.storage import storage_root

SUCCEEDED, FAILED = {"Succeeded", "Complete"}, "Failed"
# a pod waiting for one of these will not start by itself (neither engine fails the job for it): fail the task
STUCK = ("ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
FAILED_WAITING = STUCK + ("ErrImagePull", "CrashLoopBackOff")
RBAC_HINT = ("give the pipeline's ServiceAccount the Role in manifests/distributed-training "
             "(README: Many GPUs and nodes)")


def resolve_engine(engine: str, client) -> str:
    """``engine``, or for ``auto`` the one whose kind the API server serves (TrainJob preferred)."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    if engine != "auto":
        return engine
    api = CustomObjectsApi(client)
    for candidate, (group, version, _, plural) in ENGINES.items():
        try:
            resources = api.get_api_resources(group, version)
        except ApiException as e:
            if e.status == 404:
                continue
            raise JobError(f"asking the API server for {group}/{version}: {api_error(e)}") from None
        if any(r.name == plural for r in resources.resources):
            return candidate
    raise JobError("nodes > 1 needs Kubeflow Trainer v2 (TrainJob) or the Training Operator (PyTorchJob), and this "
                   "cluster serves neither: install one, or set nodes=1")


class Job:
    """One job of ``engine`` in ``namespace``: create, conditions, failure reason, logs, delete."""

    def __init__(self, client, engine: str, namespace: str, name: str, out=sys.stdout):
        from kubernetes.client import CoreV1Api, CustomObjectsApi

        self.engine, self.namespace, self.name, self.out = engine, namespace, name, out
        self.group, self.version, self.kind, self.plural = ENGINES[engine]
        self.api, self.core = CustomObjectsApi(client), CoreV1Api(client)
        self.logs: threading.Thread | None = None
        self.created = False  # only a job this launcher created is ever deleted
        self._lock = threading.Lock()

    def __str__(self):
        return f"{self.kind} {self.namespace}/{self.name}"

    def say(self, line: str) -> None:
        with self._lock:
            self.out.write(line.rstrip("\n") + "\n")
            self.out.flush()

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(self.group, self.version, self.namespace, self.plural, *args, **kwargs)
        except ApiException as e:
            hint = f"; {RBAC_HINT}" if e.status == 403 else ""
            raise JobError(f"{what} {self}: {api_error(e)}{hint}") from None

    def get(self) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(self.group, self.version, self.namespace, self.plural,
                                                         self.name)
        except ApiException as e:
            if e.status == 404:
                return None
            hint = f"; {RBAC_HINT}" if e.status == 403 else ""
            raise JobError(f"reading {self}: {api_error(e)}{hint}") from None

    def create(self, body: dict, poll: float) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.create_namespaced_custom_object(self.group, self.version, self.namespace, self.plural, body)
        except ApiException as e:
            if e.status != 409:
                hint = f"; {RBAC_HINT}" if e.status == 403 else ""
                raise JobError(f"creating {self}: {api_error(e)}{hint}") from None
            self.replace(body, poll)
        self.created = True
        self.say(f"created {self}")

    def replace(self, body: dict, poll: float) -> None:
        """The job of this name is an earlier attempt of this task (see the module's docstring): delete it,
        wait until it and its pods are gone, create it again."""
        old = self.get()
        labels = (old or {}).get("metadata", {}).get("labels", {})
        if old is not None and not PART_OF.items() <= labels.items():
            raise JobError(f"{self} exists and pneumonia-kfp did not create it (no {PART_OF} labels): delete it "
                           "or rename it; it is left alone")
        self.say(f"{self} exists (an earlier attempt of this task): replacing it")
        self.delete()
        while self.get() is not None:
            time.sleep(poll)
        self._call("creating", self.api.create_namespaced_custom_object, body)

    def delete(self) -> None:
        """Delete the job and (foreground) its pods; nothing when it is already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(self.group, self.version, self.namespace, self.plural,
                                                     self.name, propagation_policy="Foreground")
        except ApiException as e:
            if e.status != 404:
                raise JobError(f"deleting {self}: {api_error(e)}") from None

    def state(self) -> tuple[list[str], dict | None]:
        """The types of its true conditions, in order, and the last of them."""
        job = self.get()
        if job is None:
            raise JobError(f"{self} disappeared while it ran (deleted by someone else?)")
        true = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        return [c["type"] for c in true], (true[-1] if true else None)

    def pods(self, selector: str) -> list:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        except ApiException as e:
            self.say(f"cannot list the pods of {self}: {api_error(e)}")
            return []

    def failing_pod(self, waiting: tuple[str, ...] = FAILED_WAITING, exited: bool = True) -> str:
        """``pod: reason (exit N)`` of the first failed container among the job's pods (``exited``), or
        the first waiting for one of the ``waiting`` reasons; '' when none."""
        for pod in self.pods(pods_selector(self.engine, self.name)):
            for status in (pod.status.container_statuses or []) if pod.status else []:
                term = status.state.terminated if status.state else None
                wait = status.state.waiting if status.state else None
                if exited and term is not None and term.exit_code:
                    return f"{pod.metadata.name}: {term.reason or 'Error'} (exit {term.exit_code})" + (
                        f", {term.message.strip()}" if term.message else "")
                if wait is not None and wait.reason in waiting:
                    return f"{pod.metadata.name}: {wait.reason}" + (f", {wait.message}" if wait.message else "")
            if exited and pod.status and pod.status.phase == "Failed" and pod.status.reason:  # evicted, deadline
                return f"{pod.metadata.name}: {pod.status.reason}"
        return ""

    def follow_logs(self) -> None:
        """Once rank 0's pod runs: copy its log, line by line, into ours (a daemon thread)."""
        if self.logs is not None:
            return
        ready = [p for p in self.pods(rank0_selector(self.engine, self.name))
                 if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
        if ready:
            self.logs = threading.Thread(target=self._copy_log, args=(ready[0].metadata.name,), daemon=True)
            self.logs.start()

    def _copy_log(self, pod: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, container=container_of(self.engine),
                                                         follow=True, _preload_content=False)
            buffer = b""
            for chunk in response.stream(64 * 1024):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.say(f"[{pod}] {line.decode(errors='replace')}")
            if buffer:
                self.say(f"[{pod}] {buffer.decode(errors='replace')}")
        except (ApiException, OSError) as e:  # logs are a convenience: the job's outcome does not depend on them
            self.say(f"[{pod}] log not available: {e}")

    def wait(self, poll: float, log_grace: float = 30.0) -> None:
        """Until the job succeeds (returns) or fails (JobError naming the failing pod's reason)."""
        seen: list[str] = []
        while True:
            types, last = self.state()
            if types != seen:
                seen = types
                self.say(f"{self}: {' -> '.join(types) or 'submitted'}")
            self.follow_logs()
            if last is not None and (last["type"] in SUCCEEDED or last["type"] == FAILED):
                break
            stuck = self.failing_pod(STUCK, exited=False)
            if stuck:
                raise JobError(" ".join(f"distributed training job {self} cannot start: {stuck}".split()))
            time.sleep(poll)
        self.follow_logs()
        if self.logs is not None:
            self.logs.join(log_grace)  # the last lines before the verdict
        if last["type"] == FAILED:
            message = " ".join(str(last.get(k) or "") for k in ("reason", "message")).strip()
            pod = self.failing_pod()
            text = f"distributed training job {self} failed: {message or 'no reason given'}"
            text += f"; {pod}" if pod else ""
            raise JobError(" ".join(text.split()))  # one line, whatever the engine's or the pod's message holds


def run_training_job(config_json: str, dataset_uri: str, backbone: str, model_dir: str, task_key: str,
                     params: dict, client=None, namespace: str | None = None, poll: float = 10.0,
                     out=sys.stdout) -> dict:
    """Train ``backbone`` as a distributed job; the model directory lands in ``model_dir``. Returns the
    model artifact's metadata (what the one-GPU train component records). ``task_key``: the same for
    every attempt of the task (its model artifact's URI); ``namespace``: the task pod's, by default."""
    from pneumonia_kfp.storage import open_store

    config = JobConfig.from_json(config_json)
    client = client or api_client()
    engine = resolve_engine(config.engine, client)
    name = job_name(task_key, backbone)
    output = f"{storage_root(dataset_uri)}/jobs/{name}"  # beside the datasets and checkpoints
    store = open_store(output)
    for key in list(store.list()):  # an earlier attempt's model is not this one's
        store.delete(key)
    command = torchrun_command(config, ["--dataset", dataset_uri, "--backbone", backbone, "--output", output,
                                        "--params", json.dumps(params, sort_keys=True)])
    owner = {"name": os.environ["KFP_POD_NAME"], "uid": os.environ["KFP_POD_UID"]} \
        if os.environ.get("KFP_POD_UID") else None  # KFP sets both in every task pod
    body = manifest(engine, config, name, namespace or current_namespace(), command, owner=owner,
                    labels={TASK_LABEL: owner["uid"]} if owner else {})
    job = Job(client, engine, body["metadata"]["namespace"], name, out=out)
    with stop_signals_raise():
        try:
            job.create(body, poll)
            job.wait(poll)
        finally:  # finished, failed or stopped: the job and its pods go
            if job.created:
                job.delete()
                job.say(f"deleted {job}")
    keys = set(store.list())
    if RESULT not in keys:
        raise JobError(f"{job} succeeded but rank 0 wrote no model to {output}")
    for key in sorted(keys - {RESULT}):
        store.get_file(key, Path(model_dir) / key)
    metadata = json.loads(store.get_bytes(RESULT))
    for key in keys:
        store.delete(key)
    return metadata
