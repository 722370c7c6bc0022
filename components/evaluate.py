"""evaluate step: one model on the test split, once, at its validation-chosen threshold."""
from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def evaluate_op(
    dataset: dsl.Input[dsl.Dataset], model: dsl.Input[dsl.Model], run_dir: str, metrics: dsl.Output[dsl.Metrics],
    classification: dsl.Output[dsl.ClassificationMetrics], results: dsl.Output[dsl.Artifact],
):
    """Test-set metrics of one model: scalars, confusion matrix + ROC for the UI, results JSON.

    Args:
        dataset: the ingested dataset version; its test split is scored.
        model: a checkpoint written by train.
        run_dir: the run's folder in the store (from start); the results JSON goes there for the report.
        metrics: test scalars with 95 % CI bounds, validation AUC/F1, threshold and training figures.
        classification: confusion matrix (class names as labels) and test ROC for the UI.
        results: this model's entry of results.json.
    """
    import json
    import math

    from pneumonia_kfp.evaluation import evaluate, ui_scalars
    from pneumonia_kfp.runs import save_result

    r = evaluate(dataset.metadata["uri"], model.path)
    for name, value in ui_scalars(r).items():
        metrics.log_metric(name, value)
    classification.log_confusion_matrix(r["test"]["labels"], r["test"]["confusion_matrix"])
    if all(math.isfinite(v) for v in r["roc"]["fpr"] + r["roc"]["tpr"]):  # undefined on a one-class test split
        classification.log_roc_curve(r["roc"]["fpr"], r["roc"]["tpr"], r["roc"]["thresholds"])
    results.metadata["backbone"] = r["backbone"]
    with open(results.path, "w") as f:
        json.dump(r, f, indent=1)
    save_result(run_dir, r)
