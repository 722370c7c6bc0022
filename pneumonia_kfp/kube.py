"""The Kubernetes API as this process finds it: in a pod its ServiceAccount and namespace, elsewhere the kube
config. The deploy step and the distributed-training launcher both start here."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pneumonia_kfp.errors import UsageError


def _kube_config_file() -> str | None:
    # read here, not at import time as the kubernetes package does, so a KUBECONFIG set later counts
    return os.environ.get("KUBECONFIG") or None


def api_client():
    """An ApiClient: in a pod its ServiceAccount, elsewhere the kube config (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    try:
        return config.new_client_from_config(config_file=_kube_config_file())
    except (config.ConfigException, OSError) as e:
        raise UsageError(f"no Kubernetes cluster configured ({e}): run in a pod, or set KUBECONFIG") from None


def current_namespace() -> str:
    """The pod's namespace in a pod; else the kube config's current context's namespace, or default."""
    pod = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if os.environ.get("KUBERNETES_SERVICE_HOST") and pod.is_file():
        return pod.read_text().strip()
    from kubernetes import config

    try:
        _, active = config.list_kube_config_contexts(config_file=_kube_config_file())
        return active["context"].get("namespace") or "default"
    except (config.ConfigException, OSError):
        return "default"


def api_error(e) -> str:
    """A kubernetes ApiException as one line: ``<status> <reason>: <the API server's message>``."""
    try:
        message = json.loads(e.body).get("message", "")
    except (TypeError, ValueError, AttributeError):  # no body, or not the API server's JSON
        message = str(e.body or "")[:300]
    message = " ".join(str(message).split())
    return f"{e.status} {e.reason}" + (f": {message}" if message else "")
