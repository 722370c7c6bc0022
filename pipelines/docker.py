"""run-local --runner docker: every task in the project's image through kfp's DockerRunner, as on a cluster.

The tasks see what a cluster Pod sees: the image's code (never the checkout's), a read-only root
filesystem with a writable /tmp (exec allowed, like an emptyDir: torch.compile loads what it builds
there), the caller's uid:gid, /dev/shm sized like the cluster's train task,
and the host network (so an S3 endpoint on localhost works). Data is mounted read-only, OUT and a
``file://`` store read-write, each at the path it has here, so every path in results.json is true on
both sides. With ``--gpus``, GPU tasks get NVIDIA devices through ``device_requests``; with several
GPUs, each running task gets one of its own. Task containers carry the run's label, so a stopped run
removes them (they are the engine's children, not run-local's).

The image must hold this checkout's code: ``make image`` labels it with :func:`source_digest`, and a
run refuses an image whose label differs, with the command that rebuilds it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
from pathlib import Path

from pneumonia_kfp.device import REQUIRE_GPU_ENV  # set on GPU tasks: they refuse to fall back to the CPU
from pneumonia_kfp.errors import UsageError

SOURCE_LABEL = "io.pneumonia-kfp.source"  # the source digest `make image` built from
RUN_LABEL = "io.pneumonia-kfp.run"  # on every task container of one run-local, to stop them all
GPU_STEPS = ("train_op", "evaluate_op")  # the components that use a GPU; the others never get one
PASSED_ENV = re.compile(r"^(PNEUMONIA_KFP_|MINIO_|OMP_NUM_THREADS$)")  # the caller's settings the tasks need
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU, where NVIDIA's driver is loaded
_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def source_digest() -> str:
    """SHA-256 over the installed package's Python files (relative name and bytes), the same for the checkout
    and for the image built from it: pneumonia_kfp, pneumonia_kfp.components and pneumonia_kfp.pipelines."""
    import pneumonia_kfp
    import pneumonia_kfp.components
    import pneumonia_kfp.pipelines

    digest = hashlib.sha256()
    for package in (pneumonia_kfp, pneumonia_kfp.components, pneumonia_kfp.pipelines):
        root = Path(package.__path__[0])
        for file in sorted(root.glob("*.py")):
            digest.update(f"{package.__name__}/{file.name}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("8Gi", "512M", "1024") in bytes."""
    m = _QUANTITY.match(quantity)
    if not m:
        raise UsageError(f"{quantity!r} is not a memory quantity like 8Gi")
    return int(m[1]) * _UNITS[m[2]]


def connect():
    """A client of the local Docker engine, or one line saying what is missing."""
    try:
        import docker
    except ImportError:
        raise UsageError("--runner docker needs the Docker SDK for Python: "
                         "pip install 'pneumonia-kfp[docker]'") from None
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        if not shutil.which("dockerd"):
            raise UsageError(f"--runner docker: no Docker engine answers at {host} and none is installed here; "
                             "install one (Debian: apt-get install docker.io) and start it, or use --runner "
                             "subprocess") from None
        raise UsageError(f"--runner docker: the Docker daemon does not answer at {host} ({_reason(e)}); start it "
                         "(scripts/docker-engine.sh start, or systemctl start docker)") from None
    return client


def _reason(error: Exception) -> str:
    text = str(error)
    for known in ("No such file or directory", "Connection refused", "Permission denied"):
        if known in text:
            return known
    return text.splitlines()[0][:200] if text else type(error).__name__


def check_image(client, image: str) -> None:
    """``image`` is on the engine and was built from this checkout's code; else one line saying how to get it."""
    import docker

    try:
        labels = client.images.get(image).labels or {}
    except docker.errors.ImageNotFound:
        others = sorted(t for i in client.images.list() for t in i.tags
                        if t.rsplit(":", 1)[0] == image.rsplit(":", 1)[0])
        found = f" (this engine has {', '.join(others)}, built from another version or lock)" if others else ""
        raise UsageError(f"--runner docker: image {image} is not on this Docker engine{found}; build it from this "
                         "checkout with: make image") from None
    built, here = labels.get(SOURCE_LABEL), source_digest()
    if built != here:
        what = f"code {built[:12]}" if built else "no source label"
        raise UsageError(f"--runner docker: image {image} holds other code than this checkout ({what}, this checkout "
                         f"{here[:12]}); rebuild it with: make image") from None


def gpu_ids(client, gpus: str | None) -> list[str]:
    """The GPU indexes ``--gpus all|N`` asks for, checked against the engine and the driver."""
    if not gpus:
        return []
    runtimes = set((client.info().get("Runtimes") or {}))
    if "nvidia" not in runtimes and not shutil.which("nvidia-container-runtime-hook"):
        raise UsageError("--gpus: this Docker engine has no NVIDIA container runtime (runtimes: "
                         f"{', '.join(sorted(runtimes)) or 'none'}); install nvidia-container-toolkit, or leave "
                         "out --gpus to train on the CPU")
    present = sorted(p.name for p in NVIDIA_GPUS.iterdir()) if NVIDIA_GPUS.is_dir() else []
    count = len(present) if gpus == "all" else int(gpus)
    if not present or count > len(present):
        raise UsageError(f"--gpus {gpus}: this machine has {len(present)} NVIDIA GPU(s) ({NVIDIA_GPUS})")
    return [str(i) for i in range(count)]


class GpuPool:
    """Hands each running GPU task the least busy GPU (the lowest index among equals): its own while there
    are enough, shared beyond."""

    def __init__(self, ids: list[str]):
        self.ids, self.busy = ids, {i: 0 for i in ids}
        self.lock = threading.Lock()  # ParallelFor runs tasks from several threads

    @contextlib.contextmanager
    def take(self):
        with self.lock:
            gpu = min(self.ids, key=lambda i: self.busy[i])  # min keeps the first of equals
            self.busy[gpu] += 1
        try:
            yield gpu
        finally:
            with self.lock:
                self.busy[gpu] -= 1


def step_of(command: list[str]) -> str | None:
    """The component function a kfp task command runs (``--function_to_execute NAME``)."""
    for flag, value in zip(command, command[1:], strict=False):
        if flag == "--function_to_execute":
            return value
    return None


def start_tasks_with(pool: GpuPool | None) -> None:
    """Start kfp's task containers our way (``docker_task_handler.run_docker_container``, which kfp calls for
    every task): a GPU task gets one GPU of ``pool`` and must use it, the others none (kfp's DockerRunner
    passes the same arguments to every task); and the task's own exit code counts (kfp's version removes the
    container as it exits and may then take a failed task for a succeeded one)."""
    import docker as sdk
    from kfp.local import docker_task_handler

    def run_docker_container(client, image, command, volumes, **args) -> int:
        gpu = pool.take() if pool and step_of(command) in GPU_STEPS else contextlib.nullcontext()
        with gpu as device:
            if device is not None:
                args["device_requests"] = [sdk.types.DeviceRequest(device_ids=[device], capabilities=[["gpu"]])]
                args["environment"] = {**(args.get("environment") or {}), REQUIRE_GPU_ENV: "1"}
            print(f"Task container of image {image!r}\n")
            container = client.containers.run(image=image, command=command, detach=True, volumes=volumes, **args)
            try:
                for line in container.logs(stream=True, follow=True):
                    print(line.decode(errors="replace"), end="")  # kfp's runner indents what is printed
                return container.wait()["StatusCode"]
            finally:
                with contextlib.suppress(sdk.errors.APIError):
                    container.remove(force=True)

    docker_task_handler.run_docker_container = run_docker_container


def runner(client, image: str, *, out: Path, data: str, storage: str, run_id: str, shm_size: str,
           gpus: str | None = None, user: str | None = None):
    """kfp's DockerRunner for one run-local: mounts, user (default: the caller's uid:gid), network, /dev/shm,
    environment, GPUs."""
    import docker
    from kfp import local

    check_image(client, image)
    pool_ids = gpu_ids(client, gpus)
    mounts = [docker.types.Mount(str(out), str(out), type="bind")]
    if not data.startswith("s3://"):
        mounts.append(docker.types.Mount(data, data, type="bind", read_only=True))
    if storage.startswith("file://"):
        store = Path(storage[len("file://"):])
        store.mkdir(parents=True, exist_ok=True)
        if out not in store.parents and store != out:
            mounts.append(docker.types.Mount(str(store), str(store), type="bind"))
    start_tasks_with(GpuPool(pool_ids) if pool_ids else None)
    return local.DockerRunner(
        mounts=mounts, network_mode="host", user=user or f"{os.getuid()}:{os.getgid()}",
        read_only=True, tmpfs={"/tmp": "exec"}, shm_size=quantity_bytes(shm_size),
        environment={k: v for k, v in os.environ.items() if PASSED_ENV.match(k)} | {"TMPDIR": "/tmp"},
        labels={RUN_LABEL: run_id}, cap_drop=["ALL"], security_opt=["no-new-privileges"])


def stop_containers(run_id: str) -> None:
    """Stop and remove every task container of one run (a stopped run-local must not leave them running)."""
    try:
        import docker

        client = docker.from_env()
        for container in client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
    except Exception:  # noqa: BLE001 -- best effort while stopping: never hide the stop itself
        pass
