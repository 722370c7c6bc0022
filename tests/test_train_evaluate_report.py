"""train -> evaluate -> report cores on a small ingested synthetic dataset; the HTML report in a real
headless Chromium; the TorchScript export against its checkpoint."""
import copy
import json
import math
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from pneumonia_kfp.backbones import load_checkpoint, predict
from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.evaluation import evaluate, ui_scalars
from pneumonia_kfp.export import export_torchscript, load_exported
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.report import BEST_RULE, HEADER, MAX_HTML_BYTES, best_model, html_report, report
from pneumonia_kfp.training import train, train_val_split


@pytest.fixture(scope="module")
def dataset(image_folder, tmp_path_factory):
    return ingest(str(image_folder), tmp_path_factory.mktemp("store").as_uri(), image_size=32)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    runs = {}
    for name in ("resnet18", "efficientnet_b0"):
        meta = train(dataset["uri"], name, str(out / f"{name}.pt"), epochs=3, batch_size=16, seed=0)
        runs[name] = (out / f"{name}.pt", meta)
    return runs


def test_small_val_is_a_patient_grouped_carve_out(dataset):
    ds = StoredDataset(dataset["uri"])
    (tx, ty), (vx, vy), how = train_val_split(ds, seed=0)
    assert "carved from train" in how and len(vy) + len(ty) == 80 and 0 < len(vy) < 20
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


def test_killed_training_resumes_and_ends_like_an_uninterrupted_run(image_folder, trained, tmp_path):
    """Preemption: kill the training process after epoch 2 of 3, restart it, compare."""
    uri = ingest(str(image_folder), (tmp_path / "store").as_uri(), image_size=32)["uri"]
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
            "from pneumonia_kfp.training import train;"
            f"train({uri!r}, 'resnet18', {str(tmp_path / 'r.pt')!r}, epochs=3, batch_size=16, seed=0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "resnet18 epoch 2/3" in line:  # logged once epoch 2's state is in the store
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "r.pt").exists()

    rerun = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
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
    r = evaluate(dataset["uri"], str(path))
    assert r["threshold"] == meta["threshold"] and r["val"] == meta["val"]
    assert r["test"]["n"] == 24 == sum(map(sum, r["test"]["confusion_matrix"]))
    model, ckpt = load_checkpoint(path)
    x, y, _ = StoredDataset(dataset["uri"]).split("test")
    pred = predict(model, x, ckpt["mean"], ckpt["std"]) >= meta["threshold"]
    (tn, fp), (fn, tp) = r["test"]["confusion_matrix"]
    assert tp == int((pred & (y == 1)).sum()) and tn == int((~pred & (y == 0)).sum())
    assert set(r["test"]["ci95"]) == {"accuracy", "f1", "auc", "sensitivity", "specificity"}


def test_report_compares_every_model(dataset, trained):
    models = [evaluate(dataset["uri"], str(p)) for p, _ in trained.values()]
    results, md, page = report(dataset, models)
    assert [m["backbone"] for m in results["models"]] == ["efficientnet_b0", "resnet18"]
    best = best_model(models)["backbone"]
    assert results["best"] == {"backbone": best, "rule": BEST_RULE}
    for name in ("resnet18", "efficientnet_b0"):
        assert name in md and name in page
    assert f"Best model: {best}" in md and "selected on test in the original" in md
    assert "SYNTHETIC DATA" in md and "SYNTHETIC DATA" in page  # the dataset came from make_synthetic
    assert "Its val split has 0 images (< 100): each model validated on a patient-grouped carve-out" in md
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3  # ROC + one per model
    assert not re.search(r'(src|href)="https?://', page)  # self-contained
    json.dumps(results)  # serialisable as results.json


@pytest.fixture(scope="module")
def evaluated(dataset, trained):
    return [evaluate(dataset["uri"], str(p)) for p, _ in trained.values()]


def test_report_table_has_every_figure_with_confidence_intervals(dataset, evaluated):
    results, md, page = report(dataset, evaluated)
    header = next(line for line in md.splitlines() if line.startswith("| backbone"))
    for column in ("parameters", "accuracy % (95% CI)", "F1 (95% CI)", "sensitivity % (95% CI)",
                   "specificity % (95% CI)", "AUC (95% CI)", "train time", "img/s"):
        assert column in header and column in page
    for m in results["models"]:
        t = m["test"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {m['backbone']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(HEADER)
        for column, value, ci in (("sensitivity % (95% CI)", t["recall"], t["ci95"]["sensitivity"]),
                                  ("specificity % (95% CI)", t["specificity"], t["ci95"]["specificity"])):
            assert cells[HEADER.index(column)] == f"{100 * value:.2f} ({100 * ci[0]:.2f}–{100 * ci[1]:.2f})"
        assert cells[HEADER.index("parameters")] == f"{m['parameters'] / 1e6:.1f} M"
        assert m["parameters"] > 1_000_000
    seed = next(line for line in md.splitlines() if "(seed, AIMI Lab1)" in line)
    assert "selected on test in the original" in seed and "94.39" in seed
    assert "1,000 resamples" in md and "Youden" in md


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
    results, _, page = report(dataset, models)
    assert len(page.encode()) <= MAX_HTML_BYTES
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 13
    small = html_report(results, max_bytes=len(page.encode()) - 1)  # forced down to a lower resolution
    assert len(small.encode()) < len(page.encode())


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def render(html_file, tmp_path, size=(1280, 1400)):
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
    _, urls = render(page, tmp_path, size=(400, 300))
    assert urls == ["http://example.invalid/chart.png"]


def test_html_report_renders_in_chromium_without_network(dataset, evaluated, tmp_path):
    _, _, page = report(dataset, evaluated)
    assert not re.search(r"https?://", page)  # no external URL anywhere in the page
    html_file = tmp_path / "report.html"
    html_file.write_text(page)
    png, urls = render(html_file, tmp_path)
    assert urls == []
    px = _pixels(png)
    assert px.shape[:2] == (1400, 1280)
    assert px.std() > 20  # not blank
    dark = (px.max(axis=2) < 100).sum()  # text
    saturation = px.max(axis=2) - px.min(axis=2)
    colour = ((saturation > 80) & (px.max(axis=2) > 80)).sum()  # plot lines and confusion-matrix cells
    assert dark > 2000 and colour > 2000, (dark, colour)


def test_torchscript_export_predicts_like_the_checkpoint(dataset, trained, tmp_path):
    for name, (path, meta) in trained.items():
        target = tmp_path / f"{name}.torchscript.pt"
        info = export_torchscript(str(path), str(target))
        module, stored = load_exported(str(target))
        assert stored == info and stored["threshold"] == meta["threshold"] and stored["backbone"] == name
        assert stored["classes"] == ["NORMAL", "PNEUMONIA"] and stored["image_size"] == 32
        model, ckpt = load_checkpoint(path)
        x, _, _ = StoredDataset(dataset["uri"]).split("test")
        expected = predict(model, x, ckpt["mean"], ckpt["std"])
        with torch.inference_mode():
            got = module(torch.from_numpy(x)).numpy()  # 24 images: not the traced batch size of 2
            one = module(torch.from_numpy(x[:1])).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(one, expected[:1], atol=1e-5)
        assert ((got >= meta["threshold"]) == (expected >= meta["threshold"])).all()
