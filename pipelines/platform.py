"""Apply :class:`~pneumonia_kfp.pipelines.settings.Settings` to the pipeline's tasks (cluster compiles only)."""
from __future__ import annotations

from kfp import kubernetes

from pneumonia_kfp.device import REQUIRE_GPU_ENV
from pneumonia_kfp.pipelines.settings import Resources, Settings, Train
from pneumonia_kfp.storage import ACCESS_KEY_ENV, CREATE_BUCKET_ENV, ENDPOINT_ENV, SECRET_KEY_ENV


def configure(settings: Settings, **tasks) -> None:
    """Image, resources, env and store access on every task (keyword: the task's step, e.g. train=task);
    GPU scheduling, /dev/shm and retries on train, the caching choice on ingest."""
    for step, task in tasks.items():
        task.set_container_image(settings.image)
        if settings.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, settings.image_pull_secrets)
        set_resources(task, getattr(settings, step))
        for name, value in settings.env.items():
            task.set_env_variable(name, value)
        use_store(task, settings)  # every step reads or writes the store (report: the run's results)
        if step == "ingest":
            task.set_caching_options(enable_caching=settings.ingest.cache)
        if step == "train":
            schedule_training(task, settings.train)


def set_resources(task, r: Resources) -> None:
    for value, setter in ((r.cpu_request, task.set_cpu_request), (r.cpu_limit, task.set_cpu_limit),
                          (r.memory_request, task.set_memory_request), (r.memory_limit, task.set_memory_limit)):
        if value:
            setter(value)


def use_store(task, settings: Settings) -> None:
    """The store's endpoint as plain env, the keys by reference to the Secret (never their values)."""
    m = settings.minio
    task.set_env_variable(ENDPOINT_ENV, m.endpoint)
    if not m.create_bucket:
        task.set_env_variable(CREATE_BUCKET_ENV, "false")
    kubernetes.use_secret_as_env(task, secret_name=m.secret,
                                 secret_key_to_env={m.access_key_key: ACCESS_KEY_ENV, m.secret_key_key: SECRET_KEY_ENV})


def schedule_training(task, t: Train) -> None:
    if t.accelerator_count:
        task.set_accelerator_type(t.accelerator).set_accelerator_limit(t.accelerator_count)
        task.set_env_variable(REQUIRE_GPU_ENV, "1")  # a GPU that CUDA cannot use fails the task, no CPU fallback
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
