"""The pipeline: ingest -> ParallelFor(backbones) { train -> evaluate } -> report(Collected)."""

from typing import List, NamedTuple, Optional

from kfp import dsl

from components.backbones import SEED_BACKBONES
from components.evaluate import evaluate_op
from components.ingest import ingest_op
from components.report import report_op
from components.train import train_op
from pipelines.platform import configure
from pipelines.settings import Settings

DEFAULT_BACKBONES = list(SEED_BACKBONES)
DEFAULT_MAX_PARALLEL = 2
PIPELINE_NAME = "pneumonia-kfp"

Outputs = NamedTuple("Outputs", [("results", dsl.Artifact), ("report_md", dsl.Markdown), ("report_html", dsl.HTML)])


def build_pipeline(max_parallel: int = DEFAULT_MAX_PARALLEL, settings: Optional[Settings] = None):
    """The pipeline function; ``max_parallel`` is fixed at compile time (KFP's ParallelFor needs a constant).

    ``settings`` (a cluster compile) adds the image, GPU scheduling, resources, retries and the MinIO
    Secret to the tasks; local runs leave them out (the local runner ignores them, or retries locally).
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel={max_parallel}: must be at least 1")

    @dsl.pipeline(name=PIPELINE_NAME, description="Chest X-ray pneumonia classifiers: train and compare backbones.")
    def pneumonia_pipeline(
        data: str,
        storage: str,
        backbones: List[str] = DEFAULT_BACKBONES,
        epochs: int = 5,
        image_size: int = 224,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        seed: int = 0,
        pretrained: bool = False,
        pretrained_weights: str = "",
        on_invalid: str = "fail",
        compile_model: bool = False,
    ) -> Outputs:
        ingest = ingest_op(data=data, storage=storage, image_size=image_size, seed=seed, on_invalid=on_invalid)
        ingest.set_display_name("ingest")
        with dsl.ParallelFor(backbones, parallelism=max_parallel) as backbone:
            train = train_op(
                dataset=ingest.outputs["dataset"], backbone=backbone, epochs=epochs, batch_size=batch_size,
                learning_rate=learning_rate, seed=seed, pretrained=pretrained, pretrained_weights=pretrained_weights,
                compile_model=compile_model,
            ).set_display_name("train")
            evaluate = evaluate_op(dataset=ingest.outputs["dataset"], model=train.outputs["model"])
            evaluate.set_display_name("evaluate")
        report = report_op(dataset=ingest.outputs["dataset"], results=dsl.Collected(evaluate.outputs["results"]))
        report.set_display_name("report")
        if settings is not None:
            configure(settings, ingest=ingest, train=train, evaluate=evaluate, report=report)
        return Outputs(results=report.outputs["summary"], report_md=report.outputs["markdown"],
                       report_html=report.outputs["html"])

    return pneumonia_pipeline
