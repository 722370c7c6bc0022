"""run-local: the whole pipeline on this machine through kfp's local runner.

What a person reads on the console: stage, progress and result lines (console.py picks them). Everything
the runner and the tasks print (executor inputs and outputs as JSON, about 430 lines a backbone) goes to
``OUT/run-local.log``. When a task fails, the last line names it and carries its error, read from the
error record the task wrote (pneumonia_kfp.task_errors) into ``OUT/.run-local/task-errors/``.

No orphans: the pipeline runs in a child process (the runner), the leader of a process group of its own
with every task and whatever the tasks start (pneumonia_kfp.supervise). The runner dies with this
process, even when this one is killed by SIGKILL, and then ends its whole group; SIGINT, SIGTERM and
SIGHUP here end the group the same way. The runner's workspace and every temporary directory of the
tasks live under ``OUT/.run-local/``, removed when the run ends, however it ends.

OUT's ownership, lock and outputs replaced whole: out_folder.py. The CPU estimate: cpu_estimate.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

from pneumonia_kfp.documents import read_results
from pneumonia_kfp.errors import PneumoniaKfpError, UsageError
from pneumonia_kfp.pipelines.console import ConsoleFilter, root_log_to
from pneumonia_kfp.pipelines.cpu_estimate import cpu_estimate, duration, say
from pneumonia_kfp.pipelines.out_folder import (
    LOG_FILE,
    check_output,
    check_owner,
    claim_output,
    lock_output,
    publish_log,
    publish_outputs,
)
from pneumonia_kfp.supervise import end_group, lead_group, run_group
from pneumonia_kfp.task_errors import TASK_ERRORS_ENV, failure_line

MAX_BACKBONES = 32  # more only with --force: each is a training task (and a CPU estimate)
STATE_DIR = ".run-local"  # under OUT: the runner's spec, workspace, the tasks' temporary files and error records
TASK_ERRORS = "task-errors"  # under the state: one record per task while it runs, kept when it fails
SYNTHETIC_WARNING = ("!!! SYNTHETIC DATA: no --data was given, so the models were trained on generated images.\n"
                     "!!! Results on it mean nothing about real X-rays. Pass --data DIR for real data.")


def announce_synthetic(out: Path, image_size: int) -> Path:
    from pneumonia_kfp.synthetic import make_synthetic

    data = make_synthetic(out / "synthetic-data", size=max(64, image_size))
    say("!" * 78 + f"\n!!! No --data given: using a SYNTHETIC dataset at {data}.\n"
        "!!! Results on it mean nothing about real X-rays. Pass --data DIR for real data.\n" + "!" * 78 + "\n")
    return data


def check_backbone_count(backbones: list[str], force: bool) -> None:
    if len(backbones) > MAX_BACKBONES and not force:
        raise UsageError(f"--backbones names {len(backbones)} models: run-local trains at most {MAX_BACKBONES} "
                         "(one task each); pass --force to train them all")


def run_local(params: dict, out: Path, storage: str | None, synthetic: bool, runner: str = "subprocess",
              gpus: str | None = None, force: bool = False, ranks: int = 1) -> int:
    """Check everything that can be checked, lock OUT, then run the pipeline in a runner process (``_runner``):
    its tasks as subprocesses here, or (``runner="docker"``) in the project's image. ``ranks``: torchrun
    ranks of each train task (pneumonia_kfp.distributed)."""
    from pneumonia_kfp.distributed import RANKS_ENV

    check_backbone_count(params["backbones"], force)
    if ranks > 1 and gpus:
        raise UsageError("--ranks with --gpus: the docker runner gives each task one GPU, and each rank needs its "
                         "own; use --runner subprocess (ranks on this machine's GPUs) or leave out --gpus")
    if ranks > params["batch_size"]:
        raise UsageError(f"--ranks {ranks} exceeds --batch-size {params['batch_size']}: the global batch is split "
                         "across the ranks, each needs a share")
    # the train tasks (subprocesses inherit it; the docker runner passes PNEUMONIA_KFP_* in) read it
    os.environ[RANKS_ENV] = str(ranks)
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
    from pneumonia_kfp.sources import scan_image_folder

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
        say(f"No GPU: training {len(params['backbones'])} backbone(s) for {params['epochs']} epoch(s) "
            f"at {params['image_size']} px takes {duration(estimate)} on this CPU. For a quick look: "
            "--backbones resnet18 --epochs 2 --image-size 64.\n")

    # tasks run side by side on this machine: split the cores so their thread pools don't fight
    parallel = min(params["max_parallel"], len(params["backbones"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    return supervise(params, out, {"runner": runner, "gpus": gpus, "run_id": f"{os.getpid()}-{time.time_ns()}"},
                     lock=lock)


def supervise(params: dict, out: Path, execution: dict | None = None, lock: int | None = None) -> int:
    """Run ``_runner`` as the leader of a process group and wait for it; a stop signal here ends the group.
    ``lock``: OUT's lock, which the runner holds too, so that OUT stays locked until the runner has ended."""
    state = out / STATE_DIR
    shutil.rmtree(state, ignore_errors=True)  # left by a runner killed together with its group
    state.mkdir()
    (state / "spec.json").write_text(json.dumps({"params": params, "out": str(out), "parent": os.getpid(),
                                                 "execution": execution or {"runner": "subprocess"}}))
    error: list[str] = []

    def started(runner: int) -> None:
        if lock is not None:
            os.pwrite(lock, f"{os.getpid()} runner {runner}\n".encode(), 0)

    def cleanup() -> None:
        if (state / "error.txt").exists():
            error.append((state / "error.txt").read_text())
        publish_log(state, out)
        shutil.rmtree(state, ignore_errors=True)

    code, stopped = run_group([sys.executable, "-m", "pneumonia_kfp.pipelines.local", str(state)],
                              pass_fds=() if lock is None else (lock,), started=started, after=cleanup)
    if stopped:
        sys.stderr.write(f"pneumonia-kfp run-local: stopped by {signal.Signals(stopped).name}; "
                         "its tasks were ended\n")
        return 128 + stopped
    if error:
        raise UsageError(error[0])
    return code


def _runner(state: Path) -> int:
    """The runner process: leader of the group every task joins; it dies with run-local and ends them."""
    spec = json.loads((state / "spec.json").read_text())
    execution = spec["execution"]
    lead_group(spec["parent"], lambda signum: _end_run(signum, state, execution.get("run_id")))
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


def _end_run(signum: int, state: Path, run_id: str | None = None) -> None:
    """End this run's task containers and every task (and what they started) in the runner's group, keep
    the log, remove the state, exit."""
    if run_id:
        from pneumonia_kfp.pipelines.docker import stop_containers

        stop_containers(run_id)  # containers are the engine's children, not in this process group
    end_group()
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
    errors = state / TASK_ERRORS
    errors.mkdir(exist_ok=True)
    # set before the task runner is made: subprocess tasks inherit it, and the docker runner passes it into the
    # task containers, which mount OUT (and so this folder) at the same path
    os.environ[TASK_ERRORS_ENV] = str(errors)
    local.init(runner=task_runner(params, out, execution or {"runner": "subprocess"}), pipeline_root=str(root),
               workspace_root=str(state / "workspace"))
    pipeline = build_pipeline(params.pop("max_parallel"))
    log_path = out / LOG_FILE  # where the log will be when the run has ended
    start = time.perf_counter()
    with open(state / LOG_FILE, "w", buffering=1) as log:  # by lines: a stop's os._exit loses none
        stream = ConsoleFilter(log, sys.stdout)
        try:
            with contextlib.redirect_stdout(stream), root_log_to(stream), warnings.catch_warnings():
                warnings.filterwarnings("ignore", module="kfp")  # "custom base image" notices: known, harmless here
                task = pipeline(**params)
        except RuntimeError as e:  # kfp's "a task failed": the failed task's own record says which and why
            cause = failure_line(errors) or str(e)
            raise UsageError(f"the local pipeline run failed: {cause} (full log: {log_path})") from None
    wall = time.perf_counter() - start

    summary = Path(task.outputs["results"].path)
    results = read_results(json.loads(summary.read_text()), str(summary))
    results["wall_seconds"] = wall
    publish_outputs(task, results, out)
    _print_summary(results, wall, out, log_path)


def _print_summary(results: dict, wall: float, out: Path, log_path: Path) -> None:
    lines = [f"\nPipeline finished in {wall:.0f} s."]
    for m in results["models"]:
        t = m["test"]
        lines.append(f"  {m['backbone']:<20} test accuracy {t['accuracy']:.4f}  F1 {t['f1']:.4f}  "
                     f"specificity {t['specificity']:.4f}  AUC {t['auc']:.4f}")
    if results["best"]:
        lines.append(f"Best by validation: {results['best']['backbone']}")
    if results["dataset"]["synthetic"]:
        lines.append(SYNTHETIC_WARNING)
    lines.append(f"Results: {out / 'results.json'}\nReport:  {out / 'report.md'}\n         {out / 'report.html'}\n"
                 f"Predictions: {out / 'predictions.csv'}\nModels:  {out / 'models'}\nLog:     {log_path}")
    # sys.stdout, not print: kfp's local runner leaves builtins.print patched to indent task logs
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(_runner(Path(sys.argv[1])))
