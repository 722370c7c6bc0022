"""run-local: the whole pipeline on this machine through kfp's local runner.

What a person reads on the console: stage, progress and result lines. Everything the runner and the
task subprocesses print (executor inputs and outputs as JSON, about 430 lines a backbone) goes to
``OUT/run-local.log``. When a task fails, the last line names it and carries its own error line.

No orphans: the pipeline runs in a child process (the runner) in a process group of its own, with
every task and whatever the tasks start. The runner dies with this process, even when this one is
killed by SIGKILL (Linux's parent-death signal), and then ends its whole group; SIGINT, SIGTERM and
SIGHUP here end the group the same way. The runner's workspace and every temporary directory of the
tasks live under ``OUT/.run-local/``, removed when the run ends, however it ends.

OUT is run-local's: ``OUT/.lock`` (``flock``), held by this process and the runner for the whole run,
refuses a second run on the same OUT at the same time, naming the PID that holds it; the kernel
releases it however they end, SIGKILL included. A later run on an OUT run-local made (it carries
``OUT/.pneumonia-kfp-run-local``) replaces its outputs; an OUT holding anything else is refused
unless ``--force``. Each output is replaced whole: written under a temporary name in OUT, then
renamed over the old one (``models/``: a new folder renamed in place), so a reader sees the last
finished run's file or this run's, never a mix. The log is written under ``OUT/.run-local/`` and
renamed to ``OUT/run-local.log`` when the run ends, however it ends (a SIGKILL of the whole group
aside): it is always one whole run's log.
"""
from __future__ import annotations

import contextlib
import fcntl
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
from pneumonia_kfp.outputs import PARTIAL, document, replacing, write_file
from pneumonia_kfp.procs import STOP_SIGNALS, alive, process_table

LOG_FILE = "run-local.log"
LOCK_FILE = ".lock"  # under OUT: flock'ed for the whole run; holds the PIDs of run-local and its runner
MARKER = ".pneumonia-kfp-run-local"  # under OUT: run-local made this folder; a later run may replace its outputs
PROBE = ".write-test"  # check_output's, for a moment
MAX_BACKBONES = 32  # more only with --force: each is a training task (and a CPU estimate)
ESTIMATE_BUDGET_S = 60.0  # the CPU estimate measures backbones for this long, then extrapolates
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


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _step_seconds(name: str, params: dict) -> float:
    """Seconds one training step takes per image on this CPU: the fastest of a few steps on a small batch."""
    import torch

    from pneumonia_kfp.backbones import create_backbone

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
    return min(steps[1:]) / batch


def duration(seconds: float) -> str:
    return f"about {seconds / 60:.0f} min" if seconds >= 60 else f"about {seconds:.0f} s"


def cpu_estimate(params: dict, images: int, say=_say, budget_s: float = ESTIMATE_BUDGET_S,
                 clock=time.monotonic) -> float | None:
    """On a machine without CUDA, the seconds training will take, measured on one small batch per backbone.

    Each backbone's figure is printed as soon as it is measured (one model in memory at a time). After
    ``budget_s`` of measuring, the rest are estimated from the average of those measured, and it says so.
    """
    import torch

    if torch.cuda.is_available():
        return None
    names, work = params["backbones"], images * params["epochs"]
    say(f"No GPU: measuring a training step of each backbone on this CPU (at most {budget_s:.0f} s):\n")
    measured: list[float] = []
    start = clock()
    for i, name in enumerate(names):
        if measured and clock() - start > budget_s:
            average = sum(measured) / len(measured)
            say(f"  the other {len(names) - i} backbone(s): {duration(average * work)} each, not measured (the "
                f"{budget_s:.0f} s for measuring ran out; the average of the {len(measured)} measured)\n")
            return sum(measured) * work + average * work * (len(names) - i)
        measured.append(_step_seconds(name, params))
        say(f"  {name}: {duration(measured[-1] * work)}  ({i + 1}/{len(names)})\n")
    return sum(measured) * work  # parallel tasks share the same cores, so the wall time is about the sum


def check_output(out: Path) -> Path:
    """OUT as a writable directory, or a UsageError before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / PROBE
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output {out}: cannot write there ({e.strerror or e}); "
                         "choose a writable directory") from None
    return out


def check_backbone_count(backbones: list[str], force: bool) -> None:
    if len(backbones) > MAX_BACKBONES and not force:
        raise UsageError(f"--backbones names {len(backbones)} models: run-local trains at most {MAX_BACKBONES} "
                         "(one task each); pass --force to train them all")


def check_owner(out: Path, force: bool) -> None:
    """OUT is run-local's (it carries MARKER) or empty; anything else only with ``force``."""
    if (out / MARKER).exists():
        return
    foreign = sorted(set(os.listdir(out)) - {LOCK_FILE, MARKER, PROBE})
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(f"--output {out} holds files run-local did not write ({shown}); choose an empty or new "
                         "directory, or pass --force to write into it (replacing results.json, report.md, "
                         "report.html, predictions.csv, models/ and run-local.log there)")


def lock_output(out: Path) -> int:
    """Lock OUT for this run (its descriptor; closing it, or this process ending, unlocks), or a UsageError
    naming the PID of the run that holds it."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise UsageError(f"--output {out} is in use by another run-local ({holder}); wait for it to end, or "
                         "choose another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    deadline = time.monotonic() + 2
    while True:  # the holder writes its PID just after it locks
        words = os.pread(fd, 100, 0).decode(errors="replace").split()
        if words or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not words or not words[0].isdigit():
        return "PID unknown"
    pid = int(words[0])
    if alive(pid) or len(words) < 3:
        return f"PID {pid}"
    return f"PID {pid}, ended; its runner, PID {words[2]}, is still stopping its tasks"


def claim_output(out: Path) -> None:
    """With OUT locked: mark it as run-local's, and remove what a killed run left half-written."""
    (out / MARKER).write_text("This folder is written by `pneumonia-kfp run-local`; it replaces the files it "
                              "wrote here.\n")
    for entry in os.scandir(out):
        if PARTIAL in entry.name and entry.name.startswith("."):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{PARTIAL}{os.getpid()}")


def publish_outputs(task, results: dict, out: Path) -> None:
    """OUT/models/<backbone>/ (checkpoint and exported forms), predictions.csv, report.md, report.html and, last,
    results.json (naming the copies in OUT/models instead of the runner's artifact paths), each replacing
    the last run's whole."""
    models, new = out / "models", _partial(out / "models")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    for m in results["models"]:
        src = m.get("model_uri")
        if src and Path(src).is_dir():
            shutil.copytree(src, new / m["backbone"])
            m["model_uri"] = str(models / m["backbone"])
    old = out / f".models-old{PARTIAL}{os.getpid()}"
    if models.exists():
        os.rename(models, old)
    os.rename(new, models)
    shutil.rmtree(old, ignore_errors=True)
    for name, artifact in (("predictions.csv", "predictions"), ("report.md", "report_md"),
                           ("report.html", "report_html")):
        with replacing(out / name) as tmp:
            shutil.copyfile(task.outputs[artifact].path, tmp)
    write_file(out / "results.json", document(results))


def publish_log(state: Path, out: Path) -> None:
    """The run's log, OUT/.run-local/run-local.log, as OUT/run-local.log (a whole log replaces a whole log)."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(state / LOG_FILE, out / LOG_FILE)


STATE_DIR = ".run-local"  # under OUT: the runner's spec, workspace and the tasks' temporary files


def run_local(params: dict, out: Path, storage: str | None, synthetic: bool, runner: str = "subprocess",
              gpus: str | None = None, force: bool = False) -> int:
    """Check everything that can be checked, lock OUT, then run the pipeline in a runner process (``_runner``):
    its tasks as subprocesses here, or (``runner="docker"``) in the project's image."""
    check_backbone_count(params["backbones"], force)
    out = check_output(out.resolve())
    check_owner(out, force)
    lock = lock_output(out)
    try:
        claim_output(out)
        return _checked_run(params, out, storage, synthetic, runner, gpus, lock)
    finally:
        os.close(lock)  # the runner, when it still runs, holds the lock until it has ended


def _checked_run(params: dict, out: Path, storage: str | None, synthetic: bool, runner: str, gpus: str | None,
                 lock: int) -> int:
    from pneumonia_kfp.data import scan_image_folder

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
    if estimate is not None:
        _say(f"No GPU: training {len(params['backbones'])} backbone(s) for {params['epochs']} epoch(s) "
             f"at {params['image_size']} px takes {duration(estimate)} on this CPU. For a quick look: "
             "--backbones resnet18 --epochs 2 --image-size 64.\n")

    # tasks run side by side on this machine: split the cores so their thread pools don't fight
    parallel = min(params["max_parallel"], len(params["backbones"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    return supervise(params, out, {"runner": runner, "gpus": gpus, "run_id": f"{os.getpid()}-{time.time_ns()}"},
                     lock=lock)


def supervise(params: dict, out: Path, execution: dict | None = None, lock: int | None = None) -> int:
    """Run ``_runner`` in a process group of its own and wait for it; a stop signal here ends the group.
    ``lock``: OUT's lock, which the runner holds too, so that OUT stays locked until the runner has ended."""
    state = out / STATE_DIR
    shutil.rmtree(state, ignore_errors=True)  # left by a runner killed together with its group
    state.mkdir()
    (state / "spec.json").write_text(json.dumps({"params": params, "out": str(out), "parent": os.getpid(),
                                                 "execution": execution or {"runner": "subprocess"}}))
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    stopped: list[int] = []
    runner: list[subprocess.Popen] = []

    def stop(signum, _frame):
        stopped.append(signum)
        if runner:
            signal_group(runner[0].pid, signal.SIGTERM)  # the runner ends its tasks and cleans up, then exits

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}  # before the runner starts: no gap
    try:
        runner.append(subprocess.Popen([sys.executable, "-m", "pneumonia_kfp.pipelines.local", str(state)],
                                       pass_fds=() if lock is None else (lock,), **group))
        if lock is not None:
            os.pwrite(lock, f"{os.getpid()} runner {runner[0].pid}\n".encode(), 0)
        if stopped:
            signal_group(runner[0].pid, signal.SIGTERM)
        code = runner[0].wait()
    finally:
        if runner:
            signal_group(runner[0].pid, signal.SIGKILL)  # whatever outlived the runner
        error = (state / "error.txt").read_text() if (state / "error.txt").exists() else None
        publish_log(state, out)
        shutil.rmtree(state, ignore_errors=True)
        for s, handler in previous.items():  # only now: a signal during the cleanup above does not cut it short
            signal.signal(s, handler)
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
        run_pipeline(spec["params"], Path(spec["out"]), state, execution)
    except PneumoniaKfpError as e:
        try:
            (state / "error.txt").write_text(str(e))
        except OSError:  # the state is gone: say it here instead
            sys.stderr.write(f"pneumonia-kfp run-local: error: {e}\n")
        return 2
    finally:
        publish_log(state, Path(spec["out"]))
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
    publish_log(state, state.parent)
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


def run_pipeline(params: dict, out: Path, state: Path, execution: dict | None = None) -> None:
    """The pipeline, its log in ``state`` (renamed into OUT when the run ends), its outputs into OUT."""
    from kfp import local

    from pneumonia_kfp.pipelines.pipeline import build_pipeline

    root = out / "kfp-root"
    root.mkdir(exist_ok=True)  # made here, not by Docker (which would make a missing bind source root's, 0755)
    local.init(runner=task_runner(params, out, execution or {"runner": "subprocess"}), pipeline_root=str(root),
               workspace_root=str(state / "workspace"))
    pipeline = build_pipeline(params.pop("max_parallel"))
    log_path = out / LOG_FILE  # where the log will be when the run has ended
    start = time.perf_counter()
    with open(state / LOG_FILE, "w", buffering=1) as log:  # by lines: a stop's os._exit loses none
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
    publish_outputs(task, results, out)
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
