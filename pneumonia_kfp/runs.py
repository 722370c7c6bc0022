"""A run's folder in the store: how every evaluate hands its results to the report.

Each pipeline run gets ``<storage>/runs/<key>/`` (key: UTC time + random suffix, made once by the
first step). Every evaluate writes its model's results there as ``results/<backbone>.json`` (a plain
JSON dict, the model's entry of results.json) and the report reads them all back. This replaces KFP's
``dsl.Collected`` of artifacts, which backends before 2.14 cannot run; the store works on all.

Plain Python: no kfp import, so tests and later steps (an ensemble, per-image predictions) read the
same documents.
"""
from __future__ import annotations

import json
import secrets
import time

from pneumonia_kfp.documents import ModelResult, read_result
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.storage import NotFound, open_store

RUNS = "runs"
RESULTS = "results"


def new_run(storage: str, **info) -> str:
    """A fresh run folder under ``storage``; its URI. ``run.json`` records when it started (and ``info``)."""
    key = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    store = open_store(storage).child(f"{RUNS}/{key}")
    # written first: a store the tasks cannot write to fails here, before any training
    store.put_bytes("run.json", json.dumps({"key": key, "started": time.time(), **info}, indent=1).encode())
    return store.uri


def result_key(backbone: str) -> str:
    return f"{RESULTS}/{backbone}.json"


def save_result(run_dir: str, result: dict) -> str:
    """Write one model's results (a dict with ``backbone``) into the run folder; the object's URI."""
    store = open_store(run_dir)
    key = result_key(result["backbone"])
    store.put_bytes(key, json.dumps(result, indent=1, allow_nan=False).encode())  # NaN is not JSON: null
    return store.uri_of(key)


def load_results(run_dir: str, backbones: list[str]) -> list[ModelResult]:
    """Every model's result document in the run folder, in ``backbones`` order: exactly one per backbone,
    each of this version's format.

    Read object by object, never listed: multi-user Kubeflow's per-profile keys may read and write
    under their prefix but need not be allowed to list the bucket."""
    store = open_store(run_dir)
    results, missing = [], []
    for backbone in backbones:
        try:
            results.append(json.loads(store.get_bytes(result_key(backbone))))
        except NotFound:
            missing.append(backbone)
    if missing:
        raise DataError(f"{run_dir}: no results for {', '.join(missing)} (did its evaluate step fail?)")
    for backbone, r in zip(backbones, results, strict=True):
        read_result(r, store.uri_of(result_key(backbone)))
        if r["backbone"] != backbone:
            raise DataError(f"{store.uri_of(result_key(backbone))} holds results of {r['backbone']!r}")
    return results
