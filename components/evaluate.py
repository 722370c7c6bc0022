"""evaluate: the trained checkpoint, at its validation-chosen threshold, on the test split (once)."""

from kfp import dsl

from components.kfp_defaults import component

SCALARS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def evaluate(dataset_uri: str, checkpoint_path: str) -> dict:
    """One model's entry of results.json (plus its test ROC curve and training history)."""
    import torch

    from components.backbones import load_checkpoint, predict
    from components.data import StoredDataset
    from components.metrics import classification_report, roc_points

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_checkpoint(checkpoint_path, device)
    ds = StoredDataset(dataset_uri)
    x, y, _ = ds.split("test")
    if len(y) == 0:
        raise ValueError(f"{dataset_uri} has no test images")
    prob = predict(model, x, meta["mean"], meta["std"])
    return {
        "backbone": meta["backbone"], "image_size": meta["image_size"], "epochs": meta["epochs"],
        "pretrained": meta["pretrained"], "threshold": meta["threshold"],
        "test": classification_report(y, prob, meta["threshold"], ds.classes),
        "val": meta["val"],
        "train": {"seconds": meta["seconds"], "images_per_second": meta["images_per_second"],
                  "best_epoch": meta["best_epoch"], "device": meta["device"], "val_source": meta["val_source"],
                  "history": meta["history"]},
        "roc": roc_points(y, prob),
    }


@component()
def evaluate_op(
    dataset: dsl.Input[dsl.Dataset], model: dsl.Input[dsl.Model], metrics: dsl.Output[dsl.Metrics],
    classification: dsl.Output[dsl.ClassificationMetrics], results: dsl.Output[dsl.Artifact],
):
    """Test-set metrics of one model: scalars, confusion matrix + ROC for the UI, results JSON."""
    import json

    from components.evaluate import SCALARS, evaluate

    r = evaluate(dataset.metadata["uri"], model.path)
    for name in SCALARS:
        metrics.log_metric(f"test_{name}", round(r["test"][name], 6))
    metrics.log_metric("threshold", round(r["threshold"], 6))
    metrics.log_metric("best_epoch", r["train"]["best_epoch"])
    classification.log_confusion_matrix(r["test"]["labels"], r["test"]["confusion_matrix"])
    classification.log_roc_curve(r["roc"]["fpr"], r["roc"]["tpr"], r["roc"]["thresholds"])
    results.metadata["backbone"] = r["backbone"]
    with open(results.path, "w") as f:
        json.dump(r, f, indent=1)
