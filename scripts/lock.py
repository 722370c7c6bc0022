"""Write requirements.lock: the exact versions of everything the project needs at run time.

    python scripts/lock.py        (or: make lock)

pip resolves the project's dependencies (with the tested torch/torchvision) without installing
anything; every package of that resolution is pinned with ``==``. `make setup` and
images/Dockerfile both install from this one file, so the image runs what the tests ran. The lock's
hash goes into the default image tag (components/kfp_defaults.py and the example submit Job, updated
here too).
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
DEFAULTS = ROOT / "components" / "kfp_defaults.py"
SUBMIT_JOB = ROOT / "manifests" / "submit-job" / "kustomization.yaml"  # names the image by its tag
TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # the releases the tests run (this project's machines have them)
PROJECT = "pneumonia-kfp"


def resolve() -> list[tuple[str, str]]:
    """The run-time closure, at the versions pip picks for run time and dev tools together (so the
    tests' extra packages never force other versions than the image has)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), *TORCH, f"{ROOT}[dev]"], check=True)
        installs = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())
                    ["install"]}
    # walk the requirements from the project's own (no extras) and torch's, following each needed extra
    todo = [(Requirement(r), "") for r in installs[PROJECT].get("requires_dist", [])] + \
        [(Requirement(t), "") for t in TORCH]
    seen: dict[str, set[str]] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        wanted = set(req.extras) | {""}
        if wanted <= seen.get(name, set()):
            continue
        seen[name] = seen.get(name, set()) | wanted
        for dep in installs[name].get("requires_dist", []):
            todo += [(Requirement(dep), e) for e in wanted]
    return sorted(((installs[n]["name"], installs[n]["version"]) for n in seen), key=lambda p: p[0].lower())


def lock_hash(text: str) -> str:
    """What the default image tag carries: the first 12 hex digits of the lock's SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main() -> int:
    python = ".".join(platform.python_version_tuple()[:2])
    text = (f"# Exact versions of everything pneumonia-kfp needs at run time, for Python {python} on "
            f"Linux {platform.machine()}.\n"
            "# Installed by `make setup` (with the dev tools on top) and by images/Dockerfile, so the image\n"
            "# runs what the tests ran. Regenerate with `make lock`; never edit by hand.\n"
            + "".join(f"{name}=={version}\n" for name, version in resolve()))
    LOCK.write_text(text)
    source = DEFAULTS.read_text()
    DEFAULTS.write_text(re.sub(r'^LOCK_HASH = "[0-9a-f]*"', f'LOCK_HASH = "{lock_hash(text)}"', source, flags=re.M))
    version = re.search(r'^__version__ = "(.*)"', (ROOT / "pneumonia_kfp" / "__init__.py").read_text(), re.M)[1]
    SUBMIT_JOB.write_text(re.sub(r"newTag: \S+", f"newTag: {version}-{lock_hash(text)}", SUBMIT_JOB.read_text()))
    print(f"{LOCK.name}: {text.count(chr(10)) - 3} packages, hash {lock_hash(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
