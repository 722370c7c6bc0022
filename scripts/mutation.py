"""Mutation testing of the modules that make the pipeline's decisions (mutmut), one module at a time.

    python scripts/mutation.py [--only metrics,training] [--jobs 2] [--summary docs/mutation-summary.md]

Each module is mutated in its own workspace under build/mutation/<module>/ (a flat copy of the
project: pipelines/ and components/ placed under pneumonia_kfp/ as installed), and only the tests
mapped to it below run -- mutmut then runs, for each mutant, just those of them that call the
mutated function. Results: build/mutation/results.json and the Markdown summary (per module:
mutants, killed, survived, every survivor listed; survivors named in docs/mutation-equivalent.toml
count as equivalent, with the reason given there).

Only the decision functions listed below are mutated. Lines that are GPU-only, logging or
telemetry are left alone (``skip``): no CPU test can tell them apart, and they decide nothing.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = ""  # --workspace-suffix: a second workspace per module (e.g. an "after" run beside a "before")
WORK = ROOT / "build" / "mutation"
EQUIVALENT = ROOT / "docs" / "mutation-equivalent.toml"
SUMMARY = ROOT / "docs" / "mutation-summary.md"
MUTMUT = Path(sys.executable).parent / "mutmut"
# lines that decide nothing a CPU test can observe
NOT_DECISIONS = [r"\blog\.(debug|info|warning|error)\(", r"\bcuda\b", r"telemetry", r"print\("]


@dataclass
class Module:
    source: str  # path in the installed layout (pipelines/ -> pneumonia_kfp/pipelines/)
    functions: list[str]  # mangled names as mutmut writes them: x_<function>, xǁ<Class>ǁ<method>
    tests: list[str]  # pytest node ids or files, relative to the repository
    skip: list[str] = field(default_factory=list)  # extra regexes of lines not to mutate


MODULES = {
    "metrics": Module(
        "pneumonia_kfp/metrics.py", ["x_*"],
        ["tests/test_metrics.py", "tests/test_decisions.py"]),
    # train() and select(): only the lines that decide (best epoch, threshold, validation split, resume identity);
    # the rest is the optimisation loop, which every training test runs anyway
    "training": Module(
        "pneumonia_kfp/training.py", ["x_train_val_split", "x_load", "x_fit", "x_fit_epoch", "x_train", "x_improves",
                                       "x_select"],
        ["tests/test_train_evaluate_report.py::test_small_val_is_a_patient_grouped_carve_out",
         "tests/test_splits.py", "tests/test_training_decisions.py"],
        skip=[r"^(?!.*(\bbest\b|threshold|val_auc|val_loss|\bheld\b|MIN_VAL|VAL_FRACTION|concatenate|identity\(|"
              r"\"(backbone|epochs|batch_size|learning_rate|seed|pretrained|weights|recipe)\": )).*$"]),
    "combine": Module(
        "pneumonia_kfp/evaluation.py", ["x_best_model", "x_combine", "x_*ensemble*"],
        ["tests/test_decisions.py"]),
    "report": Module(
        "pneumonia_kfp/report.py", ["x_write_outputs"],
        ["tests/test_outputs.py"]),
    # what evaluate reads (folders through ingest's scan and reader, model files) and what it answers
    "evaluation": Module(
        "pneumonia_kfp/evaluation.py", ["x_load_model", "x_warn_one_class"],
        ["tests/test_evaluate_inputs.py"]),
    "image_reader": Module(
        "pneumonia_kfp/image_reader.py", ["x_read_labelled_folder", "x_read_named", "x_read_files"],
        ["tests/test_evaluate_inputs.py", "tests/test_predict.py"]),
    # what predict reads (files, folders, s3:// objects), which engine and threshold it uses, what it writes
    "predict": Module(
        "pneumonia_kfp/predict.py", ["x_*"],
        ["tests/test_predict.py"]),
    "backbones": Module(
        "pneumonia_kfp/backbones.py", ["x_read_checkpoint", "x_load_checkpoint", "x__unreadable",
                                       "x__state_dict_problem", "xǁPretrainedWeightsǁ*", "x__local_weights"],
        ["tests/test_evaluate_inputs.py::test_every_model_file_error_is_one_line_naming_the_file",
         "tests/test_backbones.py::test_checkpoint_roundtrip", "tests/test_pretrained_weights.py"]),
    # the Triton model repository: names, types and shapes from the ONNX graph, the batch axis, the link
    "export": Module(
        "pneumonia_kfp/export.py", ["x_triton_name", "x_onnx_tensors", "x_triton_config", "x_write_triton_repository"],
        ["tests/test_export_triton.py"]),
    "outputs": Module(
        "pneumonia_kfp/outputs.py", ["x_*"],
        ["tests/test_outputs.py"]),
    "data": Module(
        "pneumonia_kfp/data.py", ["x_patient_id", "x_grouped_holdout", "x_groups_of"],
        ["tests/test_data.py", "tests/test_splits.py"]),
    # what a folder holds, seen without opening a file: what every reader (ingest, evaluate, predict) refuses
    "sources": Module(
        "pneumonia_kfp/sources.py", ["x_scan_class_folders", "x_check_layout", "x_check_every_class",
                                     "x__is_class_folder", "x__inside", "x__check_inside", "x__stat",
                                     "x__local_files"],
        ["tests/test_data.py", "tests/test_splits.py", "tests/test_validation.py",
         "tests/test_evaluate_inputs.py::test_folders_ingest_refuses_evaluate_refuses",
         "tests/test_evaluate_inputs.py::test_hostile_files_are_refused_by_both_commands",
         "tests/test_predict.py::test_what_ingest_refuses_predict_refuses_without_opening_it"]),
    "ingest": Module(
        "pneumonia_kfp/ingest.py", ["x_assign_splits", "x_publish"],
        ["tests/test_ingest.py::test_missing_test_split_is_carved_from_train_by_patient", "tests/test_splits.py",
         "tests/test_concurrent_store.py::test_writers_in_threads_publishing_at_once_agree_on_one_manifest"]),
    "source_index": Module(
        "pneumonia_kfp/source_index.py", ["xǁIndexǁknown", "xǁIndexǁrecord"],
        ["tests/test_ingest_index.py"]),
    "validation": Module(
        "pneumonia_kfp/validation.py", ["x_check_classes", "x_load_image", "x_check_leakage", "x_patients_in_both"],
        ["tests/test_validation.py", "tests/test_ingest.py::test_grayscale_conversion_of_other_modes",
         "tests/test_images.py"]),
    "storage": Module(
        "pneumonia_kfp/storage.py",
        ["xǁS3Storeǁ_call", "xǁS3Storeǁexists", "xǁS3Storeǁ_ensure_bucket", "x_minio_client_from_env",
         "xǁS3Storeǁput_new", "xǁS3Storeǁunfinished", "xǁFileStoreǁ_atomic_write", "xǁFileStoreǁ_full",
         "xǁFileStoreǁunfinished", "xǁFileStoreǁdiscard", "xǁStoreǁsha256"],
        ["tests/test_storage.py", "tests/test_storage_faults.py::test_transient_503s_are_retried",
         "tests/test_storage_config.py"]),
    "maintenance": Module(
        "pneumonia_kfp/maintenance.py", ["x_*"],
        ["tests/test_maintenance.py"]),
    "resume": Module(
        "pneumonia_kfp/resume.py", ["x_*"],
        # the module's own tests, none of which trains: train()'s use of the identity is the training module's
        ["tests/test_storage_config.py::test_missing_object_or_bucket_is_missing",
         "tests/test_storage_config.py::test_resume_does_not_mistake_access_denied_for_no_state",
         "tests/test_resume_and_evaluate_checks.py",
         "tests/test_train_evaluate_report.py::test_resume_key_follows_the_code"]),
    "device": Module(
        "pneumonia_kfp/device.py", ["x_*"],
        ["tests/test_device.py"]),
    # the augmentation recipe and its two CPU implementations (OpenCV image by image, batched torch)
    "augmentation": Module(
        "pneumonia_kfp/augmentation.py", ["x__pixel_map", "x__geometry", "x__warp_opencv", "x_warp", "x__mix",
                                          "x__photometric_torch", "x__equalized", "x__apply_batched",
                                          "x__apply_opencv", "x_apply", "x_augment"],
        ["tests/test_augmentation.py"]),
    "settings": Module(
        "pneumonia_kfp/pipelines/settings.py", ["x_load", "x__set", "x__convert", "x__flatten", "x_from_args"],
        ["tests/test_kubeflow_compile.py::test_settings_file_env_and_flags_layer_in_that_order",
         "tests/test_settings_sources.py"]),
    "submit": Module(
        "pneumonia_kfp/pipelines/submit.py", ["x_wait_for", "x_check_host", "x__auth_failed", "x__api_error"],
        ["tests/test_kubeflow_submit.py", "tests/test_submit_states.py"]),
    # which scratch folders go (owner gone, PID reused, another namespace's kept); the stop-signal exception
    "scratch": Module(
        "pneumonia_kfp/scratch.py", ["x_owner_gone", "x_sweep", "x_scratch_dir", "x__make_root"],
        ["tests/test_scratch.py::test_scratch_dir_is_under_the_project_folder_with_its_owner_and_goes_on_exit",
         "tests/test_scratch.py::test_sweep_removes_only_folders_whose_owner_is_gone",
         "tests/test_scratch.py::test_sweep_of_no_root_and_a_root_that_is_not_ours"]),
    "procs": Module(
        "pneumonia_kfp/procs.py", ["x_start_time", "x_alive", "x__stat", "x_stop_signals_raise", "x_stoppable"],
        ["tests/test_procs.py", "tests/test_scratch.py::test_start_time_names_one_process",
         "tests/test_scratch.py::test_a_zombie_has_no_start_time_and_a_name_with_parentheses_is_read_right",
         "tests/test_scratch.py::test_a_stop_signal_runs_the_cleanup_and_exits_128_plus_the_signal",
         "tests/test_scratch.py::test_a_second_signal_does_not_cut_the_cleanup_short"]),
    # run-local's OUT (whose, its lock, outputs replaced whole) and the bounded CPU estimate; the real runs of
    # tests/test_run_local.py take minutes each and are left out
    "local": Module(
        "pneumonia_kfp/pipelines/local.py", ["x_check_backbone_count"],
        ["tests/test_run_local_out.py"]),
    "out_folder": Module(
        "pneumonia_kfp/pipelines/out_folder.py",
        ["x_check_owner", "x_lock_output", "x__lock_holder", "x_claim_output", "x_publish_outputs", "x_publish_log"],
        ["tests/test_run_local_out.py"]),
    "cpu_estimate": Module(
        "pneumonia_kfp/pipelines/cpu_estimate.py", ["x_cpu_estimate"],
        ["tests/test_run_local.py::test_the_cpu_estimate_stops_measuring_after_its_budget_and_says_so"]),
}


def _copy(src: Path, dst: Path) -> None:
    """Copy a tree keeping modification times: mutmut regenerates only the files that changed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)


def _tests_at(rev: str, dst: Path) -> None:
    """tests/ as committed at ``rev`` (a "before" run: the suite as it was)."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "tests"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst.parent)], input=archive, check=True)


def workspace(name: str, m: Module, fresh: bool, tests_from: str | None) -> tuple[Path, list[str]]:
    """The module's flat copy of the project, with its mutmut and pytest configuration."""
    ws = WORK / (name + SUFFIX)
    if fresh:
        shutil.rmtree(ws, ignore_errors=True)
    shutil.rmtree(ws / "tests", ignore_errors=True)
    _copy(ROOT / "pneumonia_kfp", ws / "pneumonia_kfp")
    for sub in ("pipelines", "components"):  # where the installed package has them
        _copy(ROOT / sub, ws / "pneumonia_kfp" / sub)
    if tests_from:
        _tests_at(tests_from, ws / "tests")
    else:
        _copy(ROOT / "tests", ws / "tests")
    for t in m.tests:  # a mapped test file not written yet: an empty stand-in keeps the selection (and cache) valid
        (ws / t.split("::")[0]).touch()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pytest_section = re.search(r"^\[tool\.pytest\.ini_options\]\n(?:(?!^\[).*\n?)*", pyproject, re.M).group(0)
    mutmut = {
        "source_paths": ["pneumonia_kfp"], "only_mutate": [m.source],
        "do_not_mutate_patterns": NOT_DECISIONS + m.skip,
        "pytest_add_cli_args_test_selection": m.tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        # torch's thread pools are not fork-safe once used: fork each mutant from a clean server
        "process_isolation": "forkserver", "timeout_multiplier": 10.0, "timeout_constant": 20.0,
        "use_git_change_detection": False,
    }
    (ws / "pyproject.toml").write_text(pytest_section + "\n[tool.mutmut]\n" + "".join(
        f"{k} = {json.dumps(v, ensure_ascii=False)}\n" for k, v in mutmut.items()))
    return ws, [t for t in m.tests if (ws / t.split("::")[0]).stat().st_size]


def _selected(codes: dict, module: str, m: Module) -> dict:
    patterns = [f"{module}.{f}__mutmut_*" for f in m.functions]
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def run_module(name: str, m: Module, jobs: int, fresh: bool, tests_from: str | None, retest: bool,
               match: str = "*") -> dict:
    ws, tests = workspace(name, m, fresh, tests_from)
    module = m.source[:-3].replace("/", ".")
    meta = ws / "mutants" / (m.source + ".meta")
    names = [f"{module}.{f}__mutmut_*" for f in m.functions]
    if not fresh and meta.is_file():  # incremental: a killed mutant stays killed (mutmut re-tests changed functions)
        cached = _selected(json.loads(meta.read_text())["exit_code_by_key"], module, m)
        again = ("not checked",) + (("survived", "no tests") if retest else ())
        names = [k for k, v in cached.items() if status_of(v) in again and fnmatch.fnmatchcase(k, match)]
        if not names and cached:  # still run one: mutmut re-mutates changed functions, the second pass tests them
            names = [next(iter(cached))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    proc = subprocess.CompletedProcess([], 0)
    for _ in range(2):  # twice at most: the names were read before mutmut re-mutated the changed functions
        if not names:
            break
        with open(ws / "mutmut.log", "w") as log:
            proc = subprocess.run([str(MUTMUT), "run", "--max-children", str(jobs), *names],
                                  cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or fresh or not meta.is_file():
            break
        # a changed function's mutants were renumbered and reset: run those not run yet
        codes = _selected(json.loads(meta.read_text())["exit_code_by_key"], module, m)
        names = [k for k, v in codes.items() if v is None and fnmatch.fnmatchcase(k, match)]
    log_text = (ws / "mutmut.log").read_text() if (ws / "mutmut.log").is_file() else ""
    # no mapped test exists yet (pytest: no tests ran), or none calls the mutated functions
    uncovered = "could not find any test case for any mutant" in log_text or "runner returned 5" in log_text
    if (proc.returncode != 0 and not uncovered) or not meta.is_file():
        tail = log_text[-3000:]
        raise SystemExit(f"mutation: mutmut failed on {name} (exit {proc.returncode}), {ws / 'mutmut.log'}:\n{tail}")
    selected = _selected(json.loads(meta.read_text())["exit_code_by_key"], module, m)
    mutants = []
    for key, code in sorted(selected.items(), key=lambda kv: _natural(kv[0])):
        status = "no tests" if uncovered and code is None else status_of(code)
        entry = {"name": key, "status": status}
        if status != "killed":
            entry["diff"] = diff(ws, key)
        mutants.append(entry)
    return {"module": name, "source": m.source, "functions": m.functions, "tests": tests,
            "seconds": round(time.monotonic() - start), "mutants": mutants}


def collect_module(name: str, m: Module) -> dict:
    """The module's last results as they stand in its workspace, without running anything."""
    ws = WORK / (name + SUFFIX)
    module = m.source[:-3].replace("/", ".")
    meta = ws / "mutants" / (m.source + ".meta")
    if not meta.is_file():
        raise SystemExit(f"mutation: no results for {name} in {ws}: run it first")
    mutants = []
    for key, code in sorted(_selected(json.loads(meta.read_text())["exit_code_by_key"], module, m).items(),
                            key=lambda kv: _natural(kv[0])):
        entry = {"name": key, "status": status_of(code)}
        if entry["status"] != "killed":
            entry["diff"] = diff(ws, key)
        mutants.append(entry)
    tests = [t for t in m.tests if (ws / t.split("::")[0]).is_file() and (ws / t.split("::")[0]).stat().st_size]
    return {"module": name, "source": m.source, "functions": m.functions, "tests": tests, "seconds": 0,
            "mutants": mutants}


def status_of(code) -> str:
    """mutmut's exit codes: 1/3 a test failed (killed), 0 all passed (survived), 33/5 no test calls it."""
    if code in (1, 3):
        return "killed"
    if code in (36, 24, -24, 152, 255):
        return "timeout"
    return {0: "survived", 33: "no tests", 5: "no tests", None: "not checked"}.get(code, f"suspicious ({code})")


def diff(ws: Path, key: str) -> str:
    out = subprocess.run([str(MUTMUT), "show", key], cwd=ws, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines()[1:] if line.startswith(("-", "+"))
                     and not line.startswith(("---", "+++")))


def _natural(key: str):
    base, _, n = key.rpartition("__mutmut_")
    return base, int(n) if n.isdigit() else 0


def mutated_line(d: str) -> str:
    """The mutant's own line(s), whitespace-normalised: what an equivalence entry matches. A mutant
    that deletes an argument reads "removed: <the deleted line>"."""
    plus = " ".join(" ".join(line[1:].split()) for line in d.splitlines() if line.startswith("+"))
    if plus.strip(" ()[],"):
        return plus
    minus = [" ".join(line[1:].split()) for line in d.splitlines() if line.startswith("-")]
    return "removed: " + minus[0] if minus else ""


def load_equivalent() -> list[dict]:
    if not EQUIVALENT.is_file():
        return []
    return tomllib.loads(EQUIVALENT.read_text()).get("equivalent", [])


def classify(results: list[dict]) -> None:
    """Mark each surviving mutant that docs/mutation-equivalent.toml explains (function + mutated line)."""
    entries = load_equivalent()
    for r in results:
        for mu in r["mutants"]:
            if mu["status"] == "killed":
                continue
            function = mu["name"].partition("__mutmut_")[0].rpartition(".")[2]
            line = mutated_line(mu.get("diff", ""))
            for e in entries:
                if e["function"] == function and " ".join(e["line"].split()) == line:
                    # kind "timing" or "gpu": a real difference only a stopwatch (the project allows no timed
                    # asserts) or a GPU sees: explained, yet counted as surviving
                    kind = e.get("kind", "equivalent")
                    mu["equivalent" if kind == "equivalent" else "explained"] = e["why"]
                    mu["kind"] = kind
                    break


def counts(r: dict) -> dict:
    mu = r["mutants"]
    c = {"mutants": len(mu), "killed": sum(m["status"] == "killed" for m in mu),
         "timeout": sum(m["status"] == "timeout" for m in mu),
         "equivalent": sum("equivalent" in m for m in mu)}
    c["not run"] = sum(m["status"] == "not checked" for m in mu)
    c["survived"] = c["mutants"] - c["killed"] - c["timeout"] - c["not run"]
    c["unexplained"] = c["survived"] - c["equivalent"] - sum("explained" in m for m in mu)
    detected, judged = c["killed"] + c["timeout"], c["mutants"] - c["equivalent"] - c["not run"]
    c["score"] = round(100 * detected / judged, 1) if judged else 100.0
    c["raw_score"] = round(100 * detected / (c["mutants"] - c["not run"]), 1) if c["mutants"] > c["not run"] else 100.0
    return c


def markdown(results: list[dict], jobs: int) -> str:
    lines = ["# Mutation testing summary", "",
             f"Last run: `make mutation` (mutmut, {jobs} worker(s)), {time.strftime('%Y-%m-%d')}. Regenerate with "
             "`make mutation`; survivors are explained in `docs/mutation-equivalent.toml`.", "",
             "Score = (killed + timeout) / (mutants − equivalent − not run); raw = (killed + timeout) / "
             "(mutants − not run). *Not run*: mutants the last run did not reach (interrupted).", "",
             "| module | functions mutated | mutants | killed | timeout | survived | equivalent | unexplained "
             "| not run | score | raw |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ("mutants", "killed", "timeout", "survived", "equivalent", "unexplained", "not run")
    total = dict.fromkeys(keys, 0)
    for r in results:
        c = counts(r)
        for k in total:
            total[k] += c[k]
        fns = ", ".join(f.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".") for f in r["functions"])
        lines.append(f"| {r['module']} | {fns} | " + " | ".join(str(c[k]) for k in keys)
                     + f" | {c['score']} % | {c['raw_score']} % |")
    judged = total["mutants"] - total["equivalent"] - total["not run"]
    score = round(100 * (total["killed"] + total["timeout"]) / judged, 1) if judged else 100.0
    lines.append("| **all** | | " + " | ".join(str(total[k]) for k in keys) + f" | {score} % | |")
    lines += ["", "## Tests mapped to each module", ""]
    lines += [f"- **{r['module']}** (`{r['source']}`): " + ", ".join(f"`{t}`" for t in r["tests"]) for r in results]
    lines += ["", "## Surviving mutants", ""]
    for r in results:
        survivors = [m for m in r["mutants"] if m["status"] not in ("killed", "timeout")]
        if not survivors:
            continue
        lines += [f"### {r['module']}", ""]
        for m in survivors:
            why = (f"equivalent: {m['equivalent']}" if "equivalent" in m else
                   f"not killed ({m['kind']}): {m['explained']}" if "explained" in m else
                   f"**not explained** ({m['status']})")
            lines.append(f"- `{m['name'].rpartition('.')[2]}` — {why}")
            lines += ["  ```diff"] + [f"  {d}" for d in m.get("diff", "").splitlines()] + ["  ```"]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated modules (default: all of {', '.join(MODULES)})")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at a time (default: 2)")
    p.add_argument("--summary", type=Path, default=SUMMARY, help=f"Markdown summary to write (default: {SUMMARY})")
    p.add_argument("--incremental", action="store_true",
                   help="keep build/mutation/<module>: re-test only mutants not killed last time (and changed code)")
    p.add_argument("--retest", action="store_true", help="with --incremental: re-test survivors too (tests changed)")
    p.add_argument("--workspace-suffix", default="", help="use build/mutation/<module><SUFFIX>/")
    p.add_argument("--match", default="*", help="with --incremental: only mutants whose name matches this glob")
    p.add_argument("--tests-from", metavar="REV", help="the tests as committed at git REV (a 'before' run)")
    p.add_argument("--results", type=Path, default=WORK / "results.json", help="where the JSON results go")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: gather each module's last results from build/mutation/<module>/")
    p.add_argument("--resummarize", action="store_true",
                   help="only rewrite the summary from build/mutation/results.json (after editing the equivalents)")
    args = p.parse_args(argv)
    global SUFFIX
    SUFFIX = args.workspace_suffix
    results_file = args.results
    if args.resummarize:
        results = json.loads(results_file.read_text())
    else:
        names = args.only.split(",") if args.only else list(MODULES)
        unknown = [n for n in names if n not in MODULES]
        if unknown:
            p.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
        results = []
        for name in names:
            if args.collect:
                results.append(collect_module(name, MODULES[name]))
                continue
            print(f"mutation: {name} ...", flush=True)
            r = run_module(name, MODULES[name], args.jobs, not args.incremental, args.tests_from, args.retest,
                           args.match)
            results.append(r)
            c = counts(r)
            print(f"mutation: {name}: {c['mutants']} mutants, {c['killed']} killed, {c['timeout']} timeout, "
                  f"{c['survived']} survived ({r['seconds']} s)", flush=True)
        if args.only and results_file.is_file():  # keep the other modules' last results
            kept = [r for r in json.loads(results_file.read_text()) if r["module"] not in names]
            results = sorted(kept + results, key=lambda r: list(MODULES).index(r["module"]))
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    classify(results)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(markdown(results, args.jobs))
    for r in results:
        c = counts(r)
        print(f"{r['module']:<11} mutants {c['mutants']:>4}  killed {c['killed']:>4}  timeout {c['timeout']:>3}  "
              f"survived {c['survived']:>3}  equivalent {c['equivalent']:>3}  score {c['score']:>5} %")
    print(f"summary: {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
