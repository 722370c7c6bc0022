"""predict: each image's P(positive class) and label from a trained model, at the model's own
validation-chosen threshold (or another rule's, chosen on the same validation predictions).

Images are files, folders (every file under them, hidden ones left out) and s3:// URIs (one object or
every object under a prefix, downloaded into a scratch folder). They are listed by ``sources`` and read
by ``image_reader``, as ingest and evaluate list and read them: the same stat checks (a symlink leading
out of the folder given, a symlink loop, a FIFO, a device are refused without being opened) and the
same reader (each file opened once, never blocking, decoded fully within the pixel limit, converted to
grayscale and resized), so a file ingest refuses is refused here, with the same reason. A refused file
does not stop the others.

The model runs as ONNX (``model.onnx``, onnxruntime) by default, as the torch.export program
(``model.pt2``) when there is no ONNX model, or from the checkpoint (``checkpoint.pt``, timm). All three
take uint8 N×1×S×S and give the same probabilities (to 1e-4). Without test-time augmentation: the
exported forms have none.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumonia_kfp.errors import UsageError

log = logging.getLogger(__name__)
ENGINES = ("onnx", "pt2", "checkpoint")
OUTPUT_SUFFIXES = (".csv", ".json")
FIELDS = ("file", "probability", "label", "threshold", "threshold_rule", "model_id", "engine")
FORMAT = 1  # of the JSON output


class PredictError(UsageError):
    """A model directory, engine, threshold rule or output that predict cannot use."""


@dataclass
class Model:
    """A loaded model: ``run(uint8 N×1×S×S) -> P(positive), N`` and what its metadata says."""

    engine: str
    run: object
    backbone: str
    classes: list[str]
    image_size: int
    threshold_rule: str
    thresholds: dict[str, float]
    model_id: str
    tta: bool = False


@dataclass
class Predictions:
    model: Model
    rule: str
    threshold: float
    rows: list[dict] = field(default_factory=list)  # file, probability, label
    failed: list[dict] = field(default_factory=list)  # file, reason


# --- the model -----------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _engine_file(directory: Path, engine: str) -> Path:
    from pneumonia_kfp.export import CHECKPOINT, ONNX, PT2

    return directory / {"onnx": ONNX, "pt2": PT2, "checkpoint": CHECKPOINT}[engine]


def _choose_engine(directory: Path, engine: str) -> str:
    """``engine``, or for the default (onnx) the next form the directory has: pt2, then the checkpoint."""
    if engine not in ENGINES:
        raise PredictError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if _engine_file(directory, engine).is_file():
        if engine != "onnx":
            return engine
        try:
            import onnxruntime  # noqa: F401
            return engine
        except ImportError:
            why = "onnxruntime is not installed"
    else:
        why = f"{directory / 'model.onnx'} does not exist"
    if engine == "onnx":
        for other in ("pt2", "checkpoint"):
            if _engine_file(directory, other).is_file():
                log.warning("predict: %s; falling back to %s (%s)", why, other, _engine_file(directory, other).name)
                return other
    from pneumonia_kfp.backbones import WHERE_MODELS_ARE

    raise PredictError(f"model {directory}: {_engine_file(directory, engine).name} does not exist, so --engine "
                       f"{engine} cannot run; pass {WHERE_MODELS_ARE}, or another --engine")


def load_model(model_dir: str | Path, engine: str = "onnx") -> Model:
    """The model of a model directory (train's output) in ``engine``'s form; a one-line error when it cannot."""
    from pneumonia_kfp.backbones import WHERE_MODELS_ARE, ModelFileError
    from pneumonia_kfp.export import CHECKPOINT
    from pneumonia_kfp.inference import PREDICT_PIXELS

    directory = Path(model_dir)
    if not directory.exists():
        raise ModelFileError(f"model {model_dir} does not exist: pass {WHERE_MODELS_ARE}")
    if not directory.is_dir():
        raise ModelFileError(f"model {model_dir} is a file: pass {WHERE_MODELS_ARE}, e.g. {directory.parent}")
    engine = _choose_engine(directory, engine)
    path = _engine_file(directory, engine)
    if engine == "checkpoint":
        from pneumonia_kfp.backbones import load_checkpoint
        from pneumonia_kfp.inference import predict

        net, meta = load_checkpoint(path, "cpu", required=("image_size", "mean", "std", "threshold_rule",
                                                           "thresholds", "tta"))
        mean, std = meta["mean"], meta["std"]

        def run(x):
            return predict(net, x, mean, std, tta=False)
        tta = bool(meta["tta"])
    else:
        meta, run = _load_exported(path, engine, PREDICT_PIXELS)
        tta = bool(meta["tta_used_in_evaluation"])
    checkpoint = directory / CHECKPOINT
    sha = _sha256(checkpoint if checkpoint.is_file() else path)
    model_id = f"{meta['backbone']}@sha256:{sha[:16]}"
    return Model(engine, run, meta["backbone"], list(meta["classes"]), int(meta["image_size"]),
                 meta["threshold_rule"], {k: float(v) for k, v in meta["thresholds"].items()}, model_id, tta)


def _load_exported(path: Path, engine: str, pixels: int):
    from pneumonia_kfp.backbones import ModelFileError
    from pneumonia_kfp.documents import DocumentError
    from pneumonia_kfp.export import load_onnx, load_pt2

    try:
        handle, meta = (load_onnx if engine == "onnx" else load_pt2)(path)
    except DocumentError:  # loaded, but its metadata is of another format: that line says so
        raise
    except Exception as e:  # a damaged or foreign file: the loaders raise almost anything
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        what = "an ONNX model" if engine == "onnx" else "a torch.export program"
        raise ModelFileError(f"{path} cannot be loaded as {what} ({type(e).__name__}: {first}): export the model "
                             "again, or pass another --engine") from None
    batch = max(1, pixels // int(meta["image_size"]) ** 2)
    if engine == "onnx":
        def run(x):
            return np.concatenate([handle.run(None, {"images": x[k:k + batch]})[0]
                                   for k in range(0, len(x), batch)] or [np.zeros(0, np.float32)])
    else:
        import torch

        def run(x):
            with torch.inference_mode():
                return np.concatenate([handle(torch.from_numpy(x[k:k + batch])).numpy()
                                       for k in range(0, len(x), batch)] or [np.zeros(0, np.float32)])
    return meta, run


def threshold_for(model: Model, rule: str | None = None) -> tuple[str, float]:
    """(rule, threshold): the model's own rule by default; every rule's threshold was chosen on validation."""
    rule = rule or model.threshold_rule
    if rule not in model.thresholds:
        raise PredictError(f"--threshold-rule {rule}: the model has thresholds for {', '.join(model.thresholds)} "
                           "only")
    return rule, model.thresholds[rule]


def label(model: Model, probability: float, threshold: float) -> str:
    """The positive class at or above ``threshold``, else the negative one (predict's and serve's rule)."""
    return model.classes[1] if probability >= threshold else model.classes[0]


def check_output(output: str | None) -> None:
    if output and Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise PredictError(f"--output {output}: name a .csv or .json file")


# --- the images ----------------------------------------------------------------------------------------

def predict_paths(model_dir: str | Path, paths: list[str], engine: str = "onnx",
                  rule: str | None = None) -> Predictions:
    """Every image ``paths`` names, predicted; files that cannot be read are listed with their reason."""
    from pneumonia_kfp.image_reader import read_named

    model = load_model(model_dir, engine)
    rule, threshold = threshold_for(model, rule)
    if model.tta:
        log.warning("predict: the model's thresholds were chosen on test-time-augmented predictions; predict "
                    "uses none (the exported forms have none)")
    out = Predictions(model, rule, threshold)
    files, results, images = read_named(paths, model.image_size)  # listed and read as ingest lists and reads
    good = [i for i, r in enumerate(results) if not r.reason]
    out.failed = [{"file": f.relpath, "reason": r.reason} for f, r in zip(files, results, strict=True) if r.reason]
    prob = model.run(np.ascontiguousarray(images[good])) if good else np.zeros(0, np.float32)
    for i, p in zip(good, prob, strict=True):
        out.rows.append({"file": files[i].relpath, "probability": float(p),
                         "label": label(model, float(p), threshold)})
    return out


# --- the outputs ---------------------------------------------------------------------------------------

def records(p: Predictions) -> list[dict]:
    """One record per predicted image, with every field of FIELDS."""
    return [{**r, "threshold": p.threshold, "threshold_rule": p.rule, "model_id": p.model.model_id,
             "engine": p.model.engine} for r in p.rows]


def table(p: Predictions) -> str:
    """The console table: file, P(positive class), label."""
    head = ("file", f"P({p.model.classes[1]})", "label")
    lines = [(r["file"], f"{r['probability']:.4f}", r["label"]) for r in p.rows]
    width = max([len(head[0])] + [len(f) for f, _, _ in lines])
    pw = max(len(head[1]), 6)
    return "\n".join(f"{a:<{width}}  {b:>{pw}}  {c}" for a, b, c in [head, *lines])


def write(p: Predictions, output: str | Path) -> None:
    """``output`` (.csv or .json), whole or not at all (outputs.write_file)."""
    from pneumonia_kfp.outputs import document, write_file

    output = Path(output)
    check_output(str(output))
    if output.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records(p))
        write_file(output, buf.getvalue())
        return
    m = p.model
    doc = {"format": FORMAT,
           "model": {"model_id": m.model_id, "backbone": m.backbone, "engine": m.engine, "classes": m.classes,
                     "image_size": m.image_size, "threshold": p.threshold, "threshold_rule": p.rule},
           "predictions": records(p), "failed": p.failed}
    write_file(output, document(doc) + "\n")
