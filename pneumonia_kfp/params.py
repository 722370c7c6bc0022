"""Every run parameter, defined once: name, type, default, limits, choices and help.

The same table makes the CLI's flags (``add_arguments``), the pipeline's signature and docstring
(``pipeline_signature``) and the checks that run-local, compile and submit make before any work
starts (``check_run_params``). Nothing else states a default or a limit.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, List

from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.limits import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE  # noqa: F401  (validation reads them here too)

SEED_BACKBONES = ("resnext50_32x4d", "densenet161", "resnet18", "resnet50", "efficientnet_b3")
ON_INVALID = ("fail", "skip")
# an image whose header declares more pixels than this is rejected before it is decoded (decompression
# bombs: a 140 KB PNG can declare 12000x12000 px, 384 MB decoded); a setting, not a run parameter
MAX_PIXELS_ENV = "PNEUMONIA_KFP_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000
# how the default decision threshold is chosen from validation predictions (pneumonia_kfp.metrics)
THRESHOLD_RULES = ("balanced", "youden", "sensitivity95")
# How a model learns beyond the run parameters: training.Recipe's defaults (the ablation table's variables,
# not flags), all recorded with the model. Chest X-ray practice for robustness to other hospitals' images:
# photometric and geometric augmentation (augmentation.POLICIES), label smoothing 0.1 (Szegedy et al. 2016;
# Müller et al. 2019), AdamW's decoupled weight decay, and selection on an exponential moving average of the
# weights (timm's ModelEmaV3 with warm-up).
RECIPE_DEFAULTS = {"augmentation": "default", "label_smoothing": 0.1, "weight_decay": 1e-4, "ema": True,
                   "ema_decay": 0.9998}


@dataclass(frozen=True)
class Param:
    name: str
    type: type  # str, int, float, bool or list (of str)
    default: Any
    help: str
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    positive: bool = False  # strictly greater than 0
    choices: tuple | None = None
    pipeline: bool = True  # a pipeline parameter; False: run-local/compile only (fixed at compile time)
    required: bool = False
    uri: bool = False  # a store or data URI: its scheme (and a file:// host) is checked up front

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """Help text with the default, for argparse and the pipeline's docstring."""
        if self.type is bool:
            return f"{self.help} (default: off)"
        if self.required or self.default in ("", None):
            return self.help
        default = ",".join(self.default) if self.type is list else self.default
        return f"{self.help} (default: {default})"

    def check(self, value: Any) -> Any:
        """The value, normalised; a UsageError naming the parameter when it is out of bounds."""
        if self.type is list:
            return check_backbones(value)
        if self.uri and isinstance(value, str):
            from pneumonia_kfp.storage import check_uri

            check_uri(value, self.name)
        if self.type in (int, float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{self.name}={value}: must be a finite number")
            if self.positive and value <= 0:
                raise UsageError(f"{self.name}={value}: must be greater than 0")
            if self.minimum is not None and value < self.minimum:
                raise UsageError(f"{self.name}={value}: must be at least {self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise UsageError(f"{self.name}={value}: must be at most {self.maximum:g}")
        if self.choices and value not in self.choices:
            raise UsageError(f"{self.name}={value!r}: use one of {', '.join(map(str, self.choices))}")
        return value


PARAMS: tuple[Param, ...] = (
    Param("data", str, None, "ImageFolder root: train|val|test/<class>/<image> (a directory, file:// or s3://)",
          required=True, uri=True),
    Param("storage", str, None, "object store for dataset versions and checkpoints: s3://bucket/prefix or "
          "file:///abs/dir", required=True, uri=True),
    Param("backbones", list, list(SEED_BACKBONES), "comma-separated timm model names, one training task each"),
    Param("epochs", int, 5, "training epochs; the epoch with the best validation AUC is kept",
          minimum=1, maximum=1000),
    Param("image_size", int, 224, "side in pixels images are resized to at ingest",
          minimum=MIN_IMAGE_SIZE, maximum=MAX_IMAGE_SIZE),
    Param("batch_size", int, 32, "images per optimisation step", minimum=1, maximum=4096),
    Param("learning_rate", float, 1e-3, "peak learning rate (AdamW, one-cycle schedule)", positive=True, maximum=10),
    Param("seed", int, 0, "seed of weights, batch order, augmentation and carved splits", minimum=0),
    Param("pretrained", bool, False, "start from ImageNet weights (timm hub, or --pretrained-weights)"),
    Param("pretrained_weights", str, "", "weights for clusters without internet: one file (a run of one "
          "backbone), a directory (path, file:// or s3://) of <backbone>.safetensors|.pth|.pt, or "
          "backbone=FILE,backbone=FILE"),
    Param("on_invalid", str, "fail", "a file that does not decode: stop the run (fail) or leave it out (skip)",
          choices=ON_INVALID),
    Param("compile_model", bool, False, "torch.compile the model for training"),
    Param("threshold_rule", str, "balanced", "default decision threshold: balanced (0.5 under the class-balanced "
          "loss), youden (max sensitivity + specificity on validation) or sensitivity95 (validation sensitivity "
          ">= 0.95); every rule is reported", choices=THRESHOLD_RULES),
    Param("tta", bool, False, "test-time augmentation: average the probability over 5 shifted/zoomed views"),
    Param("external_data", str, "", "a second ImageFolder (its test/ or class folders) every model is also "
          "scored on: a directory, file:// or s3://"),
    Param("serve_name", str, "", "after the report, serve the best model by validation as this KServe "
          "InferenceService in the run's namespace (and register it when a Model Registry is set); empty: no deploy"),
    Param("max_parallel", int, 2, "training tasks at a time (fixed when the pipeline is compiled)",
          minimum=1, maximum=64, pipeline=False),
)
BY_NAME = {p.name: p for p in PARAMS}
PIPELINE_PARAMS = tuple(p for p in PARAMS if p.pipeline)


def default(name: str) -> Any:
    return BY_NAME[name].default


def max_pixels() -> int:
    """The pixel limit for one image: ``PNEUMONIA_KFP_MAX_PIXELS``, default 50 million (50 MP)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{MAX_PIXELS_ENV}={raw!r}: use a positive number of pixels, e.g. 50000000")
    return value


def check_backbones(names: list[str] | str) -> list[str]:
    from pneumonia_kfp.backbones import check_backbone

    if isinstance(names, str):
        names = names.split(",")
    names = [b.strip() for b in names]
    if not any(names):
        raise UsageError("backbones is empty: name at least one timm model, e.g. resnet18,efficientnet_b3")
    if not all(names):
        raise UsageError(f"backbones={','.join(names)!r} has an empty name (a stray comma?): "
                         "list timm model names separated by single commas")
    dupes = sorted({b for b in names if names.count(b) > 1})
    if dupes:
        raise UsageError(f"backbones lists {', '.join(dupes)} more than once")
    for name in names:
        check_backbone(name)
    return names


def check_run_params(params: dict) -> dict:
    """Check the parameters that are present (names as in PARAMS) in place, normalising them."""
    from pneumonia_kfp.backbones import check_image_size

    unknown = sorted(set(params) - set(BY_NAME))
    if unknown:
        raise UsageError(f"unknown parameter(s) {', '.join(unknown)}: known are {', '.join(BY_NAME)}")
    for name, value in params.items():
        if value is not None or BY_NAME[name].required:
            params[name] = BY_NAME[name].check(value)
    if "image_size" in params:
        for name in params.get("backbones", []):
            check_image_size(name, params["image_size"])
    if params.get("pretrained_weights") and params.get("pretrained") is False:  # else silently a run from scratch
        raise UsageError("pretrained_weights is given but pretrained is off, so the weights would be ignored: add "
                         "--pretrained (pipeline: pretrained=true), or leave out --pretrained-weights")
    if params.get("pretrained_weights"):  # its form (no I/O); a directory's files are looked up when training starts
        from pneumonia_kfp.backbones import PretrainedWeights

        PretrainedWeights(params["pretrained_weights"]).check(params.get("backbones") or [])
    if params.get("serve_name"):  # a Kubernetes name: checked before any training, not in the deploy step
        from pneumonia_kfp.service_name import check_name

        check_name(params["serve_name"])
    return params


def add_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None, *,
                  required: tuple[str, ...] = (), helps: dict[str, str] | None = None) -> None:
    """One flag per parameter (all of them, or ``names``); ``helps`` replace a flag's help text."""
    for p in PARAMS:
        if names is not None and p.name not in names:
            continue
        help_text = (helps or {}).get(p.name, p.describe())
        if p.type is bool:
            parser.add_argument(p.flag, action="store_true", help=help_text)
        elif p.type is list:
            parser.add_argument(p.flag, default=",".join(p.default), help=help_text)
        else:
            parser.add_argument(p.flag, type=p.type, default=p.default, choices=p.choices,
                                required=p.name in required, help=help_text)


def from_args(args: argparse.Namespace, names: list[str] | None = None) -> dict:
    """{name: value} of the parameters parsed by ``add_arguments`` (checked)."""
    values = {p.name: getattr(args, p.name) for p in PARAMS
              if (names is None or p.name in names) and hasattr(args, p.name)}
    return check_run_params(values)


def pipeline_signature(return_annotation) -> inspect.Signature:
    """The pipeline function's signature: its parameters in PARAMS order, with their defaults."""
    def annotation(p: Param):
        return List[str] if p.type is list else p.type

    return inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation(p),
                          **({} if p.required else {"default": p.default}))
        for p in PIPELINE_PARAMS
    ], return_annotation=return_annotation)


def pipeline_docstring(summary: str) -> str:
    """Google-style docstring: kfp copies each ``Args`` line into the pipeline's input descriptions."""
    return summary + "\n\nArgs:\n" + "\n".join(f"    {p.name}: {p.describe()}" for p in PIPELINE_PARAMS)
