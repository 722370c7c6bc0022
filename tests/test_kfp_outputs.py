"""What users and operators see of a real kfp local run of the pipeline (one backbone, 1 epoch, 32 px):
the executor output the KFP v2 UI renders, the Model artifact (checkpoint, torch.export and ONNX forms),
Prometheus metrics in a real pushgateway and progress lines in the task logs."""
import contextlib
import io
import json
import math
import time

import numpy as np
import pytest
import torch
from kfp import local

from pneumonia_kfp.backbones import load_checkpoint
from pneumonia_kfp.components.evaluate import evaluate_op
from pneumonia_kfp.components.report import report_op
from pneumonia_kfp.components.train import train_op
from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.export import CHECKPOINT, load_onnx, load_pt2
from pneumonia_kfp.inference import predict
from pneumonia_kfp.pipelines.pipeline import build_pipeline
from pneumonia_kfp.telemetry import ENV_PROGRESS, ENV_PROGRESS_SECONDS, ENV_PUSHGATEWAY
from tests.pushgateway import scrape

BACKBONE = "resnet18"


@pytest.fixture(scope="module")
def run(image_folder, pushgateway, tmp_path_factory):  # noqa: F811
    """The project's pipeline, one backbone, run once: {task: executor_output.json}, task logs."""
    root = tmp_path_factory.mktemp("kfp-root")
    storage = tmp_path_factory.mktemp("store").as_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_PUSHGATEWAY, pushgateway)  # the task subprocesses inherit the environment
    mp.setenv(ENV_PROGRESS, "log")  # what a pod without a terminal does
    mp.setenv(ENV_PROGRESS_SECONDS, "0")
    log = io.StringIO()  # kfp prints every task's output to our stdout
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
        with contextlib.redirect_stdout(log):
            build_pipeline(1)(data=str(image_folder), storage=storage, backbones=[BACKBONE], epochs=1,
                              image_size=32, batch_size=16)
    finally:
        mp.undo()
    outputs = {p.parent.name: json.loads(p.read_text()) for p in root.rglob("executor_output.json")}
    assert {"ingest-op", "train-op", "evaluate-op", "report-op"} <= set(outputs), sorted(outputs)
    return {"outputs": outputs, "log": log.getvalue()}


def _artifact(output: dict, name: str) -> dict:
    (artifact,) = output["artifacts"][name]["artifacts"]
    return artifact


def test_output_types_are_the_ones_the_ui_renders():
    outputs = evaluate_op.component_spec.outputs
    assert outputs["metrics"].type.startswith("system.Metrics@")
    assert outputs["classification"].type.startswith("system.ClassificationMetrics@")
    assert train_op.component_spec.outputs["model"].type.startswith("system.Model@")
    report = report_op.component_spec.outputs
    assert report["ensemble_classification"].type.startswith("system.ClassificationMetrics@")
    assert report["ensemble_metrics"].type.startswith("system.Metrics@")


def test_confusion_matrix_and_roc_in_the_ui_layout(run):
    meta = _artifact(run["outputs"]["evaluate-op"], "classification")["metadata"]
    # exactly what the KFP v2 UI validates (MetricsVisualizations.tsx): nothing more, nothing less
    assert set(meta) == {"confusionMatrix", "confidenceMetrics"}
    cm = meta["confusionMatrix"]
    assert set(cm) == {"annotationSpecs", "rows"}
    assert cm["annotationSpecs"] == [{"displayName": "NORMAL"}, {"displayName": "PNEUMONIA"}]
    assert len(cm["rows"]) == 2 and all(set(r) == {"row"} and len(r["row"]) == 2 for r in cm["rows"])
    cells = [v for r in cm["rows"] for v in r["row"]]
    assert all(isinstance(v, (int, float)) for v in cells) and sum(cells) == 24  # the test split
    assert [sum(r["row"]) for r in cm["rows"]] == [12, 12]  # rows are the true class

    roc = meta["confidenceMetrics"]
    assert isinstance(roc, list) and 2 <= len(roc) <= 200
    for point in roc:
        assert set(point) == {"confidenceThreshold", "falsePositiveRate", "recall"}
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in point.values())
        assert 0 <= point["falsePositiveRate"] <= 1 and 0 <= point["recall"] <= 1
    fpr, tpr = [p["falsePositiveRate"] for p in roc], [p["recall"] for p in roc]
    assert fpr == sorted(fpr) and tpr == sorted(tpr)  # a curve from (0, 0) ...
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)  # ... to (1, 1)


def test_scalar_metrics_in_the_ui_layout(run):
    meta = _artifact(run["outputs"]["evaluate-op"], "metrics")["metadata"]
    results = json.loads(open(_artifact(run["outputs"]["evaluate-op"], "results")["uri"]).read())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in meta.values())
    for name in ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc"):
        assert meta[f"test_{name}"] == pytest.approx(results["test"][name], abs=1e-6)
    for name in ("accuracy", "f1", "auc", "sensitivity", "specificity"):
        lo, hi = results["test"]["ci95"][name]
        assert meta[f"test_{name}_ci95_low"] == pytest.approx(lo, abs=1e-6)
        assert meta[f"test_{name}_ci95_high"] == pytest.approx(hi, abs=1e-6)
        assert meta[f"test_{name}_ci95_low"] <= meta[f"test_{name}_ci95_high"]
    assert meta["threshold"] == pytest.approx(results["threshold"], abs=1e-6)
    assert meta["best_epoch"] == 1 and meta["test_n"] == 24 and meta["parameters"] > 1_000_000


def test_model_artifact_is_a_directory_whose_exported_forms_predict_like_the_checkpoint(run):
    model = _artifact(run["outputs"]["train-op"], "model")
    assert model["metadata"]["formats"] == {"torch.export": "model.pt2", "onnx": "model.onnx"}
    assert model["metadata"]["threshold_rule"] == "balanced"
    module, info = load_pt2(f"{model['uri']}/model.pt2")
    session, _ = load_onnx(f"{model['uri']}/model.onnx")
    assert info["threshold"] == pytest.approx(model["metadata"]["threshold"])
    net, ckpt = load_checkpoint(f"{model['uri']}/{CHECKPOINT}")
    dataset = _artifact(run["outputs"]["ingest-op"], "dataset")["metadata"]["uri"]
    x, _, _ = StoredDataset(dataset).split("test")
    expected = predict(net, x, ckpt["mean"], ckpt["std"])
    with torch.inference_mode():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"images": x})[0], expected, atol=1e-4)
    results = json.loads(open(_artifact(run["outputs"]["evaluate-op"], "results")["uri"]).read())
    assert results["model_uri"] == model["uri"]


def test_one_backbone_has_no_ensemble_and_a_predictions_csv(run):
    report = run["outputs"]["report-op"]
    assert _artifact(report, "ensemble_classification").get("metadata", {}) == {}
    rows = open(_artifact(report, "predictions")["uri"]).read().splitlines()
    assert rows[0] == f"split,file,patient,label,prob_{BACKBONE}"
    assert sum(r.startswith("test,") for r in rows) == 24


def test_ingest_and_train_tasks_push_their_metrics(run, pushgateway):  # noqa: F811
    got = scrape(pushgateway)
    train = frozenset({"job": "pneumonia_kfp_train", "backbone": BACKBONE, "instance": ""}.items())
    ingest = frozenset({"job": "pneumonia_kfp_ingest", "instance": ""}.items())
    now = time.time()
    assert got["pneumonia_kfp_train_epoch", train] == 1
    assert got["pneumonia_kfp_train_samples_processed_total", train] > 0
    assert got["pneumonia_kfp_train_images_per_second", train] > 0
    assert math.isfinite(got["pneumonia_kfp_train_loss", train])
    assert 0 <= got["pneumonia_kfp_train_validation_auc", train] <= 1
    assert now - 600 < got["pneumonia_kfp_train_last_success_timestamp_seconds", train] <= now
    assert got["pneumonia_kfp_ingest_images_processed_total", ingest] == 104  # 80 train + 24 test
    assert got["pneumonia_kfp_ingest_duration_seconds", ingest] > 0
    assert now - 600 < got["pneumonia_kfp_ingest_last_success_timestamp_seconds", ingest] <= now


def test_tasks_without_a_terminal_log_progress_lines(run):
    log = run["log"]
    assert f"{BACKBONE} epoch 1/1: 1/" in log and "batch (100%)" in log
    assert "ingest: read: 104/104 file (100%)" in log and "ingest: read: 1/104 file" in log  # one pass per file
