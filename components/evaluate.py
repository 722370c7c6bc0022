"""evaluate step: one model on the test split, once, at its validation-chosen threshold."""
from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def evaluate_op(
    dataset: dsl.Input[dsl.Dataset], model: dsl.Input[dsl.Model], run_dir: str, external_data: str,
    metrics: dsl.Output[dsl.Metrics], classification: dsl.Output[dsl.ClassificationMetrics],
    results: dsl.Output[dsl.Artifact],
):
    """Test-set metrics of one model: scalars, confusion matrix + ROC for the UI, results JSON.

    Args:
        dataset: the ingested dataset version; its test split is scored.
        model: a model directory written by train.
        run_dir: the run's folder in the store (from start); the results JSON goes there for the report.
        external_data: a second ImageFolder (test/ or class folders) also scored; empty: none.
        metrics: test (and external) scalars with 95 % CI bounds, validation AUC/F1, threshold, training figures.
        classification: confusion matrix (class names as labels) and test ROC for the UI.
        results: this model's entry of results.json, with its per-image predictions.
    """
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("evaluate-op"):
        from pneumonia_kfp.evaluation import evaluate
        from pneumonia_kfp.outputs import document, write_file
        from pneumonia_kfp.report import log_ui_metrics
        from pneumonia_kfp.runs import save_result

        r = evaluate(dataset.metadata["uri"], model.path, external_data=external_data)
        r["model_uri"] = model.uri  # run-local copies the model directory from here
        log_ui_metrics(r, metrics, classification)
        results.metadata["backbone"] = r["backbone"]
        write_file(results.path, document(r, indent=None))  # strict JSON, whole or not at all
        save_result(run_dir, r)
