"""``pneumonia-kfp submit``: one run of a compiled pipeline on a Kubeflow Pipelines cluster (kfp.Client).

Everything that can be checked before the run exists is checked first, each failure one line:
parameters against the pipeline's own input definitions, then the host and the credentials with a
single health request (kfp.Client itself would retry a refused login for half a minute).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import yaml

from pneumonia_kfp.errors import PneumoniaKfpError

# parameters the pods read from: a path on this machine means nothing on the cluster
CLUSTER_URI_PARAMS = ("data", "storage")
# kfp's wait_for_run_completion knows no CANCELED and would wait for a cancelled run until its timeout
FINISHED = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")


class SubmitError(PneumoniaKfpError):
    """The run could not be submitted or did not succeed; the message says why, without credentials."""


def pipeline_inputs(package: str | os.PathLike) -> dict[str, dict]:
    """The compiled pipeline's parameters: name -> {parameterType, defaultValue?, isOptional?}."""
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def _typed(name: str, kind: str, text: str):
    def fail(expected: str):
        raise SubmitError(f"--param {name}={text}: {name} takes {expected}")

    if kind == "STRING":
        return text
    if kind == "NUMBER_INTEGER":
        try:
            return int(text)
        except ValueError:
            fail("an integer")
    if kind == "NUMBER_DOUBLE":
        try:
            return float(text)
        except ValueError:
            fail("a number")
    if kind == "BOOLEAN":
        if text.lower() not in ("true", "false"):
            fail("true or false")
        return text.lower() == "true"
    if kind == "LIST":
        if not text.lstrip().startswith("["):
            return [item.strip() for item in text.split(",") if item.strip()]  # a,b,c
        value = _json(text)
        return value if isinstance(value, list) else fail("a list: a,b,c or a JSON list")
    if kind == "STRUCT":
        value = _json(text)
        return value if isinstance(value, dict) else fail("a JSON object")
    fail(f"a {kind} (not supported on the command line)")


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_params(items: list[str], inputs: dict[str, dict], storage: str | None = None) -> dict:
    """``key=value`` strings -> typed arguments, checked against the pipeline's inputs; ``storage``
    (the settings' default store of this namespace) when no ``storage=`` is given."""
    params = {"storage": storage} if storage and "storage" in inputs else {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise SubmitError(f"--param {item!r}: expected KEY=VALUE, e.g. epochs=10")
        if name not in inputs:
            raise SubmitError(f"--param {name}: unknown parameter; the pipeline takes {', '.join(sorted(inputs))}")
        params[name] = _typed(name, inputs[name]["parameterType"], text)
    missing = [n for n, d in inputs.items() if n not in params and "defaultValue" not in d and not d.get("isOptional")]
    if missing:
        raise SubmitError(f"missing --param {', '.join(f'{n}=...' for n in sorted(missing))} (no default)")
    for name in CLUSTER_URI_PARAMS:
        value = params.get(name)
        if isinstance(value, str) and urlparse(value).scheme in ("", "file"):
            raise SubmitError(f"--param {name}={value}: a path on this machine; the cluster's pods cannot read it, "
                              "use s3://bucket/prefix")
    return params


def sa_token_path() -> str:
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    return os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH


def check_host(host: str, token: str | None, timeout: float = 10) -> None:
    """One GET of /apis/v2beta1/healthz: the host answers, speaks the KFP API and takes the credentials."""
    import certifi
    import urllib3

    http = urllib3.PoolManager(ca_certs=certifi.where(), retries=False, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = http.request("GET", f"{host}/apis/v2beta1/healthz", headers=headers, redirect=False)
    except urllib3.exceptions.HTTPError as e:  # retries=False: the cause itself, never a MaxRetryError wrapping it
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {host} ({type(e).__name__}); check --host, "
                          "e.g. http://localhost:8080 after kubectl port-forward svc/ml-pipeline-ui 8080:80") from None
    if r.status in (401, 403):
        raise SubmitError(_auth_failed(host, r.status, token))
    if 300 <= r.status < 400:
        raise SubmitError(f"{host} redirected the API request (HTTP {r.status}, to a login page?): "
                          "authenticate with --token")
    if r.status != 200:
        raise SubmitError(f"{host} is not a Kubeflow Pipelines API: GET /apis/v2beta1/healthz answered HTTP {r.status}")


def _auth_failed(host: str, status: int, token: str | None) -> str:
    how = "the token was refused" if token else "no token was sent: pass --token, or run in-cluster with a " \
        f"ServiceAccount token at {sa_token_path()}"
    return f"{host} refused the request (HTTP {status}): {how}"


def _api_error(host: str, e, token: str | None) -> str:
    if e.status in (401, 403):
        return _auth_failed(host, e.status, token)
    try:
        body = json.loads(e.body)
        detail = body.get("message") or body.get("error") or ""
    except (TypeError, ValueError, AttributeError):
        detail = ""
    detail = str(detail).strip().splitlines()[0][:300] if detail else (e.reason or "")
    return f"{host} answered HTTP {e.status}: {detail}"


def submit(package: str, host: str, params: dict, *, namespace: str | None, experiment: str, run_name: str,
           token: str | None, wait: bool, timeout: float, poll_seconds: float) -> tuple[str, str | None]:
    """Create the run (and its experiment if new): its id, and with ``wait`` its final state."""
    import kfp
    import kfp_server_api
    import urllib3
    from kfp.client import ServiceAccountTokenVolumeCredentials

    if urlparse(host).scheme not in ("http", "https") or not urlparse(host).netloc:
        raise SubmitError(f"--host {host}: expected http(s)://host[:port], e.g. http://localhost:8080")
    host = host.rstrip("/")
    credentials = None
    if not token and Path(sa_token_path()).is_file():  # in-cluster: the projected ServiceAccount token
        credentials = ServiceAccountTokenVolumeCredentials(sa_token_path())
        bearer = Path(sa_token_path()).read_text().strip()
    else:
        bearer = token
    check_host(host, bearer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP 2.0.0-beta.2 and later"
            client = kfp.Client(host=host, existing_token=token, credentials=credentials,
                                namespace=namespace or "kubeflow")
        result = client.create_run_from_pipeline_package(
            package, arguments=params, run_name=run_name, experiment_name=experiment, namespace=namespace)
        return result.run_id, wait_for(client, result.run_id, timeout, poll_seconds) if wait else None
    except kfp_server_api.ApiException as e:
        raise SubmitError(_api_error(host, e, bearer)) from None
    except urllib3.exceptions.HTTPError as e:
        raise SubmitError(f"lost the connection to {host} ({type(e).__name__})") from None
    except ValueError as e:  # kfp.Client's own checks, e.g. two experiments of that name in the namespace
        raise SubmitError(f"kfp could not submit to {host}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def wait_for(client, run_id: str, timeout: float, poll_seconds: float) -> str:
    """The run's final state, polling every ``poll_seconds``."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        state = str(client.get_run(run_id).state).upper()
        if state != last:
            print(f"run {run_id}: {state}", flush=True)
            last = state
        if state in FINISHED:
            return state
        if time.monotonic() > deadline:
            raise SubmitError(f"run {run_id} still {state} after {timeout:.0f} s (--timeout); it keeps running")
        time.sleep(poll_seconds)
