"""Apply :class:`~pneumonia_kfp.pipelines.settings.Settings` to the pipeline's tasks (cluster compiles only)."""
from __future__ import annotations

from kfp import kubernetes

from pneumonia_kfp.pipelines.settings import Resources, Settings, Train
from pneumonia_kfp.storage import ACCESS_KEY_ENV, ENDPOINT_ENV, SECRET_KEY_ENV


def configure(settings: Settings, *, ingest, train, evaluate, report) -> None:
    """Image, resources and env on every task; store access where the store is used; GPU on train."""
    for task, resources in ((ingest, settings.ingest), (train, settings.train), (evaluate, settings.evaluate),
                            (report, settings.report)):
        task.set_container_image(settings.image)
        if settings.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, settings.image_pull_secrets)
        set_resources(task, resources)
        for name, value in settings.env.items():
            task.set_env_variable(name, value)
    for task in (ingest, train, evaluate):  # report only reads its input artifacts
        use_store(task, settings)
    ingest.set_caching_options(enable_caching=settings.ingest.cache)
    schedule_training(train, settings.train)


def set_resources(task, r: Resources) -> None:
    for value, setter in ((r.cpu_request, task.set_cpu_request), (r.cpu_limit, task.set_cpu_limit),
                          (r.memory_request, task.set_memory_request), (r.memory_limit, task.set_memory_limit)):
        if value:
            setter(value)


def use_store(task, settings: Settings) -> None:
    """The MinIO endpoint as plain env, the keys by reference to the Secret (never their values)."""
    m = settings.minio
    task.set_env_variable(ENDPOINT_ENV, m.endpoint)
    kubernetes.use_secret_as_env(task, secret_name=m.secret,
                                 secret_key_to_env={m.access_key_key: ACCESS_KEY_ENV, m.secret_key_key: SECRET_KEY_ENV})


def schedule_training(task, t: Train) -> None:
    if t.accelerator_count:
        task.set_accelerator_type(t.accelerator).set_accelerator_limit(t.accelerator_count)
    for toleration in t.tolerations:
        kubernetes.add_toleration(task, key=toleration.get("key"), operator=toleration.get("operator"),
                                  value=toleration.get("value"), effect=toleration.get("effect"),
                                  toleration_seconds=toleration.get("tolerationSeconds"))
    for label, value in t.node_selector.items():
        kubernetes.add_node_selector(task, label, value)
    # PyTorch shares tensors between processes through /dev/shm; the container default is 64 MiB
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=t.shm_size)
    if t.retries:
        task.set_retry(t.retries, backoff_duration=t.retry_backoff, backoff_factor=t.retry_backoff_factor,
                       backoff_max_duration=t.retry_backoff_max)
