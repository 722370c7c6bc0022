"""train -> evaluate -> report cores on a small ingested synthetic dataset: operating points, the
ensemble, per-image predictions, external evaluation; the HTML report in a real headless Chromium;
the torch.export and ONNX forms against their checkpoint."""
import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from pneumonia_kfp.augmentation import DEFAULT_POLICY
from pneumonia_kfp.backbones import load_checkpoint
from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.evaluation import BEST_RULE, best_model, combine, evaluate
from pneumonia_kfp.export import CHECKPOINT, export_model, load_onnx, load_pt2
from pneumonia_kfp.inference import predict
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.report import HEADER, MAX_HTML_BYTES, html_report, render, ui_scalars
from pneumonia_kfp.training import TrainingState, train, train_val_split


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    runs = {}
    for name in ("resnet18", "efficientnet_b0"):
        (out / name).mkdir()
        meta = train(dataset["uri"], name, str(out / name / CHECKPOINT), epochs=3, batch_size=16, seed=0)
        runs[name] = (out / name / CHECKPOINT, meta)
    return runs


def test_small_val_is_a_patient_grouped_carve_out(dataset):
    ds = StoredDataset(dataset["uri"])
    (tx, ty), (vx, vy, ve), how = train_val_split(ds, seed=0)
    assert "carved from train" in how and len(vy) + len(ty) == 80 and 0 < len(vy) < 20
    assert len(ve) == len(vy) and [ds.classes.index(e["class"]) for e in ve] == vy.tolist()
    assert set(vy.tolist()) == {0, 1}
    # find each returned image's patient (the synthetic images are all distinct)
    x_all, _, entries = ds.split("train")
    patient = {x_all[e["index"]].tobytes(): e["patient"] for e in entries}
    train_patients = {patient[x.tobytes()] for x in tx}
    val_patients = {patient[x.tobytes()] for x in vx}
    assert val_patients and train_patients.isdisjoint(val_patients)


def test_train_picks_best_epoch_and_threshold_on_validation(trained):
    path, meta = trained["resnet18"]
    aucs = [h["val_auc"] for h in meta["history"]]
    assert len(aucs) == 3 and meta["best_epoch"] == int(np.argmax(aucs)) + 1
    assert 0 <= meta["threshold"] <= 1
    assert meta["val"]["n"] == sum(map(sum, meta["val"]["confusion_matrix"]))
    model, ckpt = load_checkpoint(path)
    assert ckpt["best_epoch"] == meta["best_epoch"] and ckpt["backbone"] == "resnet18"
    assert model.get_classifier().out_features == 2
    assert all(h["images_per_second"] > 0 for h in meta["history"])
    # every rule's threshold from validation; the default is the named rule's
    assert set(meta["thresholds"]) == {"balanced", "youden", "sensitivity95"} and meta["thresholds"]["balanced"] == 0.5
    assert meta["threshold_rule"] == "balanced" and meta["threshold"] == 0.5
    # every hyperparameter of the recipe is recorded, the augmentation's strengths spelled out
    assert meta["recipe"] == {"augmentation": "default", "label_smoothing": 0.1, "weight_decay": 1e-4, "ema": True,
                              "ema_decay": 0.9998, "augmentation_strengths": asdict(DEFAULT_POLICY)}
    assert meta["recipe"]["augmentation_strengths"]["rotation"] == (-10.0, 10.0)
    vp = meta["val_predictions"]
    assert len(vp["prob"]) == len(vp["file"]) == meta["val"]["n"] and all(f.startswith("train/") for f in vp["file"])
    assert meta["val"]["bootstrap"]["unit"] == "patient"  # synthetic files carry patient ids, two images each


def test_throughput_counts_the_images_actually_seen(dataset, tmp_path):
    """A batch larger than the training set holds only the training set: 1 step of n images an epoch."""
    meta = train(dataset["uri"], "resnet18", str(tmp_path / "m.pt"), epochs=1, batch_size=512, seed=0)
    n_train = 80 - meta["val"]["n"]
    (row,) = meta["history"]
    assert row["images"] == n_train
    assert row["images_per_second"] == pytest.approx(n_train / row["seconds"])
    assert meta["images_per_second"] == pytest.approx(n_train / meta["seconds"])


def test_training_state_lists_its_checkpoint_keys_once(dataset, tmp_path):
    import torch

    from pneumonia_kfp.training import Recipe, build_state

    state = build_state("resnet18", torch.device("cpu"), 5, 2, 1e-3, 0, Recipe(), False, "")
    saved = state.state_dict()
    assert set(saved) == set(TrainingState.CHECKPOINT_KEYS)
    other = build_state("resnet18", torch.device("cpu"), 5, 2, 1e-3, 1, Recipe(), False, "")
    other.load_state_dict(saved)
    for a, b in zip(state.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="lacks best"):
        other.load_state_dict({k: v for k, v in saved.items() if k != "best"})


def test_killed_training_resumes_and_ends_like_an_uninterrupted_run(image_folder, trained, tmp_path):
    """Preemption: kill the training process after epoch 2 of 3, restart it, compare."""
    uri = ingest(str(image_folder), (tmp_path / "store").as_uri(), image_size=32)["uri"]
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
            "from pneumonia_kfp.training import train;"
            f"train({uri!r}, 'resnet18', {str(tmp_path / 'r.pt')!r}, epochs=3, batch_size=16, seed=0)")
    # the same CPU thread count as the run compared with (an in-process run-local earlier in the session
    # may have set OMP_NUM_THREADS=1): a different count changes float reduction order, hence the last digits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    for line in proc.stdout:
        # the end-of-epoch log line, written once epoch 2's state is in the store (the progress bar's
        # "resnet18 epoch 2/3" is printed when epoch 2 starts)
        if "resnet18 epoch 2/3" in line and "val_auc" in line:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "r.pt").exists()

    rerun = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "resuming after epoch 2" in rerun.stdout and "epoch 1/3" not in rerun.stdout
    _, resumed = load_checkpoint(tmp_path / "r.pt")
    first = trained["resnet18"][1]
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in first["history"]])
    assert resumed["best_epoch"] == first["best_epoch"]
    assert resumed["threshold"] == pytest.approx(first["threshold"])
    assert resumed["val"]["confusion_matrix"] == first["val"]["confusion_matrix"]


def test_evaluate_uses_the_checkpoint_threshold_on_test(dataset, trained):
    path, meta = trained["resnet18"]
    r = evaluate(dataset["uri"], str(path.parent))  # the model directory
    assert r["threshold"] == meta["threshold"] and r["val"] == meta["val"]
    assert r["test"]["n"] == 24 == sum(map(sum, r["test"]["confusion_matrix"]))
    assert r["test"]["bootstrap"] == {"unit": "patient", "clusters": 12}
    model, ckpt = load_checkpoint(path)
    x, y, _ = StoredDataset(dataset["uri"]).split("test")
    pred = predict(model, x, ckpt["mean"], ckpt["std"]) >= meta["threshold"]
    (tn, fp), (fn, tp) = r["test"]["confusion_matrix"]
    assert tp == int((pred & (y == 1)).sum()) and tn == int((~pred & (y == 0)).sum())
    assert set(r["test"]["ci95"]) == {"accuracy", "f1", "auc", "sensitivity", "specificity"}
    # every rule's validation threshold with its test figures, counted here from the predictions
    ops = {op["rule"]: op for op in r["operating_points"]}
    assert set(ops) == {"balanced", "youden", "sensitivity95"} and ops["balanced"]["default"]
    prob = predict(model, x, ckpt["mean"], ckpt["std"])
    for rule, op in ops.items():
        assert op["threshold"] == meta["thresholds"][rule]
        called = prob >= op["threshold"]
        assert op["test"]["sensitivity"] == pytest.approx(called[y == 1].mean())
        assert op["test"]["specificity"] == pytest.approx((~called[y == 0]).mean())
    assert r["predictions"]["test"]["prob"] == pytest.approx(prob.tolist(), abs=1e-6)


@pytest.fixture(scope="module")
def evaluated(dataset, trained):
    return [evaluate(dataset["uri"], str(p.parent)) for p, _ in trained.values()]


def _test_images(dataset):
    x, _, entries = StoredDataset(dataset["uri"]).split("test")
    return {e["path"]: x[i] for i, e in enumerate(entries)}


def test_report_compares_every_model_and_their_ensemble(dataset, evaluated):
    results, md, page, _ = render(combine(dataset, evaluated), images=_test_images(dataset))
    assert [m["backbone"] for m in results["models"]] == ["efficientnet_b0", "resnet18", "ensemble"]
    best = best_model(results["models"])["backbone"]
    assert results["best"] == {"backbone": best, "rule": BEST_RULE}
    for name in ("resnet18", "efficientnet_b0", "ensemble"):
        assert f"| {name} |" in md and f"<td>{name}</td>" in page
    assert f"Best model: {best}" in md and "selected on test in the original" in md
    assert "SYNTHETIC DATA" in md and "SYNTHETIC DATA" in page  # the dataset came from make_synthetic
    # what training recorded (val_source), not the carve rule re-derived
    assert "Validation: carved from train: " in md and "(dataset val had 0 < 100)" in md
    assert "each model validated on a patient-grouped carve-out" in md
    assert "## Operating points" in md and "sensitivity95" in md and "balanced (default)" in md
    figures = re.findall(r'<img alt="[^"]*(?:ROC|training curves)[^"]*" src="data:image/png;base64,', page)
    assert len(figures) == 4  # ROC + one per model + the ensemble's confusion matrix
    assert not re.search(r'(src|href)="https?://', page)  # self-contained
    assert all("predictions" not in m for m in results["models"])  # per-image rows go to the CSV
    json.dumps(results)  # serialisable as results.json


def test_ensemble_is_the_mean_probability_with_its_own_validation_thresholds(dataset, evaluated):
    from pneumonia_kfp.evaluation import ensemble
    from pneumonia_kfp.metrics import thresholds

    e = ensemble(evaluated)
    assert e["backbone"] == "ensemble" and sorted(e["members"]) == ["efficientnet_b0", "resnet18"]
    for split in ("val", "test"):
        mean = np.mean([m["predictions"][split]["prob"] for m in evaluated], axis=0)
        assert e["predictions"][split]["prob"] == pytest.approx(mean.tolist())
    val = e["predictions"]["val"]
    assert e["thresholds"] == thresholds(val["label"], val["prob"]) and e["threshold"] == 0.5
    pred = np.array(e["predictions"]["test"]["prob"]) >= e["threshold"]
    y = np.array(e["predictions"]["test"]["label"])
    assert e["test"]["confusion_matrix"] == [[int((~pred & (y == 0)).sum()), int((pred & (y == 0)).sum())],
                                             [int((~pred & (y == 1)).sum()), int((pred & (y == 1)).sum())]]
    assert ensemble(evaluated[:1]) is None  # one backbone: nothing to average
    swapped = copy.deepcopy(evaluated)
    swapped[1]["predictions"]["test"]["file"][0] = "test/NORMAL/other.jpeg"
    with pytest.raises(Exception, match="scored other test images"):
        ensemble(swapped)


def test_predictions_csv_has_every_image_and_model(dataset, evaluated):
    import csv
    import io

    _, _, _, text = render(combine(dataset, evaluated))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["split", "file", "patient", "label", "prob_efficientnet_b0", "prob_resnet18",
                             "prob_ensemble"]
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("val", "test")}
    assert len(by_split["test"]) == 24 and len(by_split["val"]) == evaluated[0]["val"]["n"]
    m = {r["backbone"]: r for r in evaluated}
    for i, row in enumerate(by_split["test"]):
        assert row["file"] == m["resnet18"]["predictions"]["test"]["file"][i]
        assert row["label"] in ("NORMAL", "PNEUMONIA") and row["patient"]
        p18 = m["resnet18"]["predictions"]["test"]["prob"][i]
        pb0 = m["efficientnet_b0"]["predictions"]["test"]["prob"][i]
        assert float(row["prob_resnet18"]) == pytest.approx(p18, abs=1e-6)
        assert float(row["prob_ensemble"]) == pytest.approx((p18 + pb0) / 2, abs=1e-6)


def test_report_shows_the_most_confident_test_errors(dataset, evaluated):
    from pneumonia_kfp.report import confident_errors

    model = copy.deepcopy(evaluated[0])
    model["threshold"] = 0.0  # everything called positive: every NORMAL image is a false positive
    errors = confident_errors(model)
    block = model["predictions"]["test"]
    negatives = sorted((p for p, y in zip(block["prob"], block["label"], strict=True) if y == 0), reverse=True)
    assert [e["prob"] for e in errors] == negatives[:4] and all(e["label"] == 0 for e in errors)
    results, _, page, _ = render(combine(dataset, evaluated), images=_test_images(dataset))
    best = next(m for m in results["models"] if m["backbone"] == results["best"]["backbone"])
    (_, fp), (fn, _) = best["test"]["confusion_matrix"]
    thumbs = re.findall(r'<figure><img alt="false (positive|negative)" src="data:image/png;base64,', page)
    assert thumbs == ["positive"] * min(fp, 4) + ["negative"] * min(fn, 4)
    assert "Most confident test errors" in page


def test_report_table_has_every_figure_with_confidence_intervals(dataset, evaluated):
    results, md, page, _ = render(combine(dataset, evaluated))
    header = next(line for line in md.splitlines() if line.startswith("| backbone"))
    for column in ("parameters", "accuracy % (95% CI)", "F1 (95% CI)", "sensitivity % (95% CI)",
                   "specificity % (95% CI)", "AUC (95% CI)", "train time", "img/s"):
        assert column in header and column in page
    for m in results["models"]:
        t = m["test"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {m['backbone']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(HEADER)
        for column, value, ci in (("sensitivity % (95% CI)", t["sensitivity"], t["ci95"]["sensitivity"]),
                                  ("specificity % (95% CI)", t["specificity"], t["ci95"]["specificity"])):
            assert cells[HEADER.index(column)] == f"{100 * value:.2f} ({100 * ci[0]:.2f}–{100 * ci[1]:.2f})"
        assert cells[HEADER.index("parameters")] == f"{m['parameters'] / 1e6:.1f} M"
        assert m["parameters"] > 1_000_000
    seed = next(line for line in md.splitlines() if "(seed, AIMI Lab1)" in line)
    assert "selected on test in the original" in seed and "94.39" in seed
    assert "1,000 resamples" in md and "bootstrap of patients (12 patients" in md and "rule 'balanced'" in md


def test_ui_scalars_are_finite_numbers(evaluated):
    r = copy.deepcopy(evaluated[0])
    scalars = ui_scalars(r)
    assert scalars["test_auc"] == round(r["test"]["auc"], 6)
    assert scalars["test_sensitivity_ci95_low"] == round(r["test"]["ci95"]["sensitivity"][0], 6)
    assert {"test_specificity_ci95_high", "threshold", "best_epoch", "val_auc", "parameters"} <= set(scalars)
    r["test"]["auc"] = float("nan")  # a one-class test split: AUC undefined, so left out (Struct has no NaN)
    assert "test_auc" not in ui_scalars(r)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in ui_scalars(r).values())


def test_report_html_stays_under_2_mb_with_many_models(dataset, evaluated):
    models = []
    for i in range(12):
        m = copy.deepcopy(evaluated[i % 2])
        m["backbone"] = f"{m['backbone']}_{i}"
        m["train"]["history"] = [dict(m["train"]["history"][0], epoch=e, val_auc=0.5 + e / 100) for e in range(1, 41)]
        models.append(m)
    results, _, page, _ = render(combine(dataset, models), images=_test_images(dataset))
    assert len(page.encode()) <= MAX_HTML_BYTES
    assert len(re.findall(r'<img alt="[^"]*(?:ROC|training curves)', page)) == 14  # ROC, 12 models, ensemble
    full = {**results, "models": [*sorted(models, key=lambda m: m["backbone"]), results["models"][-1]]}
    small = html_report(full, max_bytes=len(page.encode()) - 1)  # forced down to a lower resolution
    assert len(small.encode()) < len(page.encode())


def _external_folder(root, with_test_dir: bool):
    """A test-only ImageFolder (root/test/<class>/) or bare class folders (root/<class>/)."""
    from pneumonia_kfp.synthetic import make_synthetic

    made = make_synthetic(root / "made", {"test": 6}, size=48, seed=5)
    target = root / "ext"
    shutil.copytree(made / "test", target / "test" if with_test_dir else target)
    return target


@pytest.mark.parametrize("with_test_dir", [True, False])
def test_evaluate_scores_a_model_on_another_image_folder(trained, tmp_path, with_test_dir):
    from pneumonia_kfp.image_reader import read_labelled_folder
    from pneumonia_kfp.pipelines.evaluate_folder import evaluate_folder

    data = _external_folder(tmp_path, with_test_dir)
    path, meta = trained["resnet18"]
    results = evaluate_folder(str(path.parent), str(data), tmp_path / "out")
    for name in ("results.json", "report.md", "report.html", "predictions.csv"):
        assert (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(results))
    (m,) = results["models"]
    assert m["test"]["n"] == 12 and m["threshold"] == meta["threshold"] and results["dataset"]["external"]
    x, y, _ = read_labelled_folder(str(data), 32, ["NORMAL", "PNEUMONIA"])
    model, ckpt = load_checkpoint(path)
    pred = predict(model, x, ckpt["mean"], ckpt["std"]) >= meta["threshold"]
    assert m["test"]["confusion_matrix"][1][1] == int((pred & (y == 1)).sum())
    assert "External evaluation of" in (tmp_path / "out" / "report.md").read_text()


def test_evaluate_cli_answers_bad_input_in_one_line(trained, tmp_path, capsys):
    from pneumonia_kfp.pipelines.cli import main

    data = _external_folder(tmp_path, True)
    (data / "test" / "COVID").mkdir()
    path, _ = trained["resnet18"]
    for argv, message in ((["--model", str(tmp_path / "nothing"), "--data", str(data)], "nothing does not exist"),
                          (["--model", str(path.parent), "--data", str(data)], "has class folders ['COVID'")):
        assert main(["evaluate", *argv, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    shutil.rmtree(data / "test" / "COVID")
    assert main(["evaluate", "--model", str(path.parent), "--data", str(data), "--output", str(tmp_path / "o")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_external_data_in_the_same_run(dataset, trained, tmp_path):
    data = _external_folder(tmp_path, False)
    path, _ = trained["resnet18"]
    r = evaluate(dataset["uri"], str(path.parent), external_data=str(data))
    assert r["external"]["n"] == 12 and r["test"]["n"] == 24
    assert all("external" in op for op in r["operating_points"])
    assert {"external_accuracy", "external_auc_ci95_low"} <= set(ui_scalars(r))
    _, md, _, csv_text = render(combine(dataset, [r]))
    assert "## External data" in md and csv_text.count("\nexternal,") == 12


def test_resume_key_follows_the_code(tmp_path, monkeypatch):
    """A change to any library module gives a new resume key: an old last.pt is never reused."""
    import pneumonia_kfp
    from pneumonia_kfp import resume

    copy_dir = tmp_path / "pneumonia_kfp"
    shutil.copytree(pneumonia_kfp.__path__[0], copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(resume, "__file__", str(copy_dir / "resume.py"))
    uri = (tmp_path / "store" / "datasets" / "abc").as_uri()
    before = resume.state_store(uri, {"backbone": "resnet18"}).uri
    assert resume.state_store(uri, {"backbone": "resnet18"}).uri == before  # stable
    assert resume.code_identity()["package"] == "0.1.0"
    with open(copy_dir / "augmentation.py", "a") as f:
        f.write("\n# a fix\n")
    assert resume.state_store(uri, {"backbone": "resnet18"}).uri != before


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def screenshot(html_file, tmp_path, size=(1280, 1400)):
    """Screenshot ``html_file`` in headless Chromium; (PNG path, URLs the page requested).

    Chromium's network log records every URL request; requests of the browser itself (updater,
    account checks) carry the initiator "not an origin", the page's own carry its origin ("null"
    for file://). DNS resolves nothing, so no request could leave the machine anyway.
    """
    png, netlog = tmp_path / "shot.png", tmp_path / "netlog.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={size[0]},{size[1]}",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={netlog}", "--virtual-time-budget=5000",
           f"--screenshot={png}", html_file.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [e["params"] for e in log["events"] if e["type"] == start_job and "url" in e.get("params", {})]
    page_urls = [p["url"] for p in starts if p.get("initiator") != "not an origin"]
    return png, page_urls


def _pixels(png):
    from PIL import Image

    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_chromium_network_check_catches_an_external_reference(tmp_path):
    page = tmp_path / "leaky.html"
    page.write_text('<!doctype html><p>x</p><img src="http://example.invalid/chart.png">')
    _, urls = screenshot(page, tmp_path, size=(400, 300))
    assert urls == ["http://example.invalid/chart.png"]


def test_html_report_renders_in_chromium_without_network(dataset, evaluated, tmp_path):
    _, _, page, _ = render(combine(dataset, evaluated), images=_test_images(dataset))
    assert not re.search(r"https?://", page)  # no external URL anywhere in the page
    html_file = tmp_path / "report.html"
    html_file.write_text(page)
    png, urls = screenshot(html_file, tmp_path, size=(1280, 2400))  # down to the ROC plot, below the tables
    assert urls == []
    px = _pixels(png)
    assert px.shape[:2] == (2400, 1280)
    assert px.std() > 20  # not blank
    dark = (px.max(axis=2) < 100).sum()  # text
    saturation = px.max(axis=2) - px.min(axis=2)
    colour = ((saturation > 80) & (px.max(axis=2) > 80)).sum()  # plot lines and confusion-matrix cells
    assert dark > 2000 and colour > 2000, (dark, colour)


def test_exported_forms_predict_like_the_checkpoint(dataset, trained):
    """torch.export (.pt2) and ONNX (onnxruntime, CPU) against the checkpoint, at other batch sizes
    than the export example's."""
    for name, (path, meta) in trained.items():
        info = export_model(path.parent)
        assert json.loads((path.parent / "metadata.json").read_text()) == info
        module, pt2_info = load_pt2(path.parent / "model.pt2")
        session, onnx_info = load_onnx(path.parent / "model.onnx")
        assert pt2_info == onnx_info == info and info["threshold"] == meta["threshold"] and info["backbone"] == name
        assert info["classes"] == ["NORMAL", "PNEUMONIA"] and info["image_size"] == 32
        model, ckpt = load_checkpoint(path)
        x, _, _ = StoredDataset(dataset["uri"]).split("test")
        expected = predict(model, x, ckpt["mean"], ckpt["std"])
        with torch.inference_mode():
            got = module(torch.from_numpy(x)).numpy()  # 24 images: not the export example's batch of 2
            one = module(torch.from_numpy(x[:1])).numpy()
        from_onnx = session.run(None, {"images": x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(one, expected[:1], atol=1e-5)
        np.testing.assert_allclose(from_onnx, expected, atol=1e-4)
        assert ((got >= meta["threshold"]) == (expected >= meta["threshold"])).all()
        assert ((from_onnx >= meta["threshold"]) == (expected >= meta["threshold"])).all()
