"""Platform settings of a cluster run: image, GPU scheduling, resources, retries, caching, the store and its Secret.

Nothing here changes what the pipeline computes, only where and how its pods run, so a platform
engineer sets all of it without editing code. Later sources win:

    defaults below  <  YAML/JSON file (--settings FILE or $PNEUMONIA_KFP_SETTINGS)
                    <  environment (PNEUMONIA_KFP_<KEY>, e.g. PNEUMONIA_KFP_TRAIN_ACCELERATOR_COUNT=0)
                    <  command line (--image IMAGE, --set train.accelerator_count=0)

Keys are dotted paths into :class:`Settings` (``image``, ``minio.secret``, ``train.tolerations``);
list and dict values given as text are YAML (``--set 'train.node_selector={gpu: a100}'``); one extra
variable on every task is ``--set env.NAME=value``.
Credentials are never settings: tasks read them from the Kubernetes Secret ``minio.secret``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pneumonia_kfp.components.kfp_defaults import BASE_IMAGE, IMAGE_TAG
from pneumonia_kfp.errors import PneumoniaKfpError
from pneumonia_kfp.storage import CREATE_BUCKET_ENV, ENDPOINT_ENV

ENV_PREFIX = "PNEUMONIA_KFP_"
SETTINGS_FILE_ENV = "PNEUMONIA_KFP_SETTINGS"
# the same patterns kfp's PipelineTask.set_cpu_*/set_memory_* accept, checked here so a bad value
# fails when settings load, naming its key, instead of deep inside the pipeline function
CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")
MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
SECRET_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DURATION = re.compile(r"^[0-9]+s$")
CREDENTIAL_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
DISTRIBUTED_ENGINES = ("auto", "trainjob", "pytorchjob")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
TOLERATION_VALUES = {"operator": (None, "Equal", "Exists"),
                     "effect": (None, "NoSchedule", "PreferNoSchedule", "NoExecute")}


class SettingsError(PneumoniaKfpError, ValueError):
    """A setting is unknown or has a bad value; the message names the key."""


@dataclass
class Resources:
    """CPU and memory of one task; an empty value leaves it to the namespace's defaults."""

    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""


@dataclass
class Ingest(Resources):
    # a cached ingest reuses an earlier run's dataset version for the same parameters: turn it
    # off when the files under the same data URI changed
    cache: bool = True


@dataclass
class Train(Resources):
    accelerator: str = "nvidia.com/gpu"
    accelerator_count: int = 1  # 0: train on CPU; > 1: one torchrun rank (DDP) per GPU of the task
    tolerations: list = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    node_selector: dict = field(default_factory=dict)
    shm_size: str = "8Gi"  # in-memory /dev/shm; counts against memory_limit
    retries: int = 2  # a preempted or evicted GPU pod is retried, with exponential backoff
    retry_backoff: str = "60s"
    retry_backoff_factor: float = 2.0
    retry_backoff_max: str = "3600s"
    # nodes > 1: which engine runs the job; auto asks the API server which of the two it serves
    distributed_engine: str = "auto"  # auto | trainjob (Kubeflow Trainer v2) | pytorchjob (Training Operator v1)


@dataclass
class Minio:
    """The S3 store the tasks use. The defaults are Kubeflow's own: its object store (MinIO up to KFP
    2.15; manifests/overlays/kubeflow-seaweedfs has the endpoint from KFP 2.16) and the per-profile
    Secret with keys that may write only under mlpipeline/private/<profile>/ and a few other prefixes."""

    endpoint: str = "minio-service.kubeflow:9000"  # host:port or http(s)://host:port
    secret: str = "mlpipeline-minio-artifact"  # Kubeflow's object-store credentials in every profile namespace
    access_key_key: str = "accesskey"
    secret_key_key: str = "secretkey"
    # false: the tasks never check for or create the bucket (Kubeflow's `mlpipeline` exists and is not
    # ours; its per-profile keys may not even look at it). true only for a store of the pipeline's own.
    create_bucket: bool = False


# where `submit` puts datasets, checkpoints and results when no --param storage=... is given: in
# multi-user Kubeflow the profile's keys may write only under mlpipeline/private/<profile>/
DEFAULT_STORAGE = "s3://mlpipeline/private/{namespace}/pneumonia-kfp"
STORAGE_TEMPLATE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^{}]*(\{namespace\}[^{}]*)?)?$")


@dataclass
class Settings:
    image: str = BASE_IMAGE
    storage: str = DEFAULT_STORAGE  # {namespace}: submit's --namespace (kubeflow without one)
    image_pull_secrets: list = field(default_factory=list)
    # > 1: every train step is a distributed job of this many nodes (pods), each with train.accelerator_count
    # GPUs and one torchrun process per GPU; the train task itself only launches it (resources: launcher)
    nodes: int = 1
    env: dict = field(default_factory=dict)  # extra plain variables on every task (never credentials)
    minio: Minio = field(default_factory=Minio)
    start: Resources = field(default_factory=lambda: Resources("100m", "1", "256Mi", "1Gi"))
    ingest: Ingest = field(default_factory=lambda: Ingest("1", "4", "4Gi", "8Gi"))
    train: Train = field(default_factory=lambda: Train("4", "8", "16Gi", "32Gi"))
    evaluate: Resources = field(default_factory=lambda: Resources("2", "4", "8Gi", "16Gi"))
    report: Resources = field(default_factory=lambda: Resources("1", "2", "2Gi", "4Gi"))
    launcher: Resources = field(default_factory=lambda: Resources("100m", "1", "512Mi", "2Gi"))

    def validate(self) -> "Settings":
        self.image = pinned_image(self.image)
        _check("storage", self.storage, STORAGE_TEMPLATE.match,
               "s3://bucket/prefix, optionally with {namespace}, e.g. " + DEFAULT_STORAGE)
        for key in ("start", "ingest", "train", "evaluate", "report", "launcher"):
            r = getattr(self, key)
            for name in ("cpu_request", "cpu_limit"):
                _check(f"{key}.{name}", getattr(r, name), lambda v: not v or CPU.match(v),
                       "a CPU quantity like 2 or 500m")
            for name in ("memory_request", "memory_limit"):
                _check(f"{key}.{name}", getattr(r, name), lambda v: not v or MEMORY.match(v),
                       "a memory quantity like 512Mi or 16Gi")
        t = self.train
        _check("nodes", self.nodes, lambda v: v >= 1, "1 (train in the task) or more (a distributed job)")
        _check("train.distributed_engine", t.distributed_engine, lambda v: v in DISTRIBUTED_ENGINES,
               " or ".join(DISTRIBUTED_ENGINES))
        # a train task (or each node of a distributed job) runs one torchrun process per GPU
        _check("train.accelerator_count", t.accelerator_count, lambda v: v >= 0,
               "0 (CPU) or 1 (one GPU) or more (one torchrun rank per GPU; GPUs per node when nodes > 1)")
        _check("train.retries", t.retries, lambda v: v >= 0, "0 or more")
        _check("train.shm_size", t.shm_size, lambda v: MEMORY.match(v), "a memory quantity like 8Gi")
        for name in ("retry_backoff", "retry_backoff_max"):
            _check(f"train.{name}", getattr(t, name), lambda v: DURATION.match(v), "seconds like 60s")
        for i, tol in enumerate(t.tolerations):
            _check(f"train.tolerations[{i}]", tol, lambda v: isinstance(v, dict) and set(v) <= TOLERATION_KEYS and all(
                v.get(k) in allowed for k, allowed in TOLERATION_VALUES.items()),
                f"a toleration with keys from {sorted(TOLERATION_KEYS)}, operator Equal|Exists, "
                "effect NoSchedule|PreferNoSchedule|NoExecute")
        _check("train.node_selector", t.node_selector, _str_dict, "a map of label to value")
        _check("minio.secret", self.minio.secret, K8S_NAME.match, "a Kubernetes name")
        for name in ("access_key_key", "secret_key_key"):
            _check(f"minio.{name}", getattr(self.minio, name), SECRET_DATA_KEY.match, "a key of the Secret's data")
        for name in self.image_pull_secrets:
            _check("image_pull_secrets", name, lambda v: isinstance(v, str) and K8S_NAME.match(v), "Secret names")
        _check("env", self.env, _str_dict, "a map of variable name to value")
        for name in self.env:
            _check(f"env.{name}", name, ENV_NAME.match, "an environment variable name")
            if CREDENTIAL_ENV.search(name):
                raise SettingsError(f"env.{name}: credentials come from the Secret minio.secret, never from plain "
                                    "env (its value would be written into the compiled pipeline)")
            for env, key in ((ENDPOINT_ENV, "minio.endpoint"), (CREATE_BUCKET_ENV, "minio.create_bucket")):
                if name == env:
                    raise SettingsError(f"env.{env}: set {key} instead")
        return self


def pinned_image(image: str) -> str:
    """The image reference, pinned: without a tag or digest it gets this checkout's IMAGE_TAG (what
    `make image REGISTRY=...` pushes); ``:latest`` would change under a run and is refused."""
    if not image or image.endswith(":latest") or image.endswith(":"):
        raise SettingsError(f"image={image!r}: pin the image with a tag or digest (registry/name:tag), never :latest")
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last or "@" in last else f"{image}:{IMAGE_TAG}"


def _str_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _check(key: str, value, ok, expected: str) -> None:
    if not ok(value):
        raise SettingsError(f"{key}={value!r}: expected {expected}")


def keys(cls: type = Settings, prefix: str = "") -> dict[str, type]:
    """Every dotted setting key and its type."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(keys(hint, f"{prefix}{name}."))
        else:
            out[prefix + name] = hint
    return out


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "_")


def _convert(key: str, kind: type, value: Any) -> Any:
    """``value`` as ``kind``; text (env, --set) is parsed, typed file values are checked."""
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SettingsError(f"{key}={value!r}: not valid YAML") from None
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # "cpu_limit: 4" in a YAML file means the quantity "4"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingsError(f"{key}={value!r}: expected {kind.__name__}")
    return value


def _flatten(data: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    known = keys()
    for name, value in data.items():
        key = prefix + str(name)
        if isinstance(value, dict) and key not in known:
            yield from _flatten(value, key + ".")
        else:
            yield key, value


def _set(settings: Settings, key: str, value: Any, source: str | None = None) -> None:
    """Set ``key``; errors name ``source`` (the environment variable) or the key."""
    kinds = keys()
    if key.startswith("env.") and len(key) > 4:  # one variable: env.NAME=value
        settings.env = {**settings.env, key[4:]: _convert(source or key, str, value)}
        return
    if key not in kinds:
        raise SettingsError(f"unknown setting {key!r}; known: {', '.join(sorted(kinds))}")
    *path, name = key.split(".")
    target = settings
    for part in path:
        target = getattr(target, part)
    setattr(target, name, _convert(source or key, kinds[key], value))


def load(file: str | None = None, overrides: Iterable[str] = (), environ: Mapping[str, str] = os.environ) -> Settings:
    """Defaults, then the file, then PNEUMONIA_KFP_* variables, then ``key=value`` overrides."""
    settings = Settings()
    file = file or environ.get(SETTINGS_FILE_ENV)
    if file:
        try:
            data = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SettingsError(f"settings file {file}: {e}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"settings file {file}: expected a mapping of settings at the top level")
        for key, value in _flatten(data):
            _set(settings, key, value)
    for key in keys():
        if env_name(key) in environ:
            _set(settings, key, environ[env_name(key)], env_name(key))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r}: expected KEY=VALUE, e.g. train.accelerator_count=0")
        _set(settings, key.strip(), value)
    return settings.validate()


def add_arguments(parser) -> None:
    """The settings options shared by ``compile`` and ``submit``."""
    parser.add_argument("--settings", metavar="FILE", help=f"YAML/JSON settings file (default: ${SETTINGS_FILE_ENV})")
    parser.add_argument("--image", help="container image of every task: registry/name (tagged with this checkout's "
                        f"{IMAGE_TAG}), registry/name:tag or @sha256:...")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="one setting, e.g. train.accelerator_count=0, minio.secret=my-minio or env.NAME=value "
                        "(repeatable)")


def from_args(args) -> Settings:
    overrides = list(args.overrides) + ([f"image={args.image}"] if args.image else [])
    return load(args.settings, overrides)
