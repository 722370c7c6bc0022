"""What every KFP component of this project shares: the one container image, nothing installed at run time."""
import os

from kfp import dsl

# The default image of the components; a cluster compile replaces it on every task with the
# configured one (pipelines/settings.py: --image, PNEUMONIA_KFP_IMAGE or a settings file).
BASE_IMAGE = "ghcr.io/pneumonia-kfp/pneumonia-kfp:0.1.0"


def component():
    """``@dsl.component`` with the project image. Inside a running task kfp sets _KFP_RUNTIME and
    ships no decorator; the task only needs the module's core, so the wrapper stays a plain function."""
    if os.environ.get("_KFP_RUNTIME") == "true":
        return lambda func: func
    return dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
