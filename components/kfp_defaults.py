"""What every KFP component of this project shares: the one container image, nothing installed at run time.

A component's body runs inside that image and imports the installed ``pneumonia_kfp`` library; only the
function's source travels in the compiled YAML. So the image must hold the library of the same checkout:
its default tag is this package's version plus the hash of requirements.lock (the exact versions the
image installs), and compile/submit warn when the configured image carries another tag.

Every component runs its body inside ``pneumonia_kfp.task_errors.recording_errors("<its task name>")``, so
that run-local reports a failed task from the task's own error record (a decorator would not do: kfp
compiles only the function's source, without its decorators). tests/test_task_errors.py checks each one.
"""
import functools

from kfp import dsl

from pneumonia_kfp import __version__

# the first 12 hex digits of requirements.lock's SHA-256 (written by `make lock`; a test checks it)
LOCK_HASH = "deacb253602e"
IMAGE_TAG = f"{__version__}-{LOCK_HASH}"
IMAGE_REPOSITORY = "ghcr.io/pneumonia-kfp/pneumonia-kfp"
# The default image of the components; a cluster compile replaces it on every task with the
# configured one (pipelines/settings.py: --image, PNEUMONIA_KFP_IMAGE or a settings file).
BASE_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"

component = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)


def image_tag(image: str) -> str | None:
    """The tag of ``registry/name:tag`` or ``registry/name:tag@sha256:...``; None without one."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else None


def image_mismatch(image: str) -> str | None:
    """Why ``image`` may not hold this checkout's library (None when its tag is IMAGE_TAG)."""
    tag = image_tag(image)
    if tag == IMAGE_TAG:
        return None
    return (f"image {image} is not tagged {IMAGE_TAG} (this checkout's version {__version__} and requirements.lock "
            f"{LOCK_HASH}): the component code compiled into the pipeline may not match the library in it; build "
            f"and push this checkout with `make image REGISTRY=...`")


if __name__ == "__main__":  # `python -m pneumonia_kfp.components.kfp_defaults`: the tag `make image` uses
    print(IMAGE_TAG)
