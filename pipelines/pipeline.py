"""The pipeline: start, ingest -> train-and-evaluate { ParallelFor(backbones) { train -> evaluate } } -> report
[-> deploy, only when serve_name is set].

Its parameters, their defaults and their descriptions come from pneumonia_kfp.params.PARAMS.

One compiled YAML runs on every KFP backend from 2.3.0 (Kubeflow 1.9.1) on, so it uses only what
they all run:

* Fan-in through the store, not ``dsl.Collected`` of artifacts (backends < 2.14 cannot run that):
  ``start`` makes the run's folder, every evaluate writes its results there, and ``report`` runs
  ``.after()`` the sub-pipeline holding the ParallelFor and reads them back (pneumonia_kfp.runs).
  The run folder comes from a task, not from ``{{$.pipeline_job_uuid}}``: drivers before 2.5.0 do
  not resolve that placeholder.
* No ``set_display_name`` on tasks whose outputs are consumed (drivers < 2.14 look producers up by it).
* The Kubernetes platform spec without the fields older drivers reject (:func:`compatible_platform_spec`).
* The optional deploy step sits in a ``dsl.If`` on ``serve_name``: a condition every backend runs. Its
  outputs (the service's URL) stay on the task: a pipeline output from a conditional branch needs
  ``dsl.OneOf``, which backends before 2.8 cannot run.
"""
import inspect
import logging
from typing import List, NamedTuple, Optional

from google.protobuf import json_format
from kfp import compiler, dsl
from kfp.pipeline_spec import pipeline_spec_pb2

from pneumonia_kfp.components.deploy import deploy_op
from pneumonia_kfp.components.evaluate import evaluate_op
from pneumonia_kfp.components.ingest import ingest_op
from pneumonia_kfp.components.kfp_defaults import BASE_IMAGE, image_mismatch
from pneumonia_kfp.components.report import report_op
from pneumonia_kfp.components.start import start_op
from pneumonia_kfp.components.train import train_op
from pneumonia_kfp.components.train_distributed import train_distributed_op
from pneumonia_kfp.jobs import config_from_settings
from pneumonia_kfp.params import (
    BY_NAME,
    PIPELINE_PARAMS,
    check_run_params,
    default,
    pipeline_docstring,
    pipeline_signature,
)
from pneumonia_kfp.pipelines.platform import configure
from pneumonia_kfp.pipelines.settings import Settings

log = logging.getLogger(__name__)
PIPELINE_NAME = "pneumonia-kfp"
# the run parameters train takes besides the dataset and its backbone
TRAIN_PARAMS = ("epochs", "batch_size", "learning_rate", "seed", "pretrained", "pretrained_weights", "compile_model",
                "threshold_rule", "tta")
DEPLOY_TIMEOUT_SECONDS = 900  # how long deploy waits for the InferenceService to become Ready

Outputs = NamedTuple("Outputs", [("results", dsl.Artifact), ("report_md", dsl.Markdown), ("report_html", dsl.HTML),
                                 ("predictions", dsl.Artifact)])


def _models_pipeline(max_parallel: int, settings: Optional[Settings]):
    """The sub-pipeline: one train -> evaluate per backbone, at most ``max_parallel`` at a time."""
    names = ("dataset", "run_dir", "backbones", "external_data") + TRAIN_PARAMS
    distributed = settings is not None and settings.nodes > 1

    def train_and_evaluate(*values):
        p = dict(zip(names, values, strict=True))
        with dsl.ParallelFor(p["backbones"], parallelism=max_parallel) as backbone:
            if distributed:  # the task launches a TrainJob/PyTorchJob of settings.nodes nodes and waits for it
                train = train_distributed_op(dataset=p["dataset"], backbone=backbone, **{n: p[n] for n in TRAIN_PARAMS},
                                             job=config_from_settings(settings).to_json())
            else:
                train = train_op(dataset=p["dataset"], backbone=backbone, **{n: p[n] for n in TRAIN_PARAMS})
            evaluate = evaluate_op(dataset=p["dataset"], model=train.outputs["model"], run_dir=p["run_dir"],
                                   external_data=p["external_data"])
        if settings is not None and distributed:  # no GPU on the launcher; a retry reruns (resumes) the whole job
            configure(settings, launcher=train, evaluate=evaluate)
            t = settings.train
            if t.retries:
                train.set_retry(t.retries, backoff_duration=t.retry_backoff, backoff_factor=t.retry_backoff_factor,
                                backoff_max_duration=t.retry_backoff_max)
        elif settings is not None:
            configure(settings, train=train, evaluate=evaluate)

    def param(name, annotation):
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)

    train_and_evaluate.__signature__ = inspect.Signature(
        [param("dataset", dsl.Input[dsl.Dataset]), param("run_dir", str), param("backbones", List[str]),
         param("external_data", str)]
        + [param(n, BY_NAME[n].type) for n in TRAIN_PARAMS])
    train_and_evaluate.__doc__ = "Train and evaluate every backbone (a ParallelFor), results into run_dir."
    return dsl.pipeline(name="train-and-evaluate")(train_and_evaluate)


def build_pipeline(max_parallel: int = default("max_parallel"), settings: Optional[Settings] = None):
    """The pipeline function; ``max_parallel`` is fixed at compile time (KFP's ParallelFor needs a constant).

    ``settings`` (a cluster compile) adds the image, GPU scheduling, resources, retries and the store's
    Secret to the tasks; local runs leave them out (the local runner ignores them, or retries locally).
    """
    check_run_params({"max_parallel": max_parallel})
    models_pipeline = _models_pipeline(max_parallel, settings)

    def pneumonia_pipeline(*values) -> Outputs:
        p = dict(zip((q.name for q in PIPELINE_PARAMS), values, strict=True))  # kfp passes one channel per parameter
        start = start_op(storage=p["storage"])
        start.set_caching_options(enable_caching=False)  # a cached start would hand out an earlier run's folder
        ingest = ingest_op(data=p["data"], storage=p["storage"], image_size=p["image_size"], seed=p["seed"],
                           on_invalid=p["on_invalid"])
        models = models_pipeline(dataset=ingest.outputs["dataset"], run_dir=start.outputs["run_dir"],
                                 backbones=p["backbones"], external_data=p["external_data"],
                                 **{n: p[n] for n in TRAIN_PARAMS})
        report = report_op(dataset=ingest.outputs["dataset"], run_dir=start.outputs["run_dir"],
                           backbones=p["backbones"]).after(models)
        with dsl.If(p["serve_name"] != ""):
            deploy = deploy_op(summary=report.outputs["summary"], storage=p["storage"], serve_name=p["serve_name"],
                               image=settings.image if settings else BASE_IMAGE,
                               timeout_seconds=DEPLOY_TIMEOUT_SECONDS)
        if settings is not None:
            configure(settings, start=start, ingest=ingest, report=report)
            # deploy is as light as start (a few API calls, one model copy): start's resources, the store's Secret
            configure(settings, start=deploy)
        return Outputs(results=report.outputs["summary"], report_md=report.outputs["markdown"],
                       report_html=report.outputs["html"], predictions=report.outputs["predictions"])

    pneumonia_pipeline.__signature__ = pipeline_signature(Outputs)
    pneumonia_pipeline.__doc__ = pipeline_docstring("Chest X-ray pneumonia classifiers: train and compare backbones.")
    pipeline = dsl.pipeline(name=PIPELINE_NAME)(pneumonia_pipeline)
    pipeline.component_spec.platform_spec = compatible_platform_spec(pipeline.platform_spec)
    return pipeline


def compatible_platform_spec(spec: pipeline_spec_pb2.PlatformSpec) -> pipeline_spec_pb2.PlatformSpec:
    """The platform spec without the fields that KFP drivers 2.3.0-2.4.0 (and 2.14's compiler) reject
    but that say nothing new: ``optional: false`` (the Kubernetes default) and a ``*NameParameter``
    holding the same constant as its ``*Name`` twin (``secretNameParameter`` next to ``secretName``).
    Newer backends read the ``*Name`` field when the parameter is absent."""
    data = json_format.MessageToDict(spec)

    def strip(node):
        if isinstance(node, list):
            for item in node:
                strip(item)
        elif isinstance(node, dict):
            if node.get("optional") is False:
                del node["optional"]
            for key in [k for k in node if k.endswith("NameParameter")]:
                constant = node[key].get("runtimeValue", {}).get("constant")
                if constant is not None and constant == node.get(key[:-len("Parameter")]):
                    del node[key]
            for value in node.values():
                strip(value)

    for platform in data.get("platforms", {}).values():
        strip(platform.get("deploymentSpec", {}).get("executors", {}))
    return json_format.ParseDict(data, pipeline_spec_pb2.PlatformSpec())


def compile_pipeline(max_parallel: int, settings: Settings, output: str) -> None:
    """The cluster pipeline, with its platform settings, as KFP IR YAML at ``output``; a warning when
    the image may not hold this checkout's library (its component code is compiled into the YAML)."""
    mismatch = image_mismatch(settings.image)
    if mismatch:
        log.warning(mismatch)
    compiler.Compiler().compile(build_pipeline(max_parallel, settings), output)
