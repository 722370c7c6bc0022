"""evaluate: a trained model's result document -- its test figures at every validation-chosen
operating point, per-image predictions, optionally an external dataset -- and the run's results
(``combine``: every model, their ensemble and the best one by validation).

A result document (one model's entry of results.json) carries its per-image probabilities under
``predictions`` (``val``, ``test`` and, when scored, ``external``: file, patient, label, prob), so the
report step can average the backbones into the ensemble (``combine``) and ``report`` can write the
predictions CSV without touching a model again.

For the KFP UI each model gets a ``system.Metrics`` (scalars: test metrics with their 95 % CI
bounds, validation AUC, threshold, training figures) and a ``system.ClassificationMetrics``
(``confusionMatrix`` with the class names as ``annotationSpecs``, ROC as ``confidenceMetrics``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pneumonia_kfp import documents
from pneumonia_kfp.documents import CheckpointMeta, ModelResult, fields_of, model_result
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.image_reader import read_labelled_folder  # read as ingest reads
from pneumonia_kfp.inference import predict, predictions_block

log = logging.getLogger(__name__)
ENSEMBLE = "ensemble"
PREDICTION_SPLITS = ("val", "test", "external")  # the prediction blocks a result document may carry


def _groups(block: dict) -> list[str]:
    """Bootstrap clusters: the patient where the file name gives one, else the file itself."""
    return [p or f for p, f in zip(block["patient"], block["file"], strict=True)]


def score(block: dict, threshold: float, classes: list[str], seed: int = 0) -> dict:
    """A split's block of results.json from its predictions (patient-level bootstrap CIs)."""
    from pneumonia_kfp.metrics import classification_report

    return classification_report(block["label"], block["prob"], threshold, classes, ci_seed=seed,
                                 groups=_groups(block))


def operating_points(rules: dict[str, float], default_rule: str, predictions: dict) -> list[dict]:
    """Each rule's threshold (chosen on validation) with its figures on every scored split."""
    from pneumonia_kfp.metrics import rates_at

    return [{"rule": rule, "threshold": t, "default": rule == default_rule,
             **{split: rates_at(p["label"], p["prob"], t) for split, p in predictions.items()}}
            for rule, t in rules.items()]


def scored_document(head: dict, predictions: dict, rules: dict, rule: str, classes: list[str]) -> ModelResult:
    """The result document: ``head`` plus threshold, test (and external) blocks, operating points, test ROC
    and predictions."""
    from pneumonia_kfp.metrics import roc_points

    t = rules[rule]
    doc = {**head, "threshold": t, "threshold_rule": rule, "thresholds": rules}
    for split in ("test", "external"):
        if split in predictions:
            doc[split] = score(predictions[split], t, classes)
    doc["operating_points"] = operating_points(rules, rule, predictions)
    test = predictions["test"]
    doc["roc"] = roc_points(test["label"], test["prob"])
    doc["predictions"] = predictions
    return model_result(**doc)


def model_document(meta: CheckpointMeta, parameters: int, predictions: dict) -> ModelResult:
    """One model's entry of results.json from its checkpoint metadata and scored predictions."""
    head = {
        "backbone": meta["backbone"], "image_size": meta["image_size"], "epochs": meta["epochs"],
        "pretrained": meta["pretrained"], "tta": meta["tta"], "recipe": meta["recipe"],
        "parameters": parameters, "val": meta["val"],
        "train": {"seconds": meta["seconds"], "images_per_second": meta["images_per_second"],
                  "best_epoch": meta["best_epoch"], "device": meta["device"], "val_source": meta["val_source"],
                  "history": meta["history"]},
    }
    predictions = {"val": meta["val_predictions"], **predictions}
    return scored_document(head, predictions, meta["thresholds"], meta["threshold_rule"], meta["classes"])


def load_model(model_path: str, device):
    """(model, checkpoint metadata) of a model directory train wrote (or its checkpoint file)."""
    from pneumonia_kfp.backbones import WHERE_MODELS_ARE, ModelFileError, load_checkpoint
    from pneumonia_kfp.export import CHECKPOINT, checkpoint_in

    path = Path(model_path)
    if not path.exists():
        raise ModelFileError(f"model {model_path} does not exist: pass {WHERE_MODELS_ARE}")
    if path.is_dir() and not (path / CHECKPOINT).is_file():
        raise ModelFileError(f"model {model_path}: no checkpoint there ({CHECKPOINT} is missing); pass "
                             f"{WHERE_MODELS_ARE}")
    return load_checkpoint(checkpoint_in(model_path), device, required=fields_of(CheckpointMeta))


def evaluate(dataset_uri: str, model_path: str, external_data: str = "") -> dict:
    """One model's entry of results.json: the dataset's test split, and ``external_data`` when given.

    ``model_path``: a model directory written by train (or its checkpoint file).
    """
    from pneumonia_kfp.data import StoredDataset
    from pneumonia_kfp.device import select_device

    ds = StoredDataset(dataset_uri)
    x, y, entries = ds.split("test")
    if len(set(y.tolist())) < 2:  # sensitivity, specificity and AUC need both classes
        raise DataError(f"{dataset_uri} has {len(y)} test images of {len(set(y.tolist()))} class(es): "
                        f"the test split needs images of each of {', '.join(ds.classes)}")
    # after the data check: a bad test split fails before any model loads
    model, meta = load_model(model_path, select_device())
    tta = meta["tta"]
    predictions = {"test": predictions_block(entries, y, predict(model, x, meta["mean"], meta["std"], tta))}
    if external_data:
        ex, ey, ee = read_labelled_folder(external_data, meta["image_size"], meta["classes"])
        warn_one_class(external_data, ey, meta["classes"])
        predictions["external"] = predictions_block(ee, ey, predict(model, ex, meta["mean"], meta["std"], tta))
    return model_document(meta, sum(p.numel() for p in model.parameters()), predictions)


def ensemble(models: list[dict]) -> dict | None:
    """The mean probability of every backbone, its thresholds chosen on validation; None for < 2 models.

    Images are matched by file across the models; the default rule is the models' own.
    """
    from pneumonia_kfp.metrics import thresholds

    if len(models) < 2:
        return None
    first = models[0]
    predictions = {}
    for split in PREDICTION_SPLITS:
        if not all(split in m["predictions"] for m in models):
            continue
        files = first["predictions"][split]["file"]
        probs = []
        for m in models:
            block = m["predictions"][split]
            where = dict(zip(block["file"], block["prob"], strict=True))
            if set(where) != set(files):
                raise DataError(f"{m['backbone']} scored other {split} images than {first['backbone']}: "
                                "an ensemble needs the same images (same dataset and seed)")
            probs.append([where[f] for f in files])
        predictions[split] = {**first["predictions"][split], "prob": np.mean(probs, axis=0).tolist()}
    val = predictions["val"]
    rules = thresholds(val["label"], val["prob"])
    rule = first["threshold_rule"]
    classes = first["test"]["labels"]
    head = {
        "backbone": ENSEMBLE, "members": [m["backbone"] for m in models], "image_size": first["image_size"],
        "epochs": first["epochs"], "pretrained": all(m["pretrained"] for m in models),
        "tta": first["tta"], "parameters": sum(m["parameters"] for m in models),
        "val": score(val, rules[rule], classes),
        "train": {"seconds": sum(m["train"]["seconds"] for m in models), "images_per_second": None,
                  "best_epoch": None, "history": []},
    }
    return scored_document(head, predictions, rules, rule, classes)


BEST_RULE = "highest validation AUC (ties: higher validation F1); test metrics play no part in the choice"


def best_model(models: list[dict]) -> dict:
    return max(models, key=lambda m: (m["val"]["auc"], m["val"]["f1"]))


def combine(dataset: dict, models: list[dict]) -> dict:
    """The run's results: the dataset and every model sorted by backbone name, the ensemble (of two or
    more) last, and the best model by validation. The models keep their per-image predictions (the
    report renders them into the predictions CSV and leaves them out of results.json)."""
    models = sorted(models, key=lambda m: m["backbone"])
    combined = ensemble(models)
    models = models + ([combined] if combined else [])
    best = {"backbone": best_model(models)["backbone"], "rule": BEST_RULE} if models else None
    return documents.results(dataset=dataset, models=models, best=best)


def warn_one_class(data: str, labels, classes: list[str]) -> None:
    """One warning line when ``data`` holds one class only: name the figures left undefined (null)."""
    from pneumonia_kfp.metrics import undefined

    names = {"sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1", "auc": "AUC"}
    missing = [c for i, c in enumerate(classes) if not (np.asarray(labels) == i).any()]
    if missing:
        figures = ", ".join(names[k] for k in names if k in undefined(labels))
        log.warning("%s holds no %s images: %s need both classes and are undefined (null in results.json); "
                    "the other figures are shown", data, " or ".join(missing), figures)
