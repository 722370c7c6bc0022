"""evaluate: the trained checkpoint, at its validation-chosen threshold, on the test split (once).

For the KFP UI each model gets a ``system.Metrics`` (scalars: test metrics with their 95 % CI
bounds, validation AUC, threshold, training figures) and a ``system.ClassificationMetrics``
(``confusionMatrix`` with the class names as ``annotationSpecs``, ROC as ``confidenceMetrics``).
"""
import math

SCALARS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
CI_SCALARS = ("accuracy", "f1", "auc", "sensitivity", "specificity")


def ui_scalars(r: dict) -> dict[str, float]:
    """The Metrics artifact's scalars for one model (finite numbers only: the UI's metadata is a
    protobuf Struct, which has no NaN; an undefined AUC is left out rather than faked)."""
    t = r["test"]
    out = {f"test_{name}": t[name] for name in SCALARS}
    for name in CI_SCALARS:
        lo_hi = t.get("ci95", {}).get(name)
        if lo_hi:
            out[f"test_{name}_ci95_low"], out[f"test_{name}_ci95_high"] = lo_hi
    out.update({
        "test_n": t["n"], "val_auc": r["val"]["auc"], "val_f1": r["val"]["f1"], "threshold": r["threshold"],
        "best_epoch": r["train"]["best_epoch"], "train_seconds": r["train"]["seconds"],
        "train_images_per_second": r["train"]["images_per_second"], "parameters": r.get("parameters"),
    })
    return {k: (v if isinstance(v, int) else round(float(v), 6)) for k, v in out.items()
            if v is not None and math.isfinite(v)}


def evaluate(dataset_uri: str, checkpoint_path: str) -> dict:
    """One model's entry of results.json (plus its test ROC curve and training history)."""
    import torch

    from pneumonia_kfp.backbones import load_checkpoint, predict
    from pneumonia_kfp.data import DataError, StoredDataset
    from pneumonia_kfp.metrics import classification_report, roc_points

    ds = StoredDataset(dataset_uri)
    x, y, _ = ds.split("test")
    if len(set(y.tolist())) < 2:  # sensitivity, specificity and AUC need both classes
        raise DataError(f"{dataset_uri} has {len(y)} test images of {len(set(y.tolist()))} class(es): "
                        f"the test split needs images of each of {', '.join(ds.classes)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_checkpoint(checkpoint_path, device)
    prob = predict(model, x, meta["mean"], meta["std"])
    return {
        "backbone": meta["backbone"], "image_size": meta["image_size"], "epochs": meta["epochs"],
        "pretrained": meta["pretrained"], "threshold": meta["threshold"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "test": classification_report(y, prob, meta["threshold"], ds.classes),
        "val": meta["val"],
        "train": {"seconds": meta["seconds"], "images_per_second": meta["images_per_second"],
                  "best_epoch": meta["best_epoch"], "device": meta["device"], "val_source": meta["val_source"],
                  "history": meta["history"]},
        "roc": roc_points(y, prob),
    }
