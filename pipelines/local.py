"""run-local: the whole pipeline on this machine through kfp's local runner.

What a person reads on the console: stage, progress and result lines. Everything the runner and the
task subprocesses print (executor inputs and outputs as JSON, about 430 lines a backbone) goes to
``OUT/run-local.log``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

from pneumonia_kfp.errors import UsageError

LOG_FILE = "run-local.log"
SYNTHETIC_WARNING = ("!!! SYNTHETIC DATA: no --data was given, so the models were trained on generated images.\n"
                     "!!! Results on it mean nothing about real X-rays. Pass --data DIR for real data.")
# lines worth a person's attention: kfp's task start/finish lines and the steps' own log lines
_TASK = re.compile(r"Executing task|finished with status")
_STEP = re.compile(r"\[KFP Executor \S+ (\d\d:\d\d:\d\d),\d+ (INFO|WARNING|ERROR)\]: (.*)")
_NOISE = re.compile(r"^(Looking for component|Loading KFP component|Got executor_input|Wrote executor output)")
_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?(\w*Error): (.+)$")


class ConsoleFilter(io.TextIOBase):
    """A text stream: every line to the log file, the lines a person reads also to the console."""

    def __init__(self, log, console):
        self.log, self.console, self.pending, self.last_error = log, console, "", None
        self.lock = threading.Lock()  # ParallelFor iterations log from several threads

    def write(self, text: str) -> int:
        with self.lock:
            return self._write(text)

    def _write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            m = _ERROR.match(line)
            if m:
                self.last_error = f"{m.group(1)}: {m.group(2).strip()}"
            step = _STEP.search(line)
            if step and not _NOISE.match(step.group(3)):
                level = "" if step.group(2) == "INFO" else step.group(2) + " "
                self.console.write(f"{step.group(1)} {level}{step.group(3)}\n")
            elif _TASK.search(line):
                self.console.write(line.strip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()


@contextlib.contextmanager
def _root_log_to(stream):
    """Log records of the runner (also from ParallelFor threads) through ``stream`` while the pipeline runs."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [logging.StreamHandler(stream)]
    try:
        yield
    finally:
        root.handlers = saved


def announce_synthetic(out: Path, image_size: int) -> Path:
    from pneumonia_kfp.synthetic import make_synthetic

    data = make_synthetic(out / "synthetic-data", size=max(64, image_size))
    sys.stdout.write("!" * 78 + f"\n!!! No --data given: using a SYNTHETIC dataset at {data}.\n"
                     "!!! Results on it mean nothing about real X-rays. Pass --data DIR for real data.\n"
                     + "!" * 78 + "\n")
    sys.stdout.flush()
    return data


def cpu_estimate(params: dict, images: int) -> str | None:
    """On a machine without CUDA, how long training will take, measured on one small batch per backbone."""
    import torch

    if torch.cuda.is_available():
        return None
    from pneumonia_kfp.backbones import create_backbone

    seconds = 0.0
    for name in params["backbones"]:
        model = create_backbone(name, num_classes=2)
        opt = torch.optim.AdamW(model.parameters())
        batch = min(8, params["batch_size"])  # small enough to measure in seconds, big enough to be representative
        x = torch.randn(batch, 1, params["image_size"], params["image_size"])
        y = torch.arange(batch) % 2
        steps = []
        for _ in range(3):  # the first step warms up allocators and kernels; the fastest counts
            start = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            steps.append(time.perf_counter() - start)
        seconds += min(steps[1:]) / batch * images * params["epochs"]
    # parallel tasks share the same cores, so the wall time is about the sum
    return f"about {seconds / 60:.0f} min" if seconds >= 60 else f"about {seconds:.0f} s"


def check_output(out: Path) -> Path:
    """OUT as a writable directory, or a UsageError before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output {out}: cannot write there ({e.strerror or e}); "
                         "choose a writable directory") from None
    return out


def keep_models_and_predictions(task, results: dict, out: Path) -> None:
    """OUT/predictions.csv, and each model directory (checkpoint + exported forms) as OUT/models/<backbone>/;
    results.json then names those copies instead of the runner's artifact paths."""
    shutil.copyfile(task.outputs["predictions"].path, out / "predictions.csv")
    for m in results["models"]:
        src = m.get("model_uri")
        if src and Path(src).is_dir():
            dest = out / "models" / m["backbone"]
            shutil.copytree(src, dest, dirs_exist_ok=True)
            m["model_uri"] = str(dest)


def run_local(params: dict, out: Path, storage: str | None, synthetic: bool) -> int:
    from kfp import local

    from pneumonia_kfp.data import scan_image_folder
    from pneumonia_kfp.pipelines.pipeline import build_pipeline

    out = check_output(out.resolve())
    if synthetic:
        params["data"] = str(announce_synthetic(out, params["image_size"]))
    else:
        params["data"] = str(Path(params["data"]).expanduser().resolve())
    _, files = scan_image_folder(params["data"])  # fail fast, with a clear message, before any task starts
    params["storage"] = storage or (out / "store").as_uri()
    estimate = cpu_estimate(params, sum(f.split != "test" for f in files))
    if estimate:
        sys.stdout.write(f"No GPU: training {len(params['backbones'])} backbone(s) for {params['epochs']} epoch(s) "
                         f"at {params['image_size']} px takes {estimate} on this CPU. For a quick look: "
                         "--backbones resnet18 --epochs 2 --image-size 64.\n")

    # tasks run side by side on this machine: split the cores so their thread pools don't fight
    parallel = min(params["max_parallel"], len(params["backbones"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp-root"))
    pipeline = build_pipeline(params.pop("max_parallel"))
    log_path = out / LOG_FILE
    start = time.perf_counter()
    with open(log_path, "w") as log:
        stream = ConsoleFilter(log, sys.stdout)
        try:
            with contextlib.redirect_stdout(stream), _root_log_to(stream), warnings.catch_warnings():
                warnings.filterwarnings("ignore", module="kfp")  # "custom base image" notices: known, harmless here
                task = pipeline(**params)
        except RuntimeError as e:
            cause = stream.last_error or str(e)
            raise UsageError(f"the local pipeline run failed: {cause} (full log: {log_path})") from None
    wall = time.perf_counter() - start

    results = json.loads(Path(task.outputs["results"].path).read_text())
    results["wall_seconds"] = wall
    keep_models_and_predictions(task, results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    shutil.copyfile(task.outputs["report_md"].path, out / "report.md")
    shutil.copyfile(task.outputs["report_html"].path, out / "report.html")
    lines = [f"\nPipeline finished in {wall:.0f} s."]
    for m in results["models"]:
        t = m["test"]
        lines.append(f"  {m['backbone']:<20} test accuracy {t['accuracy']:.4f}  F1 {t['f1']:.4f}  "
                     f"specificity {t['specificity']:.4f}  AUC {t['auc']:.4f}")
    if results.get("best"):
        lines.append(f"Best by validation: {results['best']['backbone']}")
    if results["dataset"].get("synthetic"):
        lines.append(SYNTHETIC_WARNING)
    lines.append(f"Results: {out / 'results.json'}\nReport:  {out / 'report.md'}\n         {out / 'report.html'}\n"
                 f"Predictions: {out / 'predictions.csv'}\nModels:  {out / 'models'}\nLog:     {log_path}")
    # sys.stdout, not print: kfp's local runner leaves builtins.print patched to indent task logs
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
