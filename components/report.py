"""report step: every model's results side by side, read from the run's folder in the store, plus their ensemble."""
from typing import List

from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def report_op(
    dataset: dsl.Input[dsl.Dataset], run_dir: str, backbones: List[str], markdown: dsl.Output[dsl.Markdown],
    html: dsl.Output[dsl.HTML], summary: dsl.Output[dsl.Artifact], predictions: dsl.Output[dsl.Artifact],
    ensemble_metrics: dsl.Output[dsl.Metrics], ensemble_classification: dsl.Output[dsl.ClassificationMetrics],
):
    """Compare every backbone and their ensemble: Markdown and HTML for the UI, results.json, predictions CSV.

    Args:
        dataset: the ingested dataset version (counts and provenance; test images for the error thumbnails).
        run_dir: the run's folder in the store, where every evaluate wrote its model's results JSON.
        backbones: the backbones this run trained, one results JSON each.
        markdown: the comparison as Markdown.
        html: the comparison as one self-contained HTML page (inline figures, no network).
        summary: results.json: the dataset, every model, the ensemble and the best one by validation.
        predictions: per-image CSV: split, file, patient, label, probability of each model and the ensemble.
        ensemble_metrics: the ensemble's test scalars (empty with one backbone).
        ensemble_classification: the ensemble's test confusion matrix and ROC (empty with one backbone).
    """
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("report-op"):
        import json

        from pneumonia_kfp.evaluation import ENSEMBLE, combine
        from pneumonia_kfp.outputs import document, write_files
        from pneumonia_kfp.report import log_ui_metrics, render_from_store
        from pneumonia_kfp.runs import load_results

        models = load_results(run_dir, backbones)
        with open(dataset.path) as f:
            info = json.load(f)  # the file keeps ints; KFP metadata turns numbers into floats
        combined, md, page, csv = render_from_store(combine(info, models))
        # strict JSON, and every file whole or not at all
        write_files({markdown.path: md, html.path: page, summary.path: document(combined), predictions.path: csv})
        summary.metadata["best"] = combined["best"]["backbone"]
        for m in combined["models"]:
            if m["backbone"] == ENSEMBLE:
                log_ui_metrics(m, ensemble_metrics, ensemble_classification)
