"""The run parameters' checks, one place for run-local, compile and submit: before any work starts."""
from __future__ import annotations


class UsageError(ValueError):
    """A parameter is wrong; the message names it and what to do."""


def check_backbones(names: list[str]) -> list[str]:
    from components.backbones import check_backbone

    names = [b.strip() for b in names if b.strip()]
    if not names:
        raise UsageError("backbones is empty: name at least one timm model, e.g. resnet18,efficientnet_b3")
    dupes = sorted({b for b in names if names.count(b) > 1})
    if dupes:
        raise UsageError(f"backbones lists {', '.join(dupes)} more than once")
    for name in names:
        check_backbone(name)
    return names


def check_positive(**values: int | float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise UsageError(f"{name}={value}: must be greater than 0")


def check_run_params(params: dict) -> None:
    """Check the pipeline parameters that are present (names as in the pipeline's signature)."""
    from components.backbones import check_image_size
    from components.validation import ON_INVALID

    if "backbones" in params:
        params["backbones"] = check_backbones(params["backbones"])
    check_positive(**{k: params[k] for k in ("epochs", "batch_size", "image_size", "learning_rate") if k in params})
    for name in params.get("backbones", []):
        if "image_size" in params:
            check_image_size(name, params["image_size"])
    if params.get("on_invalid", "fail") not in ON_INVALID:
        raise UsageError(f"on_invalid={params['on_invalid']!r}: use one of {', '.join(ON_INVALID)}")
