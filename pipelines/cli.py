"""``pneumonia-kfp``: run the pipeline locally, ingest a dataset, compile the pipeline, submit it to Kubeflow."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from pneumonia_kfp.errors import PneumoniaKfpError
from pneumonia_kfp.params import PARAMS, THRESHOLD_RULES, check_run_params, from_args
from pneumonia_kfp.params import add_arguments as add_params
from pneumonia_kfp.procs import stoppable
from pneumonia_kfp.telemetry import progress_mode

# the parameters each command takes, all defined in pneumonia_kfp.params
# serve_name is for cluster runs: from a local run's output, `pneumonia-kfp deploy --run OUT` serves the best model
# with the cluster's settings (image, the store's endpoint as the cluster reaches it)
RUN_LOCAL_PARAMS = [p.name for p in PARAMS if p.name != "serve_name"]
INGEST_PARAMS = ["data", "storage", "image_size", "seed", "on_invalid"]


@stoppable
def run_local_cmd(args) -> int:
    from pneumonia_kfp.pipelines.local import run_local

    params = from_args(args, RUN_LOCAL_PARAMS)
    return run_local(params, Path(args.output), args.storage, synthetic=not args.data, runner=args.runner,
                     gpus=args.gpus, force=args.force, ranks=args.ranks)


@stoppable
def ingest_cmd(args) -> int:
    from pneumonia_kfp.ingest import ingest

    p = from_args(args, INGEST_PARAMS)
    info = ingest(p["data"], p["storage"], image_size=p["image_size"], seed=p["seed"], on_invalid=p["on_invalid"])
    print(info["uri"])
    return 0


def gc_cmd(args) -> int:
    from pneumonia_kfp.maintenance import gc, parse_duration

    report = gc(args.storage, parse_duration(args.older_than), dry_run=args.dry_run)
    for key in report.removed:
        print(("would remove " if args.dry_run else "removed ") + key)
    for line in report.skipped:
        print(f"pneumonia-kfp gc: {line}", file=sys.stderr)
    print(f"pneumonia-kfp gc: {'would remove' if args.dry_run else 'removed'} {len(report.removed)}, kept "
          f"{report.kept_young} unreferenced younger than {args.older_than}", file=sys.stderr)
    return 0


def verify_cmd(args) -> int:
    from pneumonia_kfp.maintenance import verify

    report = verify(args.storage, args.version)
    for line in report.problems:
        print(line)
    for line in report.notes:
        print(f"pneumonia-kfp verify: note: {line}", file=sys.stderr)
    print(f"pneumonia-kfp verify: {report.versions} version(s), {report.objects} object(s) checked: "
          f"{len(report.problems) or 'no'} problem(s)", file=sys.stderr)
    return 1 if report.problems else 0


@stoppable
def evaluate_cmd(args) -> int:
    from pneumonia_kfp.pipelines.evaluate_folder import evaluate_folder

    results = evaluate_folder(args.model, args.data, Path(args.output))
    t = results["models"][0]["test"]
    figures = (("accuracy", "accuracy"), ("F1", "f1"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
               ("AUC", "auc"))
    shown = [f"{name} {t[key]:.4f}" for name, key in figures if t[key] is not None]  # only the defined ones
    print("  ".join(shown) + f"  (n = {t['n']})")
    print(Path(args.output) / "results.json")
    return 0


@stoppable
def predict_cmd(args) -> int:
    from pneumonia_kfp.predict import check_output, predict_paths, table, write

    check_output(args.output)  # before any model loads
    result = predict_paths(args.model, args.paths, engine=args.engine, rule=args.threshold_rule)
    for f in result.failed:
        print(f"pneumonia-kfp predict: {f['file']}: {f['reason']}", file=sys.stderr)
    if result.rows:
        print(table(result))
    if args.output:
        write(result, args.output)
    m = result.model
    print(f"pneumonia-kfp predict: {len(result.rows)} predicted, {len(result.failed)} failed; {m.model_id} "
          f"({m.engine}), threshold {result.threshold:.4g} ({result.rule})"
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 1 if result.failed else 0


def serve_cmd(args) -> int:
    from pneumonia_kfp.serve import serve

    serve(args.model, port=args.port, name=args.name, engine=args.engine, rule=args.threshold_rule,
          max_request_mb=args.max_request_mb)
    return 0


@stoppable
def deploy_cmd(args) -> int:
    from pneumonia_kfp.deploy import command
    from pneumonia_kfp.pipelines.settings import from_args as settings_from_args

    print(command(args.name, settings_from_args(args), model=args.model, run=args.run, namespace=args.namespace,
                  storage=args.storage, registry=args.model_registry, dry_run=args.dry_run, timeout=args.timeout),
          end="")
    return 0


def compile_pipeline(args, output: str):
    """The cluster pipeline, with the platform settings from file, environment and flags, to ``output``;
    the settings."""
    from pneumonia_kfp.pipelines import pipeline
    from pneumonia_kfp.pipelines.settings import from_args as settings_from_args

    settings = settings_from_args(args)
    pipeline.compile_pipeline(from_args(args, ["max_parallel"])["max_parallel"], settings, output)
    return settings


def compile_cmd(args) -> int:
    compile_pipeline(args, args.output)
    print(args.output)
    return 0


def submit_cmd(args) -> int:
    from pneumonia_kfp.pipelines.pipeline import PIPELINE_NAME
    from pneumonia_kfp.pipelines.submit import parse_params, pipeline_inputs, submit

    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / "pipeline.yaml")
        settings = compile_pipeline(args, package)
        inputs = pipeline_inputs(package)
        storage = settings.storage.format(namespace=args.namespace or "kubeflow")  # standalone KFP: kubeflow
        params = parse_params(args.param, inputs, storage=storage)
        # the values the run will see, defaults included, pass the same checks as run-local
        check_run_params({**{n: d["defaultValue"] for n, d in inputs.items() if "defaultValue" in d}, **params})
        run_id, state = submit(package, args.host, params, namespace=args.namespace, experiment=args.experiment,
                               run_name=args.run_name or f"{PIPELINE_NAME} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                               token=args.token, wait=args.wait, timeout=args.timeout, poll_seconds=args.poll_seconds)
    print(run_id)
    if state not in (None, "SUCCEEDED"):
        print(f"pneumonia-kfp submit: run {run_id} finished {state}; its logs are in the pipeline UI", file=sys.stderr)
        return 1
    return 0


def gpus_arg(value: str) -> str:
    if value == "all" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected all or a number of GPUs (1 or more)")


def ranks_arg(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: expected a number of torchrun ranks (1 or more)")


def _model_options(command) -> None:
    """What predict and serve both take: which exported form runs, and which validation-chosen threshold."""
    command.add_argument("--engine", choices=("onnx", "pt2", "checkpoint"), default="onnx",
                         help="model.onnx with onnxruntime (default; model.pt2 when there is none), model.pt2 "
                         "(torch.export) or checkpoint.pt")
    command.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default=None,
                         help="the threshold chosen on validation by this rule (default: the model's own rule)")


def _run_local_command(sub) -> None:
    r = sub.add_parser("run-local", help="run the whole pipeline on this machine (kfp local runner)")
    r.add_argument("--output", required=True, help="where results.json, report.md, report.html and the log go")
    add_params(r, RUN_LOCAL_PARAMS, helps={
        "data": "ImageFolder directory (train|val|test/<class>/*); omitted: a SYNTHETIC demo dataset",
        "storage": "store URI (default: file://OUTPUT/store)"})
    r.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="run each task as a subprocess here (default) or in the project's image, as on a cluster "
                   "(build it with `make image`)")
    r.add_argument("--gpus", type=gpus_arg, metavar="all|N",
                   help="with --runner docker: NVIDIA GPUs for the train and evaluate tasks (NVIDIA's container "
                   "runtime); with several, each running task gets its own")
    r.add_argument("--ranks", type=ranks_arg, default=1, metavar="N",
                   help="run each train task as N torchrun ranks (DDP: gloo on the CPU, NCCL with a GPU each); the "
                   "global batch is --batch-size split across them (default: 1)")
    r.add_argument("--force", action="store_true",
                   help="write into an --output that holds files run-local did not make (its own outputs there are "
                   "replaced), and train more than 32 backbones")
    r.set_defaults(func=run_local_cmd)


def _ingest_command(sub) -> None:
    i = sub.add_parser("ingest", help="ingest an ImageFolder into the store; prints the dataset URI")
    add_params(i, INGEST_PARAMS, required=("data", "storage"))
    i.set_defaults(func=ingest_cmd)


def _gc_command(sub) -> None:
    g = sub.add_parser("gc", help="remove what no published dataset version references (safe while ingests run)")
    g.add_argument("--storage", required=True, help="store URI: file:///abs/path or s3://bucket/prefix")
    g.add_argument("--older-than", default="1d", metavar="DURATION",
                   help="grace period: only objects and unfinished uploads older than this go, e.g. 12h, 7d, 90s; "
                   "make it longer than any ingest runs (default: 1d)")
    g.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    g.set_defaults(func=gc_cmd)


def _verify_command(sub) -> None:
    v = sub.add_parser("verify", help="check every object of the store's dataset versions against their manifests")
    v.add_argument("--storage", required=True, help="store URI: file:///abs/path or s3://bucket/prefix")
    v.add_argument("--version", metavar="SHA", help="check only this version (datasets/SHA); default: all")
    v.set_defaults(func=verify_cmd)


def _evaluate_command(sub) -> None:
    e = sub.add_parser("evaluate", help="score a trained model on another ImageFolder (its test/ or class folders)")
    e.add_argument("--model", required=True, help="a model directory: OUT/models/<backbone> of run-local")
    e.add_argument("--data", required=True, help="ImageFolder: DIR/test/<class>/* or DIR/<class>/* (a directory "
                   "or s3:// prefix)")
    e.add_argument("--output", required=True, help="where results.json, report.md, report.html, predictions.csv go")
    e.set_defaults(func=evaluate_cmd)


def _predict_command(sub) -> None:
    d = sub.add_parser("predict", help="P(pneumonia) and label of images at the model's validation-chosen threshold")
    d.add_argument("--model", required=True, help="a model directory: OUT/models/<backbone> of run-local")
    d.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (every file under them) and "
                   "s3:// URIs (an object or a prefix)")
    _model_options(d)
    d.add_argument("--output", metavar="FILE", help="also write the predictions to FILE.csv or FILE.json")
    d.set_defaults(func=predict_cmd)


def _deploy_command(sub) -> None:
    from pneumonia_kfp.pipelines.settings import add_arguments as add_settings_arguments

    y = sub.add_parser("deploy", help="serve the best model (by validation) as a KServe InferenceService; "
                       "--dry-run prints the objects")
    source = y.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model directory: OUT/models/<backbone> of run-local")
    source.add_argument("--run", help="a run-local output folder, or a run's results.json: its best model by "
                        "validation")
    y.add_argument("--name", required=True, help="the InferenceService's name (its ServiceAccount's too)")
    y.add_argument("--namespace", help="default: the kube config context's namespace")
    y.add_argument("--storage", help="s3:// store the model is copied to for KServe (default: the setting "
                   "`storage`: s3://mlpipeline/private/NAMESPACE/pneumonia-kfp)")
    y.add_argument("--model-registry", default=os.environ.get("PNEUMONIA_KFP_MODEL_REGISTRY", ""), metavar="URL",
                   help="register the model in this Kubeflow Model Registry (http(s)://host:port; default: "
                   "$PNEUMONIA_KFP_MODEL_REGISTRY, unset: no registration)")
    y.add_argument("--timeout", type=float, default=900, help="seconds to wait for Ready (default: 900)")
    y.add_argument("--dry-run", action="store_true", help="print the Secret, ServiceAccount and InferenceService as "
                   "YAML (the Secret's values redacted); apply nothing")
    add_settings_arguments(y)
    y.set_defaults(func=deploy_cmd)


def _serve_command(sub) -> None:
    v = sub.add_parser("serve", help="answer HTTP requests with the model: KServe's model server (Open Inference "
                       "Protocol v2, KServe v1, Prometheus /metrics)")
    v.add_argument("--model", required=True, help="a model directory: OUT/models/<backbone> of run-local")
    v.add_argument("--port", type=int, default=8080, help="the HTTP port, on every interface (default: 8080)")
    v.add_argument("--name", default="pneumonia", help="the model's name in the URLs: /v2/models/NAME/infer, "
                   "/v1/models/NAME:predict (default: pneumonia)")
    _model_options(v)
    v.add_argument("--max-request-mb", type=float, default=64, metavar="MIB",
                   help="a request body over this many MiB gets 413 (default: 64)")
    v.set_defaults(func=serve_cmd)


def _compile_command(sub) -> None:
    from pneumonia_kfp.pipelines.settings import add_arguments as add_settings_arguments

    c = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML (with its Kubernetes platform spec)")
    c.add_argument("-o", "--output", default="pipeline.yaml", help="the YAML file to write (default: pipeline.yaml)")
    add_params(c, ["max_parallel"])
    add_settings_arguments(c)
    c.set_defaults(func=compile_cmd)


def _submit_command(sub) -> None:
    from pneumonia_kfp.pipelines.pipeline import PIPELINE_NAME
    from pneumonia_kfp.pipelines.settings import add_arguments as add_settings_arguments

    s = sub.add_parser("submit", help="compile and run the pipeline on a Kubeflow Pipelines cluster")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080 (port-forward)")
    s.add_argument("--namespace", help="profile namespace (multi-user Kubeflow)")
    s.add_argument("--experiment", default=PIPELINE_NAME,
                   help=f"experiment name, created if new (default: {PIPELINE_NAME})")
    s.add_argument("--run-name", help="default: pneumonia-kfp and the time")
    s.add_argument("--token", default=os.environ.get("KFP_TOKEN"),
                   help="bearer token (default: $KFP_TOKEN; in a pod: its projected ServiceAccount token)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. data=s3://bucket/chest_xray or backbones=resnet18,resnet50 "
                   "(storage defaults to the setting `storage`: s3://mlpipeline/private/NAMESPACE/pneumonia-kfp)")
    s.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded")
    s.add_argument("--timeout", type=float, default=86400, help="seconds --wait waits (default: 86400, a day)")
    s.add_argument("--poll-seconds", type=float, default=15, help=argparse.SUPPRESS)
    add_params(s, ["max_parallel"])
    add_settings_arguments(s)
    s.set_defaults(func=submit_cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pneumonia-kfp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add_command in (_run_local_command, _ingest_command, _gc_command, _verify_command, _evaluate_command,
                        _predict_command, _deploy_command, _serve_command, _compile_command, _submit_command):
        add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        progress_mode()  # a bad PNEUMONIA_KFP_PROGRESS fails here, not inside a task
        return args.func(args)
    except PneumoniaKfpError as e:
        print(f"pneumonia-kfp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return unexpected(args.command, e)
        where = f" writing {e.filename}" if e.filename else ""  # a full disk the writer did not name itself
        print(f"pneumonia-kfp {args.command}: error: no space left on the device{where}: free some space there, "
              "or set TMPDIR (temporary files) or choose an output folder elsewhere", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or an unforeseen failure: one line here, the traceback in a log file
        return unexpected(args.command, e)


def unexpected(command: str, e: Exception) -> int:
    """One line for an exception nobody foresaw, naming the log file its traceback went to; exit 1."""
    where = write_traceback(command)
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"pneumonia-kfp {command}: error: unexpected {type(e).__name__}{': ' + first if first else ''} "
          f"({where})", file=sys.stderr)
    return 1


def write_traceback(command: str) -> str:
    """The current exception's traceback into $TMPDIR/pneumonia-kfp-<command>-<time>-<pid>.log; where it
    is, for the error line (or why it could not be written: a full disk, say)."""
    import traceback

    path = Path(tempfile.gettempdir()) / f"pneumonia-kfp-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        with open(path, "w") as f:
            f.write(f"pneumonia-kfp {command} (argv: {sys.argv!r})\n{traceback.format_exc()}")
    except OSError as err:
        return f"the traceback could not be written to {path}: {err.strerror or err}"
    return f"traceback in {path}"


if __name__ == "__main__":
    sys.exit(main())
