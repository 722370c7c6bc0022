"""train's decisions, checked against what the test works out from the checkpoint itself:
the validation split used, the threshold (Youden's J on the validation probabilities), the best
epoch and its tie-break, and the resume identity (every training setting changes it, and so do the
device's autocast dtype and the deterministic switch)."""
import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from pneumonia_kfp import device as devices
from pneumonia_kfp.backbones import load_checkpoint
from pneumonia_kfp.data import StoredDataset
from pneumonia_kfp.device import DETERMINISTIC_ENV
from pneumonia_kfp.inference import predict
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.metrics import bootstrap_ci
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.synthetic import make_synthetic
from pneumonia_kfp.training import MIN_VAL_IMAGES, Recipe, improves, train

TINY = "test_resnet"  # timm's own tiny test network: fast, and a real timm model


@pytest.fixture(scope="module")
def own_val(tmp_path_factory):
    """A dataset with its own val/ of exactly MIN_VAL_IMAGES images (50 per class)."""
    root = make_synthetic(tmp_path_factory.mktemp("own-val"), {"train": 16, "val": MIN_VAL_IMAGES // 2, "test": 4},
                          size=40)
    return ingest(str(root), tmp_path_factory.mktemp("store").as_uri(), image_size=32)


@pytest.fixture(scope="module")
def no_val(tmp_path_factory):
    """A dataset without val/: train carves a small patient-grouped validation set."""
    root = make_synthetic(tmp_path_factory.mktemp("no-val"), {"train": 20, "test": 4}, size=40)
    return ingest(str(root), tmp_path_factory.mktemp("store").as_uri(), image_size=32)


def youden(y, prob) -> float:
    fpr, tpr, thresholds = roc_curve(y, prob)
    return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))


def bce(y, prob) -> float:
    p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def best_epoch_by_hand(history) -> int:
    """Highest validation AUC; among equal AUCs the lowest validation loss; among equal both, the first."""
    best = history[0]
    for h in history[1:]:
        if h["val_auc"] > best["val_auc"] or (h["val_auc"] == best["val_auc"] and h["val_loss"] < best["val_loss"]):
            best = h
    return best["epoch"]


@pytest.fixture(scope="module")
def trained_own_val(own_val, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "resnet18.pt"
    meta = train(own_val["uri"], "resnet18", str(path), epochs=2, batch_size=16, seed=0)
    return path, meta


def test_threshold_and_best_epoch_come_from_the_datasets_own_val_split(own_val, trained_own_val):
    path, meta = trained_own_val
    vx, vy, entries = StoredDataset(own_val["uri"]).split("val")
    assert meta["val_source"] == "dataset val split" and meta["val"]["n"] == len(vy) == MIN_VAL_IMAGES
    model, ckpt = load_checkpoint(path)
    prob = predict(model, vx, ckpt["mean"], ckpt["std"])  # the kept model's validation probabilities
    # every rule's threshold comes from the validation probabilities; the default rule (balanced) is 0.5
    assert meta["thresholds"]["youden"] == pytest.approx(youden(vy, prob), abs=1e-6)
    assert meta["threshold_rule"] == "balanced" and meta["threshold"] == meta["thresholds"]["balanced"] == 0.5
    assert ckpt["threshold"] == meta["threshold"]
    # the interval is the patient bootstrap seeded with the run's seed (0), not an unseeded or image-level one
    ci = bootstrap_ci(vy, prob, 0.5, seed=0, groups=[e.get("patient") or e["path"] for e in entries])
    assert set(meta["val"]["ci95"]) == set(ci)
    for k, interval in ci.items():
        assert meta["val"]["ci95"][k] == pytest.approx(interval, abs=1e-3), k
    pred = prob >= meta["threshold"]
    assert meta["val"]["confusion_matrix"] == [[int((~pred & (vy == 0)).sum()), int((pred & (vy == 0)).sum())],
                                               [int((~pred & (vy == 1)).sum()), int((pred & (vy == 1)).sum())]]
    # the weights kept are the best epoch's: their validation loss is that epoch's
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["best_epoch"] == best_epoch_by_hand(meta["history"])
    assert bce(vy, prob) == pytest.approx(meta["history"][meta["best_epoch"] - 1]["val_loss"], abs=1e-4)
    assert (meta["epochs"], meta["image_size"], meta["backbone"], meta["classes"]) == (2, 32, "resnet18",
                                                                                      ["NORMAL", "PNEUMONIA"])
    assert meta["pretrained"] is False and meta["dataset_uri"] == own_val["uri"]
    assert meta["seconds"] > 0 and meta["images_per_second"] > 0


@pytest.mark.parametrize("history, expected", [
    ([(0.9, 0.5), (0.9, 0.4), (0.9, 0.3)], 3),  # every epoch ties on AUC: the lowest loss wins, not the first
    ([(0.9, 0.3), (0.9, 0.4), (0.8, 0.1)], 1),  # a lower loss never beats a higher AUC
    ([(0.7, 0.3), (0.9, 0.6), (0.9, 0.6)], 2),  # a full tie keeps the earlier epoch
    ([(0.5, 0.2), (0.6, 0.9), (0.95, 0.9)], 3),
])
def test_best_epoch_tie_on_auc_goes_to_the_lower_validation_loss(history, expected):
    rows = [{"epoch": i + 1, "val_auc": auc, "val_loss": loss} for i, (auc, loss) in enumerate(history)]
    best = None
    for row in rows:  # the way train() keeps its best epoch, one epoch at a time
        if improves(row, best):
            best = row
    assert best["epoch"] == best_epoch_by_hand(rows) == expected


def test_a_run_whose_best_epoch_is_not_its_last_keeps_the_best_epochs_weights(own_val, tmp_path):
    # a learning rate this high collapses resnet18 to a constant after epoch 1 (validation AUC 0.5)
    meta = train(own_val["uri"], "resnet18", str(tmp_path / "m.pt"), epochs=3, batch_size=8, seed=0,
                 learning_rate=0.05)
    aucs = [h["val_auc"] for h in meta["history"]]
    assert aucs[0] > max(aucs[1:]) + 0.02  # the premise: the first epoch is clearly the best
    assert meta["best_epoch"] == best_epoch_by_hand(meta["history"]) == 1
    vx, vy, _ = StoredDataset(own_val["uri"]).split("val")
    model, ckpt = load_checkpoint(tmp_path / "m.pt")
    prob = predict(model, vx, ckpt["mean"], ckpt["std"])
    assert bce(vy, prob) == pytest.approx(meta["history"][0]["val_loss"], abs=1e-4)  # epoch 1's weights


def test_with_tta_the_threshold_and_validation_report_use_the_tta_predictions(own_val, tmp_path):
    meta = train(own_val["uri"], TINY, str(tmp_path / "m.pt"), epochs=1, batch_size=8, seed=1, tta=True,
                 threshold_rule="youden")
    vx, vy, _ = StoredDataset(own_val["uri"]).split("val")
    model, ckpt = load_checkpoint(tmp_path / "m.pt")
    prob = predict(model, vx, ckpt["mean"], ckpt["std"], tta=True)
    plain = predict(model, vx, ckpt["mean"], ckpt["std"])
    assert not np.allclose(prob, plain)  # the premise: the views change the predictions
    assert meta["tta"] is True and meta["threshold"] == pytest.approx(youden(vy, prob), abs=1e-6)
    assert meta["val"]["auc"] == pytest.approx(roc_auc_score(vy, prob), abs=1e-6)
    assert meta["val_predictions"]["prob"] == pytest.approx(prob.tolist(), abs=1e-6)


def test_training_keeps_the_epoch_the_rule_picks(no_val, tmp_path):
    meta = train(no_val["uri"], "resnet18", str(tmp_path / "m.pt"), epochs=3, batch_size=8, seed=2)
    assert meta["best_epoch"] == best_epoch_by_hand(meta["history"])
    assert "carved from train" in meta["val_source"]


def _train(ds, path, **settings):
    args = {"backbone": TINY, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "seed": 0, "pretrained": False,
            "weights": ""}
    args.update(settings)
    uri = args.pop("dataset", ds["uri"])
    return train(uri, args.pop("backbone"), str(path), **args)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ImageNet-shaped weights saved here (nothing can be downloaded): three different files."""
    import timm

    out = tmp_path_factory.mktemp("weights")
    files = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        torch.save(timm.create_model(TINY, pretrained=False).state_dict(), out / f"w{seed}.pth")
        files.append(str(out / f"w{seed}.pth"))
    return files


@pytest.fixture(scope="module")
def identity_store(no_val, tmp_path_factory):
    """Storage root of ``no_val`` after one training with the base settings."""
    _train(no_val, tmp_path_factory.mktemp("base") / "m.pt")
    return open_store(no_val["uri"].rsplit("/datasets/", 1)[0])


def checkpoint_dirs(store) -> set[str]:
    return {k.split("/")[1] for k in store.list("checkpoints")}


def test_the_same_settings_resume_the_same_state(no_val, identity_store, tmp_path, caplog):
    before = checkpoint_dirs(identity_store)
    with caplog.at_level(logging.WARNING, logger="pneumonia_kfp.training"):
        meta = _train(no_val, tmp_path / "again.pt")
    assert "resuming after epoch 1" in caplog.text  # nothing retrained: the stored state is reused
    assert checkpoint_dirs(identity_store) == before and meta["best_epoch"] == 1


@pytest.mark.parametrize("setting", ["backbone", "epochs", "batch_size", "learning_rate", "seed", "pretrained",
                                     "weights", "recipe", "dataset", "autocast", "deterministic"])
def test_every_training_setting_changes_the_resume_identity(setting, no_val, own_val, identity_store, weights,
                                                            tmp_path, caplog, monkeypatch, request):
    if setting == "autocast":  # the V100/T4 path on the CPU: fp16 autocast, so a grad scaler with state
        monkeypatch.setattr(devices, "amp_dtype", lambda device: torch.float16)
    if setting == "deterministic":
        monkeypatch.setenv(DETERMINISTIC_ENV, "1")
        request.addfinalizer(lambda: torch.use_deterministic_algorithms(False))
    changed = {"backbone": {"backbone": "test_efficientnet"}, "epochs": {"epochs": 2}, "batch_size": {"batch_size": 4},
               "learning_rate": {"learning_rate": 2e-3}, "seed": {"seed": 1},
               "pretrained": {"pretrained": True, "weights": weights[0]},
               "weights": {"pretrained": True, "weights": weights[2]},
               "recipe": {"recipe": Recipe(label_smoothing=0.0)}, "dataset": {"dataset": own_val["uri"]},
               "autocast": {}, "deterministic": {}}[setting]
    if setting == "weights":  # against another weights file, not the base settings (any test order)
        _train(no_val, tmp_path / "w1.pt", pretrained=True, weights=weights[1])
        caplog.clear()
    before = checkpoint_dirs(identity_store)
    with caplog.at_level(logging.WARNING, logger="pneumonia_kfp.training"):
        _train(no_val, tmp_path / "m.pt", **changed)
    assert "resuming" not in caplog.text  # a new task trains from its first epoch
    if setting == "dataset":  # another dataset version: its own storage root, its own state
        assert checkpoint_dirs(open_store(own_val["uri"].rsplit("/datasets/", 1)[0]))
    else:
        assert len(checkpoint_dirs(identity_store) - before) == 1


def test_compile_model_trains_through_torch_compile(no_val, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    meta = train(no_val["uri"], TINY, str(tmp_path / "c.pt"), epochs=1, batch_size=8, seed=3, compile_model=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured and compiled the model
    assert np.isfinite(meta["history"][0]["train_loss"])
    model, _ = load_checkpoint(tmp_path / "c.pt")  # a plain (uncompiled) model's weights were saved
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_resume_state_lives_beside_the_dataset_versions_even_under_a_datasets_folder(tmp_path):
    root = make_synthetic(tmp_path / "d", {"train": 20, "test": 2}, size=32)
    storage = tmp_path / "datasets" / "store"  # the storage root's own path holds "/datasets/"
    info = ingest(str(root), storage.as_uri(), image_size=32)
    train(info["uri"], TINY, str(tmp_path / "m.pt"), epochs=1, batch_size=8)
    assert len(list((storage / "checkpoints").glob("*/last.pt"))) == 1
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["store"]  # nothing outside the store
