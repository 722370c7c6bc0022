"""report step: every model's results side by side, read from the run's folder in the store."""
from typing import List

from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def report_op(
    dataset: dsl.Input[dsl.Dataset], run_dir: str, backbones: List[str], markdown: dsl.Output[dsl.Markdown],
    html: dsl.Output[dsl.HTML], summary: dsl.Output[dsl.Artifact],
):
    """Compare every backbone: Markdown and HTML for the UI, and the combined results.json.

    Args:
        dataset: the ingested dataset version (counts and provenance for the report's header).
        run_dir: the run's folder in the store, where every evaluate wrote its model's results JSON.
        backbones: the backbones this run trained, one results JSON each.
        markdown: the comparison as Markdown.
        html: the comparison as one self-contained HTML page (inline figures, no network).
        summary: results.json: the dataset, every model and the best one by validation.
    """
    import json

    from pneumonia_kfp.report import report
    from pneumonia_kfp.runs import load_results

    models = load_results(run_dir, backbones)
    with open(dataset.path) as f:
        info = json.load(f)  # the file keeps ints; KFP metadata turns numbers into floats
    combined, md, page = report(info, models)
    for artifact, text in ((markdown, md), (html, page), (summary, json.dumps(combined, indent=1))):
        with open(artifact.path, "w") as f:
            f.write(text)
    summary.metadata["best"] = combined["best"]["backbone"]
