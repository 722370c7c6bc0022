"""run-local: the whole pipeline on this machine through kfp's local runner.

What a person reads on the console: stage, progress and result lines. Everything the runner and the
task subprocesses print (executor inputs and outputs as JSON, about 430 lines a backbone) goes to
``OUT/run-local.log``. When a task fails, the last line names it and carries its own error line.

No orphans: the pipeline runs in a child process (the runner) in a process group of its own, with
every task and whatever the tasks start. The runner dies with this process, even when this one is
killed by SIGKILL (Linux's parent-death signal), and then ends its whole group; SIGINT, SIGTERM and
SIGHUP here end the group the same way. The runner's workspace and every temporary directory of the
tasks live under ``OUT/.run-local/``, removed when the run ends, however it ends.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from pneumonia_kfp.errors import PneumoniaKfpError, UsageError
from pneumonia_kfp.procs import process_table

LOG_FILE = "run-local.log"
SYNTHETIC_WARNING = ("!!! SYNTHETIC DATA: no --data was given, so the models were trained on generated images.\n"
                     "!!! Results on it mean nothing about real X-rays. Pass --data DIR for real data.")
# lines worth a person's attention: kfp's task start/finish lines and the steps' own log lines
_TASK = re.compile(r"Executing task|finished with status")
_STEP = re.compile(r"\[KFP Executor \S+ (\d\d:\d\d:\d\d),\d+ (INFO|WARNING|ERROR)\]: (.*)")
_NOISE = re.compile(r"^(Looking for component|Loading KFP component|Got executor_input|Wrote executor output)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRACEBACK = re.compile(r"^(\s*)Traceback \(most recent call last\):")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)(?::\s*(.*))?$")  # module.Name: message
_FAILED = re.compile(r"Task '([^']+)' finished with status FAILURE")


class ConsoleFilter(io.TextIOBase):
    """A text stream: every line to the log file, the lines a person reads also to the console.

    It also finds why a task failed: the exception line that ends the task's traceback (any
    exception, not only ``*Error``s; never a log line that merely contains "Error:"), attributed to
    the task whose FAILURE line follows it. ``failure`` is the first failed task and its error line.
    """

    def __init__(self, log, console):
        self.log, self.console, self.pending = log, console, ""
        self.lock = threading.Lock()  # ParallelFor iterations log from several threads
        self.failure: tuple[str, str | None] | None = None
        self._traceback_indent: int | None = None  # inside a traceback: its indentation
        self._last_exception: str | None = None

    @property
    def last_error(self) -> str | None:
        return self.failure[1] if self.failure else self._last_exception

    def write(self, text: str) -> int:
        with self.lock:
            return self._write(text)

    def _write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._follow(_ANSI.sub("", line))
            step = _STEP.search(line)
            if step and not _NOISE.match(step.group(3)):
                level = "" if step.group(2) == "INFO" else step.group(2) + " "
                self.console.write(f"{step.group(1)} {level}{step.group(3)}\n")
            elif _TASK.search(line):
                self.console.write(line.strip() + "\n")
        return len(text)

    def _follow(self, line: str) -> None:
        """Track tracebacks and task failures, line by line."""
        failed = _FAILED.search(line)
        if failed:
            if self.failure is None:
                self.failure = (failed.group(1), self._last_exception)
            self._last_exception = None
            return
        start = _TRACEBACK.match(line)
        if start:
            self._traceback_indent = len(start.group(1))
            return
        if self._traceback_indent is None or not line.strip():
            return
        indent, text = len(line) - len(line.lstrip()), line.strip()
        if indent > self._traceback_indent or text.startswith(("During handling", "The above exception", "[KFP")):
            return  # a frame, a chained traceback's link, or another task's line in between
        exception = _EXCEPTION.match(text.split(": ", 1)[0]) if indent == self._traceback_indent else None
        if exception:
            message = text.split(": ", 1)[1].strip() if ": " in text else ""
            self._last_exception = f"{exception.group(1)}: {message}" if message else exception.group(1)
        self._traceback_indent = None

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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STATE_DIR = ".run-local"  # under OUT: the runner's spec, workspace and the tasks' temporary files


def run_local(params: dict, out: Path, storage: str | None, synthetic: bool, runner: str = "subprocess",
              gpus: str | None = None) -> int:
    """Check everything that can be checked, then run the pipeline in a runner process (``_runner``):
    its tasks as subprocesses here, or (``runner="docker"``) in the project's image."""
    from pneumonia_kfp.data import scan_image_folder

    out = check_output(out.resolve())
    if runner == "docker":  # engine, image and GPUs first: one line each, before any work
        from pneumonia_kfp.components.kfp_defaults import BASE_IMAGE
        from pneumonia_kfp.pipelines import docker

        client = docker.connect()
        docker.check_image(client, BASE_IMAGE)
        docker.gpu_ids(client, gpus)
    elif gpus:
        raise UsageError("--gpus needs --runner docker (subprocess tasks use whatever GPU torch finds)")
    if synthetic:
        params["data"] = str(announce_synthetic(out, params["image_size"]))
    else:
        params["data"] = str(Path(params["data"]).expanduser().resolve())
    _, files = scan_image_folder(params["data"])  # fail fast, with a clear message, before any task starts
    params["storage"] = storage or (out / "store").as_uri()
    estimate = None if gpus else cpu_estimate(params, sum(f.split != "test" for f in files))
    if estimate:
        sys.stdout.write(f"No GPU: training {len(params['backbones'])} backbone(s) for {params['epochs']} epoch(s) "
                         f"at {params['image_size']} px takes {estimate} on this CPU. For a quick look: "
                         "--backbones resnet18 --epochs 2 --image-size 64.\n")
        sys.stdout.flush()

    # tasks run side by side on this machine: split the cores so their thread pools don't fight
    parallel = min(params["max_parallel"], len(params["backbones"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    return supervise(params, out, {"runner": runner, "gpus": gpus, "run_id": f"{os.getpid()}-{time.time_ns()}"})


def supervise(params: dict, out: Path, execution: dict | None = None) -> int:
    """Run ``_runner`` in a process group of its own and wait for it; a stop signal here ends the group."""
    state = out / STATE_DIR
    shutil.rmtree(state, ignore_errors=True)  # left by a runner killed together with its group
    state.mkdir()
    (state / "spec.json").write_text(json.dumps({"params": params, "out": str(out), "parent": os.getpid(),
                                                 "execution": execution or {"runner": "subprocess"}}))
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    runner = subprocess.Popen([sys.executable, "-m", "pneumonia_kfp.pipelines.local", str(state)], **group)
    stopped: list[int] = []

    def stop(signum, _frame):
        stopped.append(signum)
        signal_group(runner.pid, signal.SIGTERM)  # the runner ends its tasks and cleans up, then exits

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        code = runner.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal_group(runner.pid, signal.SIGKILL)  # whatever outlived the runner
        error = (state / "error.txt").read_text() if (state / "error.txt").exists() else None
        shutil.rmtree(state, ignore_errors=True)
    if stopped:
        sys.stderr.write(f"pneumonia-kfp run-local: stopped by {signal.Signals(stopped[0]).name}; "
                         "its tasks were ended\n")
        return 128 + stopped[0]
    if error:
        raise UsageError(error)
    return code


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc: the group outlives its leader)."""
    return [pid for pid, fields in process_table().items() if int(fields[2]) == pgid and fields[0] != "Z"]


def _runner(state: Path) -> int:
    """The runner process: leader of the group every task joins; it dies with run-local and ends them."""
    from pneumonia_kfp.procs import die_with_parent

    spec = json.loads((state / "spec.json").read_text())
    die_with_parent(spec["parent"], signal.SIGTERM)
    execution = spec["execution"]
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, _frame: _end_group(signum, state, execution.get("run_id")))
    (state / "tmp").mkdir()
    os.environ["TMPDIR"] = str(state / "tmp")  # the tasks' temporary directories, removed with the state
    try:
        run_pipeline(spec["params"], Path(spec["out"]), state / "workspace", execution)
    except PneumoniaKfpError as e:
        (state / "error.txt").write_text(str(e))
        return 2
    return 0


def _end_group(signum: int, state: Path, run_id: str | None = None) -> None:
    """End every task (and what they started) in this runner's group and every task container of this run,
    remove the state, exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches this process too
    if run_id:
        from pneumonia_kfp.pipelines.docker import stop_containers

        stop_containers(run_id)  # containers are the engine's children, not in this process group
    me = os.getpid()
    signal_group(me, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [p for p in _group_members(me) if p != me]:
        time.sleep(0.1)
    for pid in _group_members(me):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(state, ignore_errors=True)
    os._exit(128 + signum)


def task_runner(params: dict, out: Path, execution: dict):
    """kfp's runner for the tasks: subprocesses of this process, or containers of the project's image."""
    from kfp import local

    if execution["runner"] != "docker":
        return local.SubprocessRunner(use_venv=False)
    from pneumonia_kfp.components.kfp_defaults import BASE_IMAGE
    from pneumonia_kfp.pipelines import docker
    from pneumonia_kfp.pipelines.settings import Train

    return docker.runner(docker.connect(), BASE_IMAGE, out=out, data=params["data"], storage=params["storage"],
                         run_id=execution["run_id"], shm_size=Train().shm_size, gpus=execution.get("gpus"))


def run_pipeline(params: dict, out: Path, workspace: Path, execution: dict | None = None) -> None:
    from kfp import local

    from pneumonia_kfp.pipelines.pipeline import build_pipeline

    root = out / "kfp-root"
    root.mkdir(exist_ok=True)  # made here, not by Docker (which would make a missing bind source root's, 0755)
    local.init(runner=task_runner(params, out, execution or {"runner": "subprocess"}), pipeline_root=str(root),
               workspace_root=str(workspace))
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
            if stream.failure:
                name, error = stream.failure
                cause = f"task {name} failed: {error or 'no error line (killed?)'}"
            else:
                cause = str(e)
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


if __name__ == "__main__":
    sys.exit(_runner(Path(sys.argv[1])))
