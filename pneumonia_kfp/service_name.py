"""The deployed service's name rule, a leaf module (it imports only errors), so params checks serve_name
before any training without importing deploy and all it needs."""
import re

from pneumonia_kfp.errors import UsageError

# an InferenceService name becomes the DNS label <name>-predictor-<namespace> (63 characters at most):
# keep room for the suffixes
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")


def check_name(name: str, what: str = "serve_name") -> str:
    if not NAME.match(name or ""):
        raise UsageError(f"{what}={name!r}: an InferenceService name is 1-45 lowercase letters, digits and '-', "
                         "starting with a letter and not ending with '-', e.g. pneumonia")
    return name
