"""The real pipeline through kfp's local runner, storage on the s3:// path (moto S3 server)."""
import json

import yaml

from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.storage import open_store

RESULT_KEYS = {"backbone", "image_size", "epochs", "pretrained", "threshold", "test", "val", "train"}
SPLIT_KEYS = {"n", "accuracy", "precision", "sensitivity", "specificity", "f1", "auc", "confusion_matrix", "labels",
              "ci95"}


def test_run_local_end_to_end_on_s3(image_folder, s3_env, tmp_path, capfd):
    out = tmp_path / "out"
    rc = main(["run-local", "--data", str(image_folder), "--output", str(out), "--backbones",
               "resnet18,efficientnet_b0", "--epochs", "1", "--image-size", "32", "--batch-size", "16",
               "--storage", "s3://pipeline-bucket/e2e"])
    assert rc == 0
    captured = capfd.readouterr()  # fd-level: the task subprocesses' logs too
    printed = captured.out
    assert str(out / "results.json") in printed and str(out / "report.html") in printed
    # the console has stage, progress and result lines; the executors' JSON dumps are in the log file
    log = (out / "run-local.log").read_text()
    assert "executor_input" in log and "executor_input" not in printed and '"inputs"' not in printed
    assert printed.count("Executing task") == 2 * 2 + 3  # start, ingest, report, and train + evaluate per backbone
    assert len(printed.splitlines()) < len(log.splitlines()) / 4
    store = open_store("s3://pipeline-bucket/e2e")
    # the credentials reach the tasks only through the environment: in no log line, no artifact
    for secret in ("test-access-key", "test-secret-key"):
        assert secret not in captured.out + captured.err
        leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        leaked += [k for k in store.list() if k.endswith(".json") and secret.encode() in store.get_bytes(k)]
        assert leaked == []

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["uri"].startswith("s3://pipeline-bucket/e2e/datasets/")
    assert results["dataset"]["counts"]["test"] == {"NORMAL": 12, "PNEUMONIA": 12}
    assert [m["backbone"] for m in results["models"]] == ["efficientnet_b0", "resnet18", "ensemble"]
    for m in results["models"]:
        assert RESULT_KEYS <= set(m)
        assert SPLIT_KEYS <= set(m["test"]) and SPLIT_KEYS <= set(m["val"])
        assert m["image_size"] == 32 and m["epochs"] == 1 and m["pretrained"] is False
        assert sum(map(sum, m["test"]["confusion_matrix"])) == m["test"]["n"] == 24
        assert m["test"]["labels"] == ["NORMAL", "PNEUMONIA"]
        assert {"seconds", "images_per_second", "best_epoch"} <= set(m["train"])
        assert [op["rule"] for op in m["operating_points"]] == ["balanced", "youden", "sensitivity95"]
    # each backbone's model directory, copied out of the runner's artifacts; per-image predictions
    for name in ("efficientnet_b0", "resnet18"):
        assert {p.name for p in (out / "models" / name).iterdir()} == {"checkpoint.pt", "model.pt2", "model.onnx",
                                                                       "metadata.json", "triton"}
        assert (out / "models" / name / "triton" / f"pneumonia-{name}" / "config.pbtxt").is_file()
    # the ensemble's own ClassificationMetrics for the UI, from the report step
    report_out = json.loads(next((out / "kfp-root").rglob("report-op/executor_output.json")).read_text())
    (ensemble,) = report_out["artifacts"]["ensemble_classification"]["artifacts"]
    cm = ensemble["metadata"]["confusionMatrix"]
    assert cm["annotationSpecs"] == [{"displayName": "NORMAL"}, {"displayName": "PNEUMONIA"}]
    assert [list(map(int, r["row"])) for r in cm["rows"]] == results["models"][-1]["test"]["confusion_matrix"]
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == "split,file,patient,label,prob_efficientnet_b0,prob_resnet18,prob_ensemble"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in ("resnet18", "efficientnet_b0"):
        assert name in md and name in page
    # kfp's local pipeline root stays under OUT, with one train task per backbone
    assert len([p for p in (out / "kfp-root").rglob("train-op") if p.is_dir()]) == 2


def test_compile_has_parallel_for_in_a_sub_pipeline_and_report_after_it(tmp_path):
    target = tmp_path / "pipeline.yaml"
    assert main(["compile", "-o", str(target), "--max-parallel", "3"]) == 0
    spec = next(yaml.safe_load_all(target.read_text()))  # the IR; the Kubernetes platform spec follows
    dag = spec["root"]["dag"]["tasks"]
    inner = spec["components"][dag["train-and-evaluate"]["componentRef"]["name"]]["dag"]["tasks"]
    loop = next(t for name, t in inner.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--backbones"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert set(dag) == {"start-op", "ingest-op", "train-and-evaluate", "report-op", "condition-1"}  # 1: deploy
    # fan-in through the run folder: report waits for the sub-pipeline and takes no collected artifacts
    assert "train-and-evaluate" in dag["report-op"]["dependentTasks"]
    assert set(dag["report-op"]["inputs"]["artifacts"]) == {"dataset"}
    assert dag["report-op"]["inputs"]["parameters"]["run_dir"]["taskOutputParameter"]["producerTask"] == "start-op"
