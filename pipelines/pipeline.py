"""The pipeline: ingest -> ParallelFor(backbones) { train -> evaluate } -> report(Collected).

Its parameters, their defaults and their descriptions come from pneumonia_kfp.params.PARAMS.
"""
from typing import NamedTuple, Optional

from kfp import dsl

from pneumonia_kfp.components.evaluate import evaluate_op
from pneumonia_kfp.components.ingest import ingest_op
from pneumonia_kfp.components.report import report_op
from pneumonia_kfp.components.train import train_op
from pneumonia_kfp.params import PIPELINE_PARAMS, check_run_params, default, pipeline_docstring, pipeline_signature
from pneumonia_kfp.pipelines.platform import configure
from pneumonia_kfp.pipelines.settings import Settings

PIPELINE_NAME = "pneumonia-kfp"

Outputs = NamedTuple("Outputs", [("results", dsl.Artifact), ("report_md", dsl.Markdown), ("report_html", dsl.HTML),
                                 ("predictions", dsl.Artifact)])


def build_pipeline(max_parallel: int = default("max_parallel"), settings: Optional[Settings] = None):
    """The pipeline function; ``max_parallel`` is fixed at compile time (KFP's ParallelFor needs a constant).

    ``settings`` (a cluster compile) adds the image, GPU scheduling, resources, retries and the MinIO
    Secret to the tasks; local runs leave them out (the local runner ignores them, or retries locally).
    """
    check_run_params({"max_parallel": max_parallel})

    def pneumonia_pipeline(*values) -> Outputs:
        p = dict(zip((q.name for q in PIPELINE_PARAMS), values, strict=True))  # kfp passes one channel per parameter
        ingest = ingest_op(data=p["data"], storage=p["storage"], image_size=p["image_size"], seed=p["seed"],
                           on_invalid=p["on_invalid"])
        with dsl.ParallelFor(p["backbones"], parallelism=max_parallel) as backbone:
            train = train_op(
                dataset=ingest.outputs["dataset"], backbone=backbone, epochs=p["epochs"], batch_size=p["batch_size"],
                learning_rate=p["learning_rate"], seed=p["seed"], pretrained=p["pretrained"],
                pretrained_weights=p["pretrained_weights"], compile_model=p["compile_model"],
                threshold_rule=p["threshold_rule"], tta=p["tta"],
            )
            evaluate = evaluate_op(dataset=ingest.outputs["dataset"], model=train.outputs["model"],
                                   external_data=p["external_data"])
        report = report_op(dataset=ingest.outputs["dataset"], results=dsl.Collected(evaluate.outputs["results"]))
        if settings is not None:
            configure(settings, ingest=ingest, train=train, evaluate=evaluate, report=report)
        return Outputs(results=report.outputs["summary"], report_md=report.outputs["markdown"],
                       report_html=report.outputs["html"], predictions=report.outputs["predictions"])

    pneumonia_pipeline.__signature__ = pipeline_signature(Outputs)
    pneumonia_pipeline.__doc__ = pipeline_docstring("Chest X-ray pneumonia classifiers: train and compare backbones.")
    return dsl.pipeline(name=PIPELINE_NAME)(pneumonia_pipeline)
