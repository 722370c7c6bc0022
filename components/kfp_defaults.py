"""What every KFP component of this project shares: the one container image, nothing installed at run time.

A component's body runs inside that image and imports the installed ``pneumonia_kfp`` library; only the
function's source travels in the compiled YAML.
"""
import functools

from kfp import dsl

# The default image of the components; a cluster compile replaces it on every task with the
# configured one (pipelines/settings.py: --image, PNEUMONIA_KFP_IMAGE or a settings file).
BASE_IMAGE = "ghcr.io/pneumonia-kfp/pneumonia-kfp:0.1.0"

component = functools.partial(dsl.component, base_image=BASE_IMAGE, install_kfp_package=False)
