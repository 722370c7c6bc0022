"""The documents the steps hand each other (dataset manifest, checkpoint metadata, per-model result,
results.json): each carries an integer `format`, and a reader meeting a format it does not know says
so in one line naming the file, instead of guessing at missing fields.

No `from __future__ import annotations` here: TypedDict sees NotRequired only in evaluated annotations."""

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

from pneumonia_kfp.errors import PneumoniaKfpError

VAL_FROM_DATASET = "dataset val split"  # a checkpoint's val_source when the dataset's own val split was used


class DocumentError(PneumoniaKfpError, ValueError):
    """A document of an unknown or missing format, or missing a field its writer always writes."""


def check_format(doc: Any, kind: str, version: int, where: str) -> Mapping[str, Any]:
    """`doc` as read from `where`, if it is a `kind` document of format `version`; else one line."""
    if not isinstance(doc, Mapping):
        raise DocumentError(f"{where}: not a {kind} document (a JSON object was expected, found "
                            f"{type(doc).__name__}); regenerate it with this version of pneumonia-kfp")
    found = doc.get("format")
    if found != version:
        said = "no format field" if found is None else f"format {found!r}"
        raise DocumentError(f"{where}: {kind} document with {said}, this version reads format {version}; "
                            "regenerate it with this version of pneumonia-kfp (or read it with the version "
                            "that wrote it)")
    return doc


def require(doc: Mapping[str, Any], fields: tuple[str, ...], kind: str, where: str) -> None:
    """Every field the writer always writes is there: a reader never falls back to a default for it."""
    missing = [f for f in fields if f not in doc]
    if missing:
        raise DocumentError(f"{where}: {kind} document lacks {', '.join(missing)}; it was not written by "
                            "this version of pneumonia-kfp, regenerate it")


def fields_of(definition: type) -> tuple[str, ...]:
    """The fields a writer always writes: a TypedDict's required keys, in declaration order."""
    return tuple(k for k in definition.__annotations__ if k in definition.__required_keys__)


def _written(definition: type, kind: str, version: int, fields: dict[str, Any]) -> dict[str, Any]:
    """A writer's document: ``fields`` stamped with ``format``; a writer that leaves out a field the
    definition requires, or adds one it does not name, is a bug (TypeError), never a file."""
    known = set(definition.__annotations__)
    missing = [f for f in fields_of(definition) if f != "format" and f not in fields]
    stray = sorted(set(fields) - known)
    if missing or stray:
        raise TypeError(f"{kind} document: missing {missing}, unknown {stray}")
    return {"format": version, **fields}


def _read(definition: type, kind: str, version: int, doc: Any, where: str,
          fields: tuple[str, ...] | None = None) -> Any:
    doc = check_format(doc, kind, version, where)
    wanted = fields_of(definition) if fields is None else fields
    unknown = sorted(set(wanted) - set(definition.__annotations__))
    if unknown:  # a reader asking for what no writer writes
        raise TypeError(f"{kind} document has no fields {unknown}")
    require(doc, wanted, kind, where)
    return doc


# --- checkpoint metadata: what train stores beside the weights in checkpoint.pt --------------------------

CHECKPOINT_FORMAT = 1
CHECKPOINT = "checkpoint"


class CheckpointMeta(TypedDict):
    """train's record of a model, beside ``state_dict`` in checkpoint.pt (evaluate, export and predict read it)."""
    format: int
    backbone: str  # a timm name
    classes: list[str]  # [negative, positive]
    image_size: int
    mean: float  # grayscale normalisation
    std: float
    epochs: int
    best_epoch: int  # the epoch kept (best validation AUC)
    pretrained: bool
    dataset_uri: str
    val_source: str  # how validation was made: VAL_FROM_DATASET, or a sentence on the carve from train
    recipe: dict[str, Any]  # training.Recipe as a dict
    seconds: float  # training time
    images_per_second: float
    history: list[dict[str, Any]]  # one row per epoch
    device: str
    threshold_rule: str  # the default rule (params' threshold_rule)
    threshold: float  # thresholds[threshold_rule]
    thresholds: dict[str, float]  # every rule's threshold, chosen on validation
    tta: bool  # validation (and so evaluation) predicted with test-time augmentation
    val: dict[str, Any]  # metrics.classification_report on validation
    val_predictions: dict[str, list]  # the validation prediction block (file, patient, label, prob)


def checkpoint_meta(**fields: Any) -> CheckpointMeta:
    """The metadata train writes: every CheckpointMeta field, and the format."""
    return _written(CheckpointMeta, CHECKPOINT, CHECKPOINT_FORMAT, fields)


def read_checkpoint_meta(doc: Any, where: str, fields: tuple[str, ...] | None = None) -> CheckpointMeta:
    """A checkpoint's metadata of this format with ``fields`` (all by default): a reader's check."""
    return _read(CheckpointMeta, CHECKPOINT, CHECKPOINT_FORMAT, doc, where, fields)


# --- the exported model's metadata: metadata.json, and inside model.pt2 and model.onnx ------------------

MODEL_INFO_FORMAT = 1
MODEL_INFO = "model metadata"


class ModelInfo(TypedDict):
    """What a consumer of the serving forms needs, made by export from the checkpoint's metadata."""
    format: int
    formats: dict[str, str]  # serving form -> file name
    backbone: str
    classes: list[str]
    positive_class: str
    threshold: float
    threshold_rule: str
    thresholds: dict[str, float]
    image_size: int
    input: str
    output: str
    best_epoch: int
    tta_used_in_evaluation: bool  # the thresholds were chosen on TTA predictions; the serving forms have none
    triton: dict[str, str]  # the Triton repository folder and model name


def model_info(**fields: Any) -> ModelInfo:
    return _written(ModelInfo, MODEL_INFO, MODEL_INFO_FORMAT, fields)


def read_model_info(doc: Any, where: str) -> ModelInfo:
    return _read(ModelInfo, MODEL_INFO, MODEL_INFO_FORMAT, doc, where)


# --- the result document: one model's results (evaluate writes it; the ensemble is one too) ---------------

RESULT_FORMAT = 1
RESULT = "result"


class TrainBlock(TypedDict):
    seconds: float
    images_per_second: float | None  # None: the ensemble
    best_epoch: int | None
    history: list[dict[str, Any]]
    device: NotRequired[str]  # a trained model's (not the ensemble's)
    val_source: NotRequired[str]


class ModelResult(TypedDict):
    """One model's entry of results.json; evaluate's file adds the per-image ``predictions``."""
    format: int
    backbone: str  # or evaluation.ENSEMBLE
    image_size: int
    epochs: int
    pretrained: bool
    tta: bool
    parameters: int
    val: dict[str, Any]  # classification_report at the default threshold
    train: TrainBlock
    threshold: float
    threshold_rule: str
    thresholds: dict[str, float]
    test: dict[str, Any]
    operating_points: list[dict[str, Any]]
    roc: dict[str, list[float]]
    recipe: NotRequired[dict[str, Any]]  # a trained model's
    members: NotRequired[list[str]]  # the ensemble's backbones
    external: NotRequired[dict[str, Any]]  # when external data was scored
    predictions: NotRequired[dict[str, dict[str, list]]]  # evaluate's file; results.json leaves them out
    model_uri: NotRequired[str]  # the pipeline's model artifact (run-local: OUT/models/<backbone>)


def model_result(**fields: Any) -> ModelResult:
    return _written(ModelResult, RESULT, RESULT_FORMAT, fields)


def read_result(doc: Any, where: str) -> ModelResult:
    return _read(ModelResult, RESULT, RESULT_FORMAT, doc, where)


# --- results.json: every model side by side (report and run-local write it) ------------------------------

RESULTS_FORMAT = 1
RESULTS = "results.json"


class Results(TypedDict):
    format: int
    dataset: dict[str, Any]  # ingest's dataset summary (uri, classes, counts, ...), or evaluate's external data
    models: list[ModelResult]  # by backbone, the ensemble last
    best: dict[str, str] | None  # backbone and the rule that chose it; None without models
    wall_seconds: NotRequired[float]  # run-local's wall time


def results(**fields: Any) -> Results:
    return _written(Results, RESULTS, RESULTS_FORMAT, fields)


def read_results(doc: Any, where: str) -> Results:
    """results.json of this format, and each model entry a result document of its format."""
    doc = _read(Results, RESULTS, RESULTS_FORMAT, doc, where)
    for i, m in enumerate(doc["models"]):
        read_result(m, f"{where} models[{i}]")
    return doc
