"""What operators watch: Prometheus metrics pushed to a pushgateway, and progress output.

Metrics (prometheus-client, one registry per step) go to a pushgateway only when
``PNEUMONIA_KFP_PUSHGATEWAY`` (``host:port`` or ``http(s)://host:port``) is set; otherwise they
are kept in memory and nothing leaves the process. A failed push is logged and never fails the
step. Every name carries the ``pneumonia_kfp_`` prefix, times are in seconds, counters end in
``_total``; the only label besides the pushgateway's ``job`` is ``backbone`` (train) plus
``split``/``class`` on the dataset-size gauge (ingest).

    job="pneumonia_kfp_ingest"
      pneumonia_kfp_ingest_images_processed_total        images read (hashed; decoded when new)
      pneumonia_kfp_ingest_objects_uploaded_total        objects written to the store
      pneumonia_kfp_ingest_dataset_images{split,class}   images in the dataset version
      pneumonia_kfp_ingest_images_per_second
      pneumonia_kfp_ingest_duration_seconds
      pneumonia_kfp_ingest_last_success_timestamp_seconds
    job="pneumonia_kfp_train", backbone="<timm name>"
      pneumonia_kfp_train_samples_processed_total        training images seen (all epochs)
      pneumonia_kfp_train_epoch                           last finished epoch
      pneumonia_kfp_train_epochs_planned
      pneumonia_kfp_train_loss                            mean training loss of the last epoch
      pneumonia_kfp_train_validation_loss
      pneumonia_kfp_train_validation_auc
      pneumonia_kfp_train_best_validation_auc
      pneumonia_kfp_train_images_per_second               last epoch's training throughput
      pneumonia_kfp_train_epoch_duration_seconds          last epoch
      pneumonia_kfp_train_duration_seconds                training time so far
      pneumonia_kfp_train_last_success_timestamp_seconds

Train pushes after every epoch, ingest when it is done. Pushes use POST (pushadd), so a running
or failed job never erases the previous run's ``last_success_timestamp_seconds``: alert on
``time() - pneumonia_kfp_train_last_success_timestamp_seconds``.

Progress: ``progress()`` draws a tqdm bar when there is a terminal (stderr itself, or the
controlling terminal ``/dev/tty`` — kfp's local runner pipes a task's output, so bars go to the
terminal directly) and writes plain log lines every ``PNEUMONIA_KFP_PROGRESS_SECONDS`` (default
30) where there is none (cluster pods, CI). ``PNEUMONIA_KFP_PROGRESS=bar|log|off`` forces a mode.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time

from pneumonia_kfp.errors import UsageError

log = logging.getLogger(__name__)

ENV_PUSHGATEWAY = "PNEUMONIA_KFP_PUSHGATEWAY"
ENV_PROGRESS = "PNEUMONIA_KFP_PROGRESS"
ENV_PROGRESS_SECONDS = "PNEUMONIA_KFP_PROGRESS_SECONDS"
PREFIX = "pneumonia_kfp"
PUSH_TIMEOUT_SECONDS = 5.0


class _Pusher:
    """One step's registry and its pushgateway group (job + grouping key)."""

    def __init__(self, job: str, grouping_key: dict[str, str], gateway: str | None = None):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.job, self.grouping_key = job, grouping_key
        self.gateway = gateway if gateway is not None else os.environ.get(ENV_PUSHGATEWAY, "").strip()
        self.failures = 0

    def gauge(self, name: str, doc: str, labels=()):
        from prometheus_client import Gauge

        return Gauge(f"{PREFIX}_{name}", doc, labelnames=labels, registry=self.registry)

    def counter(self, name: str, doc: str):
        from prometheus_client import Counter

        return Counter(f"{PREFIX}_{name}", doc, registry=self.registry)  # exposed as <name>_total

    def push(self) -> bool:
        """POST the registry to the pushgateway; False (and a log line) when that fails."""
        if not self.gateway:
            return False
        from prometheus_client import pushadd_to_gateway

        try:
            pushadd_to_gateway(self.gateway, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                               timeout=PUSH_TIMEOUT_SECONDS)
            return True
        except Exception as e:  # metrics must never fail a pipeline step
            self.failures += 1
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(level, "pushing metrics to the pushgateway %s failed (%s); the step goes on", self.gateway, e)
            return False


def _disable_created_series() -> None:
    # <name>_created series mean nothing for a batch job pushed to a pushgateway
    try:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()
    except ImportError:  # prometheus-client < 0.17
        pass


class IngestTelemetry:
    def __init__(self, gateway: str | None = None):
        _disable_created_series()
        p = self._pusher = _Pusher(f"{PREFIX}_ingest", {}, gateway)
        self.start = time.time()
        self.images = p.counter("ingest_images_processed", "Images read by ingest (hashed; decoded when new)")
        self.uploaded = p.counter("ingest_objects_uploaded", "Objects ingest wrote to the store")
        self.dataset = p.gauge("ingest_dataset_images", "Images in the ingested dataset version", ("split", "class"))
        self.rate = p.gauge("ingest_images_per_second", "Images processed per second over the whole ingest")
        self.duration = p.gauge("ingest_duration_seconds", "Wall time of the ingest step")
        self._last_success = None

    @property
    def registry(self):
        return self._pusher.registry

    def done(self, images: int, uploaded: int, counts: dict[str, dict[str, int]]) -> None:
        """Record a successful ingest and push it."""
        seconds = max(time.time() - self.start, 1e-9)
        self.images.inc(images)
        self.uploaded.inc(uploaded)
        for split, by_class in counts.items():
            for cls, n in by_class.items():
                self.dataset.labels(split=split, **{"class": cls}).set(n)
        self.rate.set(images / seconds)
        self.duration.set(seconds)
        if self._last_success is None:  # created only on success: see the module docstring
            self._last_success = self._pusher.gauge(
                "ingest_last_success_timestamp_seconds", "Unix time of the last successful ingest")
        self._last_success.set_to_current_time()
        log.info("ingest: %d images in %.1f s (%.0f img/s), %d objects uploaded", images, seconds,
                 images / seconds, uploaded)
        self._pusher.push()


class TrainTelemetry:
    """``history``/``samples_per_epoch``: the epochs a resumed run finished before its restart, so
    counters and totals carry on instead of starting again at zero."""

    def __init__(self, backbone: str, epochs: int, gateway: str | None = None, history=(),
                 samples_per_epoch: int = 0):
        _disable_created_series()
        p = self._pusher = _Pusher(f"{PREFIX}_train", {"backbone": backbone}, gateway)
        self.samples = p.counter("train_samples_processed", "Training images seen, summed over epochs")
        self.epoch = p.gauge("train_epoch", "Last finished epoch (1-based)")
        self.planned = p.gauge("train_epochs_planned", "Epochs this training run will do")
        self.loss = p.gauge("train_loss", "Mean training loss of the last epoch")
        self.val_loss = p.gauge("train_validation_loss", "Validation loss after the last epoch")
        self.val_auc = p.gauge("train_validation_auc", "Validation ROC AUC after the last epoch")
        self.best_auc = p.gauge("train_best_validation_auc", "Best validation ROC AUC so far")
        self.rate = p.gauge("train_images_per_second", "Training throughput of the last epoch")
        self.epoch_seconds = p.gauge("train_epoch_duration_seconds", "Training time of the last epoch")
        self.duration = p.gauge("train_duration_seconds", "Training time so far (validation excluded)")
        self.planned.set(epochs)
        self._last_success = None
        self._best = -math.inf
        for row in history:
            self._record(row, samples_per_epoch)

    @property
    def registry(self):
        return self._pusher.registry

    def epoch_done(self, row: dict, samples: int) -> None:
        """After an epoch: ``row`` is train's history row (epoch, losses, val_auc, seconds, images/s)."""
        self._record(row, samples)
        self._pusher.push()

    def _record(self, row: dict, samples: int) -> None:
        self.samples.inc(samples)
        self.epoch.set(row["epoch"])
        self.loss.set(row["train_loss"])
        self.val_loss.set(row["val_loss"])
        self.val_auc.set(row["val_auc"])
        if row["val_auc"] > self._best:  # NaN (one-class validation) never counts as best
            self._best = row["val_auc"]
            self.best_auc.set(self._best)
        self.rate.set(row["images_per_second"])
        self.epoch_seconds.set(row["seconds"])
        self.duration.inc(row["seconds"])

    def done(self) -> None:
        if self._last_success is None:
            self._last_success = self._pusher.gauge(
                "train_last_success_timestamp_seconds", "Unix time of the last successful training run")
        self._last_success.set_to_current_time()
        self._pusher.push()


# --------------------------------------------------------------------------------------------
# progress


_TTY: list = []  # the controlling terminal, opened once per process


def _terminal():
    """A writable terminal for progress bars, or None (then: log lines)."""
    if sys.stderr is not None and sys.stderr.isatty():
        return sys.stderr
    if not _TTY:
        try:
            _TTY.append(open("/dev/tty", "w"))  # noqa: SIM115 - kept for the process's lifetime
        except OSError:
            _TTY.append(None)
    return _TTY[0]


def _columns(out) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def progress_mode() -> str:
    mode = os.environ.get(ENV_PROGRESS, "auto").strip().lower() or "auto"
    if mode not in ("auto", "bar", "log", "off"):
        raise UsageError(f"{ENV_PROGRESS}={mode!r}: use auto, bar, log or off")
    return mode


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "it", file=None,
             every: float | None = None):
    """Iterate ``iterable`` with a progress bar (terminal) or periodic log lines (no terminal)."""
    mode = progress_mode()
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if mode == "off":
        return iterable
    if mode in ("auto", "bar"):
        out = file or _terminal()
        if out is None and mode == "bar":
            out = sys.stderr
        if out is not None:
            from tqdm import tqdm

            sized = _columns(out) > 0  # a terminal that reports 0 columns (some ptys) gets a fixed width
            return tqdm(iterable, total=total, desc=desc, unit=unit, file=out, dynamic_ncols=sized,
                        ncols=None if sized else 100, mininterval=0.5)
    if every is None:
        every = float(os.environ.get(ENV_PROGRESS_SECONDS, "30"))
    return _LogProgress(iterable, total, desc, unit, every)


class _LogProgress:
    """Log ``desc: n/total unit (pct) rate, ETA`` at most every ``every`` seconds, and at the end
    when anything was logged before (short loops stay quiet)."""

    def __init__(self, iterable, total, desc, unit, every):
        self.iterable, self.total, self.desc, self.unit, self.every = iterable, total, desc, unit, every
        self.lines = 0

    def _line(self, n: int, elapsed: float, final: bool) -> None:
        rate = n / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * n / self.total:.0f}%)" if self.total else ""
        tail = f" in {elapsed:.0f} s" if final else (
            f", ETA {(self.total - n) / rate:.0f} s" if self.total and rate > 0 else "")
        log.info("%s: %d%s %s%s, %.1f %s/s%s", self.desc, n, of, self.unit, pct, rate, self.unit, tail)
        self.lines += 1

    def __iter__(self):
        start = last = time.perf_counter()
        n = 0
        for item in self.iterable:
            yield item
            n += 1
            now = time.perf_counter()
            if now - last >= self.every:
                self._line(n, now - start, final=False)
                last = now
        if self.lines:
            self._line(n, time.perf_counter() - start, final=True)
