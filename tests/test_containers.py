"""The pipeline run the way users run it: every task in the image built from this checkout (`make test`
starts the Docker engine and builds it first), through kfp's DockerRunner.

The equality of results.json with the subprocess runner's is what shows that the image and the tests hold
the same code; the restricted run shows that a task works as a Pod Security "restricted" profile runs it."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from docker.errors import ImageNotFound

from pneumonia_kfp.components.kfp_defaults import BASE_IMAGE
from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.pipelines import docker
from pneumonia_kfp.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pneumonia_kfp.pipelines.cli"]
TIMINGS = {"seconds", "images_per_second", "wall_seconds"}  # the only fields two equal runs may differ in


@pytest.fixture(scope="module")
def engine():
    """The local engine with this checkout's image; `make test` provides both."""
    try:
        client = docker.connect()
        docker.check_image(client, BASE_IMAGE)
    except UsageError as e:
        pytest.fail(f"{e} (`make test` starts the Docker engine and builds the image before the tests)")
    return client


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data"), {"train": 48, "val": 16, "test": 16}, size=48)


def run_local(out: Path, data: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run-local", "--data", str(data), "--output", str(out), "--backbones", "resnet18",
                           "--epochs", "2", "--image-size", "32", "--seed", "3", *extra],
                          capture_output=True, text=True, timeout=900, **kwargs)


def leaves(node, path=""):
    """(path, value) of every leaf of a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def test_the_pipeline_in_containers_gives_the_subprocess_runners_results(engine, data, tmp_path):
    docker_out, host_out = tmp_path / "docker", tmp_path / "host"
    in_containers = run_local(docker_out, data, "--runner", "docker")
    assert in_containers.returncode == 0, in_containers.stderr[-3000:]
    on_host = run_local(host_out, data)
    assert on_host.returncode == 0, on_host.stderr[-3000:]

    # every task ran in the image: one container per task (start, ingest, train, evaluate, report)
    assert (docker_out / "run-local.log").read_text().count(f"Task container of image '{BASE_IMAGE}'") == 5
    assert "Task container" not in (host_out / "run-local.log").read_text()
    ours = dict(leaves(json.loads((docker_out / "results.json").read_text())))
    theirs = dict(leaves(json.loads((host_out / "results.json").read_text())))
    assert ours.keys() == theirs.keys()
    compared = 0
    for path, value in theirs.items():
        if path.rsplit(".", 1)[-1].split("[")[0] in TIMINGS:
            continue
        if isinstance(value, float):
            assert round(ours[path], 4) == round(value, 4), path
            compared += 1
        elif isinstance(value, str):
            assert ours[path].replace(str(docker_out), "OUT") == value.replace(str(host_out), "OUT"), path
        else:
            assert ours[path] == value, path
    assert compared > 100 and ours[".models[0].test.auc"] > 0.5  # a trained model, scored on every metric
    # the models were copied out of the containers' artifacts, owned by the caller
    assert (docker_out / "models" / "resnet18" / "model.onnx").stat().st_uid == os.getuid()


def test_a_task_runs_as_a_restricted_pod_runs_it(engine, s3_env):
    """uid 1000 with gid 0 (not the image's root), a read-only root filesystem with a writable /tmp, no
    capabilities, no privilege escalation, the host network: ingest into S3 on 127.0.0.1, then train with
    torch.compile (Inductor needs the image's C compiler)."""
    from kfp import dsl, local

    from pneumonia_kfp.components.ingest import ingest_op
    from pneumonia_kfp.components.train import train_op

    @dsl.pipeline
    def ingest_and_train(data: str) -> dsl.Model:
        ingest = ingest_op(data=data, storage="s3://restricted/store", image_size=32, seed=0, on_invalid="fail")
        return train_op(dataset=ingest.outputs["dataset"], backbone="resnet18", epochs=1, batch_size=16,
                        learning_rate=1e-3, seed=0, pretrained=False, pretrained_weights="", compile_model=True,
                        threshold_rule="balanced", tta=False).outputs["model"]

    # the cluster's convention for an arbitrary uid: files group-owned by 0 and group-writable (pytest's own
    # temporary folders are private to root, so this one is made by hand)
    old = os.umask(0o002)
    top = Path(tempfile.mkdtemp(prefix="pneumonia-kfp-restricted-"))
    try:
        top.chmod(0o775)
        data = make_synthetic(top / "data", {"train": 48, "val": 16, "test": 16}, size=48)
        out = top / "out"
        out.mkdir()
        root = out / "kfp-root"  # as run-local lays it out
        root.mkdir()
        runner = docker.runner(engine, BASE_IMAGE, out=out, data=str(data), storage="s3://restricted/store",
                               run_id="restricted-test", shm_size="1Gi", user="1000:0")
        config = runner.container_run_args
        assert config["read_only"] and config["tmpfs"] == {"/tmp": "exec"} and config["cap_drop"] == ["ALL"]
        # the data is read-only in the task's container, OUT writable, the root filesystem read-only
        probe = engine.containers.run(BASE_IMAGE, ["sh", "-c", f"touch {data}/x /x 2>&1; touch {out}/y && echo out"],
                                      mounts=config["mounts"], user="1000:0", read_only=True, network_mode="host",
                                      remove=True).decode()
        assert probe.count("Read-only file system") == 2 and probe.endswith("out\n"), probe
        local.init(runner=runner, pipeline_root=str(root))
        model = ingest_and_train(data=str(data)).output
        assert model.metadata["formats"] and model.metadata["backbone"] == "resnet18"
        model = Path(model.path)
        assert {"checkpoint.pt", "model.onnx", "metadata.json"} <= {p.name for p in model.iterdir()}
        assert model.stat().st_uid == 1000  # written by the task's user, not by root
    finally:
        os.umask(old)
        shutil.rmtree(top)


def test_the_image_label_is_the_digest_of_the_code_inside_it(engine):
    """What run-local compares against is true: the digest computed inside the image equals its label."""
    inside = engine.containers.run(BASE_IMAGE, ["python", "-c", "from pneumonia_kfp.pipelines.docker import "
                                                "source_digest; print(source_digest())"],
                                   network_mode="host", remove=True).decode().strip()
    assert inside == engine.images.get(BASE_IMAGE).labels[docker.SOURCE_LABEL] == docker.source_digest()


def test_each_missing_part_is_one_line(engine, data, tmp_path):
    """No engine, a daemon that does not answer, a missing image, an image of other code: one line each."""
    def error(*extra, env=None):
        result = run_local(tmp_path / "out", data, "--runner", "docker", *extra, env={**os.environ, **(env or {})})
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    gone = "unix:///nonexistent/docker.sock"
    assert f"the Docker daemon does not answer at {gone} (No such file or directory); start it" in \
        error(env={"DOCKER_HOST": gone})
    assert "no Docker engine answers at unix:///nonexistent/docker.sock and none is installed here; install one" in \
        error(env={"DOCKER_HOST": gone, "PATH": str(Path(sys.executable).parent)})
    assert "--gpus: this Docker engine has no NVIDIA container runtime" in error("--gpus", "all")

    # an image of this tag built from other code; then no image of this tag at all
    other = engine.images.build(fileobj=_dockerfile(f"FROM {BASE_IMAGE}\nLABEL {docker.SOURCE_LABEL}=0123456789ab"),
                                network_mode="host", rm=True)[0]
    saved = engine.images.get(BASE_IMAGE)
    repository, tag = BASE_IMAGE.rsplit(":", 1)
    try:
        other.tag(repository, tag)
        assert f"image {BASE_IMAGE} holds other code than this checkout (code 0123456789ab, this checkout " \
               f"{docker.source_digest()[:12]}); rebuild it with: make image" in error()
        engine.images.remove(BASE_IMAGE, noprune=True)
        # images of this repository with other tags (other versions or locks) are named as what the engine has
        others = sorted(t for i in engine.images.list() for t in i.tags if t.rsplit(":", 1)[0] == repository)
        found = f" (this engine has {', '.join(others)}, built from another version or lock)" if others else ""
        assert f"image {BASE_IMAGE} is not on this Docker engine{found}; build it from this checkout with: make " \
            "image" in error()
    finally:
        saved.tag(repository, tag)
        with contextlib.suppress(ImageNotFound):  # gone already when it lost its only tag above
            engine.images.remove(other.id, force=True)
    assert engine.images.get(BASE_IMAGE).id == saved.id


def _dockerfile(text: str):
    import io

    return io.BytesIO(text.encode())


def test_stopping_run_local_removes_its_task_containers(engine, data, tmp_path):
    """Containers are the engine's children, not run-local's: a stop must end them too."""
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "run-local", "--data", str(data), "--output", str(out), "--backbones", "resnet18",
                             "--epochs", "50", "--image-size", "32", "--runner", "docker"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _train_containers(engine):
            time.sleep(1)
        assert _train_containers(engine), "no train container started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert engine.containers.list(all=True, filters={"label": docker.RUN_LABEL}) == []


def _train_containers(engine):
    return [c for c in engine.containers.list(filters={"label": docker.RUN_LABEL})
            if docker.step_of(c.attrs["Args"]) == "train_op"]


@pytest.mark.parametrize("spec, expected", [("2", ["0", "1", "0"]), ("1", ["0", "0", "0"])])
def test_each_running_gpu_task_gets_a_gpu_of_its_own(spec, expected):
    pool = docker.GpuPool([str(i) for i in range(int(spec))])
    with pool.take() as first, pool.take() as second, pool.take() as third:
        assert [first, second, third] == expected
    with pool.take() as again:
        assert again == "0"
        with pool.take() as beside:  # a GPU freed is the next one handed out
            assert beside == expected[1]


class RecordingEngine:
    """Where a GPU cannot run: a client that records the containers it is asked to start, each exiting 0."""

    def __init__(self):
        self.started = []
        self.containers = self

    def run(self, **args):
        self.started.append(args)
        return self

    def logs(self, **_):
        return [b"done\n"]

    def wait(self):
        return {"StatusCode": 0}

    def remove(self, force):
        assert force


def test_gpu_tasks_get_a_device_request_and_the_others_none():
    """train and evaluate get one GPU each (while two run at once, different ones) and must use it."""
    from kfp.local import docker_task_handler

    docker.start_tasks_with(docker.GpuPool(["0", "1"]))
    engine = RecordingEngine()
    for step in ("ingest_op", "train_op", "evaluate_op"):
        command = ["sh", "-c", "x", "--function_to_execute", step]
        assert docker_task_handler.run_docker_container(engine, BASE_IMAGE, command, {}, environment={"A": "1"}) == 0
    ingest, train, evaluate = engine.started
    assert "device_requests" not in ingest and ingest["environment"] == {"A": "1"}
    for args in (train, evaluate):
        (request,) = args["device_requests"]
        assert request["DeviceIDs"] == ["0"] and request["Capabilities"] == [["gpu"]]
        assert args["environment"] == {"A": "1", "PNEUMONIA_KFP_REQUIRE_GPU": "1"}


def test_a_failed_task_container_counts_as_failed(engine):
    """The exit code is the task's own, however fast the container ends (kfp's start may lose it)."""
    from kfp.local import docker_task_handler

    docker.start_tasks_with(None)
    code = docker_task_handler.run_docker_container(engine, BASE_IMAGE, ["python", "-c", "raise SystemExit(3)"], {},
                                                     network_mode="host", labels={docker.RUN_LABEL: "exit-test"})
    assert code == 3
    assert engine.containers.list(all=True, filters={"label": f"{docker.RUN_LABEL}=exit-test"}) == []


def test_shm_and_memory_quantities():
    assert docker.quantity_bytes("8Gi") == 8 * 2**30 and docker.quantity_bytes("512M") == 512 * 10**6
    assert docker.quantity_bytes("1024") == 1024
    with pytest.raises(UsageError, match="'8GB' is not a memory quantity"):
        docker.quantity_bytes("8GB")
