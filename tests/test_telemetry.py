"""Telemetry against a real pushgateway; progress bars and log lines."""
import io
import logging
import re
import time

import pytest

from pneumonia_kfp import telemetry
from pneumonia_kfp.telemetry import ENV_PROGRESS, IngestTelemetry, TrainTelemetry, progress
from tests.pushgateway import delete_group, scrape

NAME = re.compile(r"^pneumonia_kfp_[a-z_]+$")


def _row(epoch, auc):
    return {"epoch": epoch, "train_loss": 0.5 / epoch, "val_loss": 0.6 / epoch, "val_auc": auc, "seconds": 2.0,
            "images_per_second": 40.0}


def test_train_metrics_reach_the_pushgateway(pushgateway):
    tel = TrainTelemetry("resnet18", epochs=3, gateway=pushgateway)
    tel.epoch_done(_row(1, 0.70), samples=64)
    got = scrape(pushgateway)
    labels = frozenset({"job": "pneumonia_kfp_train", "backbone": "resnet18", "instance": ""}.items())
    assert got["pneumonia_kfp_train_epoch", labels] == 1
    assert got["pneumonia_kfp_train_epochs_planned", labels] == 3
    # the previous run's success stays visible while a run is in progress
    assert ("pneumonia_kfp_train_last_success_timestamp_seconds", labels) not in got

    tel.epoch_done(_row(2, 0.65), samples=64)
    before = time.time()
    tel.done()
    got = scrape(pushgateway)
    assert got["pneumonia_kfp_train_samples_processed_total", labels] == 128
    assert got["pneumonia_kfp_train_epoch", labels] == 2
    assert got["pneumonia_kfp_train_loss", labels] == pytest.approx(0.25)
    assert got["pneumonia_kfp_train_validation_loss", labels] == pytest.approx(0.3)
    assert got["pneumonia_kfp_train_validation_auc", labels] == pytest.approx(0.65)
    assert got["pneumonia_kfp_train_best_validation_auc", labels] == pytest.approx(0.70)
    assert got["pneumonia_kfp_train_images_per_second", labels] == 40
    assert got["pneumonia_kfp_train_epoch_duration_seconds", labels] == 2
    assert got["pneumonia_kfp_train_duration_seconds", labels] == 4
    assert before - 1 <= got["pneumonia_kfp_train_last_success_timestamp_seconds", labels] <= time.time() + 1
    # naming practice: one prefix, counters end in _total, no _created noise, only known labels
    for name, lab in got:
        assert NAME.match(name), name
        assert not name.endswith("_created"), name
        assert {k for k, _ in lab} <= {"job", "instance", "backbone", "split", "class"}
    counters = {n for n, _ in got if "processed" in n or "uploaded" in n}
    assert all(n.endswith("_total") for n in counters)

    # a new run of the same backbone keeps last success until it succeeds itself
    stamp = got["pneumonia_kfp_train_last_success_timestamp_seconds", labels]
    TrainTelemetry("resnet18", epochs=1, gateway=pushgateway).epoch_done(_row(1, 0.5), samples=8)
    again = scrape(pushgateway)
    assert again["pneumonia_kfp_train_last_success_timestamp_seconds", labels] == stamp
    assert again["pneumonia_kfp_train_samples_processed_total", labels] == 8
    delete_group(pushgateway, "job/pneumonia_kfp_train/backbone/resnet18")


def test_a_resumed_run_carries_on_counting():
    tel = TrainTelemetry("resnet18", epochs=3, history=[_row(1, 0.8), _row(2, 0.7)], samples_per_epoch=64)
    tel.epoch_done(_row(3, 0.75), samples=64)
    value = tel.registry.get_sample_value
    assert value("pneumonia_kfp_train_samples_processed_total") == 192
    assert value("pneumonia_kfp_train_duration_seconds") == 6
    assert value("pneumonia_kfp_train_epoch") == 3
    assert value("pneumonia_kfp_train_best_validation_auc") == pytest.approx(0.8)


def test_ingest_metrics_reach_the_pushgateway(pushgateway):
    tel = IngestTelemetry(gateway=pushgateway)
    tel.done(images=52, uploaded=56, counts={"train": {"NORMAL": 20, "PNEUMONIA": 20}, "test": {"NORMAL": 6}})
    got = scrape(pushgateway)
    job = {"job": "pneumonia_kfp_ingest", "instance": ""}
    base = frozenset(job.items())
    assert got["pneumonia_kfp_ingest_images_processed_total", base] == 52
    assert got["pneumonia_kfp_ingest_objects_uploaded_total", base] == 56
    assert got["pneumonia_kfp_ingest_duration_seconds", base] >= 0
    assert got["pneumonia_kfp_ingest_images_per_second", base] > 0
    assert got["pneumonia_kfp_ingest_last_success_timestamp_seconds", base] > time.time() - 60
    key = frozenset({**job, "split": "train", "class": "PNEUMONIA"}.items())
    assert got["pneumonia_kfp_ingest_dataset_images", key] == 20
    delete_group(pushgateway, "job/pneumonia_kfp_ingest")


def test_an_unreachable_pushgateway_never_fails_the_step(caplog):
    from tests.conftest import free_port

    tel = TrainTelemetry("resnet18", epochs=1, gateway=f"127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="pneumonia_kfp.telemetry"):
        tel.epoch_done(_row(1, 0.7), samples=8)
        tel.done()
    assert "pushgateway" in caplog.text and caplog.text.count("failed") == 1  # warned once
    assert tel._pusher.failures == 2


def test_no_pushgateway_configured_pushes_nothing(monkeypatch):
    monkeypatch.delenv(telemetry.ENV_PUSHGATEWAY, raising=False)
    tel = TrainTelemetry("resnet18", epochs=1)
    assert tel._pusher.gateway == "" and tel._pusher.push() is False
    tel.epoch_done(_row(1, 0.7), samples=8)  # metrics are still kept in the registry
    assert tel.registry.get_sample_value("pneumonia_kfp_train_samples_processed_total") == 8


def test_progress_draws_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.setenv(ENV_PROGRESS, "auto")
    out = io.StringIO()
    assert list(progress(range(5), desc="decode", unit="img", file=out)) == list(range(5))
    assert "decode" in out.getvalue() and "100%" in out.getvalue() and "5/5" in out.getvalue()


def test_progress_logs_lines_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv(ENV_PROGRESS, "auto")
    monkeypatch.setattr(telemetry, "_terminal", lambda: None)
    with caplog.at_level(logging.INFO, logger="pneumonia_kfp.telemetry"):
        assert list(progress(iter(range(4)), total=4, desc="resnet18 epoch 1/2", unit="batch", every=0)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("resnet18 epoch 1/2: 1/4 batch (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("resnet18 epoch 1/2: 4/4 batch (100%)") and lines[-1].endswith(" s")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pneumonia_kfp.telemetry"):
        list(progress(range(100), desc="quick", every=3600))  # short loops stay quiet
    assert not caplog.records


def test_progress_mode_is_validated(monkeypatch):
    monkeypatch.setenv(ENV_PROGRESS, "sometimes")
    with pytest.raises(ValueError, match="PNEUMONIA_KFP_PROGRESS"):
        progress(range(3))
    monkeypatch.setenv(ENV_PROGRESS, "off")
    r = range(3)
    assert progress(r) is r
