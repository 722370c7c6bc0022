"""``pneumonia-kfp``: run the pipeline locally, ingest a dataset, compile the pipeline, submit it to Kubeflow."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipelines.params import UsageError, check_positive, check_run_params


def run_local(args) -> int:
    from kfp import local

    from components.data import scan_image_folder
    from components.synthetic import make_synthetic
    from pipelines.pipeline import build_pipeline

    out = Path(args.output).resolve()
    params = {"backbones": args.backbones.split(","), "epochs": args.epochs, "batch_size": args.batch_size,
              "image_size": args.image_size, "learning_rate": args.learning_rate, "on_invalid": args.on_invalid}
    check_run_params(params)
    check_positive(max_parallel=args.max_parallel)
    out.mkdir(parents=True, exist_ok=True)
    synthetic = not args.data
    if synthetic:
        data = make_synthetic(out / "synthetic-data", size=max(64, args.image_size))
        print("!" * 78 + f"\n!!! No --data given: using a small SYNTHETIC dataset at {data}.\n"
              "!!! Results on it mean nothing about real X-rays. Pass --data DIR for real data.\n" + "!" * 78,
              flush=True)
    else:
        data = Path(args.data).expanduser().resolve()
        scan_image_folder(data)  # fail fast, with a clear message, before any task starts
    storage = args.storage or (out / "store").as_uri()

    # tasks run side by side on this machine: split the cores so their thread pools don't fight
    parallel = min(args.max_parallel, len(params["backbones"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp-root"))
    pipeline = build_pipeline(args.max_parallel)
    start = time.perf_counter()
    try:
        task = pipeline(
            data=str(data), storage=storage, seed=args.seed, pretrained=args.pretrained,
            pretrained_weights=args.pretrained_weights, compile_model=args.compile_model, **params,
        )
    except RuntimeError as e:
        raise UsageError(f"the local pipeline run failed ({e}); the failing task's log is printed above") from None
    wall = time.perf_counter() - start

    results = json.loads(Path(task.outputs["results"].path).read_text())
    results["wall_seconds"] = wall
    (out / "results.json").write_text(json.dumps(results, indent=1))
    shutil.copyfile(task.outputs["report_md"].path, out / "report.md")
    shutil.copyfile(task.outputs["report_html"].path, out / "report.html")
    lines = [f"\nPipeline finished in {wall:.0f} s."]
    for m in results["models"]:
        t = m["test"]
        lines.append(f"  {m['backbone']:<20} test accuracy {t['accuracy']:.4f}  F1 {t['f1']:.4f}  "
                     f"specificity {t['specificity']:.4f}  AUC {t['auc']:.4f}")
    lines.append(f"Results: {out / 'results.json'}\nReport:  {out / 'report.md'}\n         {out / 'report.html'}")
    # sys.stdout, not print: kfp's local runner leaves builtins.print patched to indent task logs
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def ingest_cmd(args) -> int:
    from components.ingest import ingest

    info = ingest(args.data, args.storage, image_size=args.image_size, seed=args.seed, on_invalid=args.on_invalid)
    print(info["uri"])
    return 0


def compile_pipeline(args, output: str) -> None:
    """The cluster pipeline, with the platform settings from file, environment and flags, to ``output``."""
    from kfp import compiler

    from pipelines.pipeline import build_pipeline
    from pipelines.settings import from_args

    check_positive(max_parallel=args.max_parallel)
    compiler.Compiler().compile(build_pipeline(args.max_parallel, from_args(args)), output)


def compile_cmd(args) -> int:
    compile_pipeline(args, args.output)
    print(args.output)
    return 0


def submit_cmd(args) -> int:
    from pipelines.pipeline import PIPELINE_NAME
    from pipelines.submit import parse_params, pipeline_inputs, submit

    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / "pipeline.yaml")
        compile_pipeline(args, package)
        inputs = pipeline_inputs(package)
        params = parse_params(args.param, inputs)
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


def parser() -> argparse.ArgumentParser:
    from pipelines.pipeline import DEFAULT_BACKBONES, DEFAULT_MAX_PARALLEL, PIPELINE_NAME
    from pipelines.settings import add_arguments as add_settings_arguments

    p = argparse.ArgumentParser(prog="pneumonia-kfp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run-local", help="run the whole pipeline on this machine (kfp local runner)")
    r.add_argument("--data", help="ImageFolder directory (train|val|test/<class>/*); omitted: synthetic data")
    r.add_argument("--output", required=True, help="where results.json, report.md, report.html go")
    r.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES), help="comma-separated timm model names")
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--image-size", type=int, default=224)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--learning-rate", type=float, default=1e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL)
    r.add_argument("--pretrained", action="store_true", help="start from ImageNet weights")
    r.add_argument("--pretrained-weights", default="", help="weights file or store URI (air-gapped)")
    r.add_argument("--storage", help="store URI (default: file://OUTPUT/store)")
    r.add_argument("--on-invalid", choices=("fail", "skip"), default="fail",
                   help="a file that does not decode: stop (default) or leave it out")
    r.add_argument("--compile-model", action="store_true", help="torch.compile the model for training")
    r.set_defaults(func=run_local)

    i = sub.add_parser("ingest", help="ingest an ImageFolder into the store; prints the dataset URI")
    i.add_argument("--data", required=True)
    i.add_argument("--storage", required=True, help="file:///abs/path or s3://bucket/prefix")
    i.add_argument("--image-size", type=int, default=224)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--on-invalid", choices=("fail", "skip"), default="fail")
    i.set_defaults(func=ingest_cmd)

    c = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML (with its Kubernetes platform spec)")
    c.add_argument("-o", "--output", default="pipeline.yaml")
    c.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL)
    add_settings_arguments(c)
    c.set_defaults(func=compile_cmd)

    s = sub.add_parser("submit", help="compile and run the pipeline on a Kubeflow Pipelines cluster")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080 (port-forward)")
    s.add_argument("--namespace", help="profile namespace (multi-user Kubeflow)")
    s.add_argument("--experiment", default=PIPELINE_NAME, help="experiment name, created if new")
    s.add_argument("--run-name", help="default: pneumonia-kfp and the time")
    s.add_argument("--token", default=os.environ.get("KFP_TOKEN"),
                   help="bearer token (default: $KFP_TOKEN; in a pod: its projected ServiceAccount token)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. data=s3://bucket/chest_xray or backbones=resnet18,resnet50")
    s.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeded")
    s.add_argument("--timeout", type=float, default=86400, help="seconds --wait waits (default: a day)")
    s.add_argument("--poll-seconds", type=float, default=15, help=argparse.SUPPRESS)
    s.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL)
    add_settings_arguments(s)
    s.set_defaults(func=submit_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    from components.backbones import BackboneError
    from components.data import DataError
    from components.storage import StorageError
    from pipelines.settings import SettingsError
    from pipelines.submit import SubmitError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, DataError, StorageError, BackboneError, SettingsError, SubmitError) as e:
        print(f"pneumonia-kfp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
