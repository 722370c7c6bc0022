"""deploy step (optional): the best model by validation served by KServe, registered when a registry is set."""
from typing import NamedTuple

from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def deploy_op(
    summary: dsl.Input[dsl.Artifact], storage: str, serve_name: str, image: str, timeout_seconds: int,
) -> NamedTuple("Outputs", [("url", str), ("model_uri", str), ("model_id", str), ("registry_version", str)]):
    """Serve the run's best trained model (chosen on validation, never on test) as a KServe InferenceService.

    Args:
        summary: results.json of report: the models, their validation scores and where each model is.
        storage: the run's store; the model is copied to <storage>/models/<backbone>-<sha>/ for KServe.
        serve_name: the InferenceService (and its ServiceAccount; <serve_name>-s3 its Secret) in this namespace.
        image: the image whose `pneumonia-kfp serve` the service runs (the pipeline's own).
        timeout_seconds: how long to wait for the service to become Ready.

    Returns:
        url: the InferenceService's URL (status.url) once Ready.
        model_uri: the model's folder in the store (the service's STORAGE_URI).
        model_id: backbone@sha256:..., as predict and serve report it.
        registry_version: the Model Registry's version id; empty without a registry
            (PNEUMONIA_KFP_MODEL_REGISTRY unset).
    """
    import json
    import logging
    import os
    from collections import namedtuple

    from pneumonia_kfp.deploy import (
        REGISTRY_ENV,
        Target,
        deploy,
        model_source,
        store_keys,
    )
    from pneumonia_kfp.documents import read_results
    from pneumonia_kfp.kube import api_client, current_namespace
    from pneumonia_kfp.storage import ENDPOINT_ENV
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("deploy-op"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        with open(summary.path) as f:
            results = read_results(json.load(f), "results.json")
        model = model_source(results, summary.path)  # the best trained model by validation: its model artifact
        # the store's endpoint and keys as this pod has them (the profile's Secret) are what KServe gets
        target = Target(serve_name, current_namespace(), image, os.environ.get(ENDPOINT_ENV, "localhost:9000"),
                        *store_keys())
        done = deploy(model, storage, target, api_client(), registry=os.environ.get(REGISTRY_ENV, ""),
                      timeout=timeout_seconds)
        return namedtuple("Outputs", ["url", "model_uri", "model_id", "registry_version"])(
            done.url, done.model.uri, done.model.model_id, done.registry_version)
