"""train -> evaluate -> report cores on a small ingested synthetic dataset."""
import json
import re

import numpy as np
import pytest
import torch

from components.backbones import load_checkpoint, predict
from components.data import StoredDataset
from components.evaluate import evaluate
from components.ingest import ingest
from components.report import BEST_RULE, best_model, report
from components.train import train, train_val_split


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
    assert "carved from train" in how and len(vy) + len(ty) == 80
    assert set(vy.tolist()) == {0, 1}
    # grouped: no training image is pixel-identical to a validation image of the same patient set
    entries = ds.entries("train")
    from components.data import grouped_holdout, groups_of
    held = grouped_holdout([ds.classes.index(e["class"]) for e in entries], groups_of(entries), 0.1, 0)
    groups = np.array(groups_of(entries))
    assert set(groups[held]).isdisjoint(groups[~held])


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


def test_training_is_reproducible_with_a_seed(dataset, trained, tmp_path):
    again = train(dataset["uri"], "resnet18", str(tmp_path / "r.pt"), epochs=3, batch_size=16, seed=0)
    first = trained["resnet18"][1]
    assert [h["train_loss"] for h in again["history"]] == pytest.approx([h["train_loss"] for h in first["history"]])


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
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3  # ROC + one per model
    assert not re.search(r'(src|href)="https?://', page)  # self-contained
    json.dumps(results)  # serialisable as results.json
