"""ingest: an ImageFolder -> a content-addressed dataset version in the store.

    datasets/<sha>/raw/<split>/<class>/<file>   the original files
    datasets/<sha>/tensors/<split>.npy          uint8 N×1×S×S, decoded and resized once
    datasets/<sha>/validation.json              what was rejected and why
    datasets/<sha>/manifest.json                written last: its presence marks a complete version

<sha> hashes every file's content and place plus the ingest settings, so unchanged data maps to
the same version and re-ingesting it uploads nothing.
"""

import hashlib
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pneumonia_kfp import validation
from pneumonia_kfp.data import DataError, ImageFile, encode_npy, grouped_holdout, patient_id, scan_image_folder
from pneumonia_kfp.params import check_run_params, default
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.telemetry import IngestTelemetry, progress

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
TEST_FRACTION = 0.1


def _sha256(path: Path, root: Path) -> str:
    """Content hash; a file that cannot be read (or a symlink leaving root) hashes as its name."""
    try:
        if validation.inside(path, root):
            return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        pass
    return hashlib.sha256(f"unreadable:{path.name}".encode()).hexdigest()




def _fetch_source(data: str, workdir: Path) -> Path:
    """A local directory for ``data``: the directory itself, or a copy of an s3:// prefix."""
    if data.startswith("s3://"):
        src = open_store(data)
        keys = list(src.list())
        if not keys:
            raise DataError(f"{data} holds no files")
        for key in keys:
            src.get_file(key, workdir / key)
        return workdir
    if "://" in data and not data.startswith("file://"):
        raise DataError(f"data source {data!r}: use a local directory, file:///dir or s3://bucket/prefix")
    return Path(data.removeprefix("file://")).expanduser()


def assign_splits(files: list[ImageFile], classes: list[str], seed: int) -> tuple[list[str], bool]:
    """Each file's split; without a test split, a patient-grouped stratified one carved from train."""
    splits = [f.split for f in files]
    if any(s == "test" for s in splits):
        return splits, False
    train = [i for i, f in enumerate(files) if f.split == "train"]
    labels = [classes.index(files[i].label) for i in train]
    groups = [patient_id(files[i].path.name) or files[i].relpath for i in train]  # a patient never straddles
    held = grouped_holdout(labels, groups, TEST_FRACTION, seed)
    for i, h in zip(train, held, strict=True):
        if h:
            splits[i] = "test"
    return splits, True


def ingest(data: str, storage: str, image_size: int = default("image_size"), seed: int = default("seed"),
           on_invalid: str = default("on_invalid")) -> dict:
    """Ingest ``data`` into ``storage``; returns the dataset's uri, sha, classes and counts.

    ``on_invalid``: ``fail`` (default) stops at any rejected file with a summary; ``skip`` leaves
    rejected files out. Either way the validation report lists each one and why.
    """
    check_run_params({"image_size": image_size, "seed": seed, "on_invalid": on_invalid})
    telemetry = IngestTelemetry()  # Prometheus pushgateway, when configured
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        root = _fetch_source(data, Path(tmp))
        classes, files = scan_image_folder(root)
        with ThreadPoolExecutor(8) as pool:
            shas = list(progress(pool.map(lambda f: _sha256(f.path, root), files), len(files), "ingest: hash", "file"))
        # the version is a function of the inputs: the files and the settings that shape the
        # output (a carved test split depends on seed and fraction), so no work is needed to find it
        identity = {
            "format": FORMAT_VERSION, "classes": classes, "image_size": image_size, "seed": seed,
            "test_fraction": TEST_FRACTION, "min_side": validation.MIN_SIDE, "synthetic": _synthetic(root),
            "files": [[f.relpath, h] for f, h in zip(files, shas, strict=True)],
        }
        sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        store = open_store(storage).child(f"datasets/{sha}")

        uploaded = 0
        if store.exists("manifest.json"):
            log.info("dataset %s is already in the store: nothing to upload", store.uri)
            manifest = json.loads(store.get_bytes("manifest.json"))
            rejected = json.loads(store.get_bytes("validation.json"))["rejected"]
            if rejected and on_invalid == "fail":
                raise validation.rejection_error(rejected, len(files))
        else:
            manifest = _write_version(store, root, classes, files, shas, image_size, seed, on_invalid, data)
            uploaded = len(manifest["files"]) + len(manifest["counts"]) + 2
    telemetry.done(len(files), uploaded, manifest["counts"])
    return summary(store.uri, sha, manifest, uploaded)


def _write_version(store, root, classes, files, shas, image_size, seed, on_invalid, data) -> dict:
    with ThreadPoolExecutor(4) as pool:
        checked = list(progress(pool.map(lambda f: validation.check_file(f, root, image_size), files), len(files),
                                "ingest: decode", "img"))
    rejected = [{"path": f.relpath, "reason": why} for f, (_, why) in zip(files, checked, strict=True) if why]
    # the report is kept even when ingest stops: without a manifest the version stays invisible
    store.put_bytes("validation.json", json.dumps({"rejected": rejected}, indent=1).encode())
    if rejected:
        if on_invalid == "fail":
            raise validation.rejection_error(rejected, len(files))
        log.warning("skipping %d rejected files (see %s)", len(rejected), store.uri_of("validation.json"))
    kept = [i for i, (_, why) in enumerate(checked) if not why]
    files, shas, images = [files[i] for i in kept], [shas[i] for i in kept], [checked[i][0] for i in kept]
    validation.check_classes(files, classes, root)
    validation.check_leakage(files, [f.split for f in files], shas)
    splits, carved = assign_splits(files, classes, seed)
    if carved:
        log.warning(
            "!!! %s has no test/ split: carved %d images (%.0f%%, grouped by patient, stratified by "
            "class, seed %d) out of train as the test set.", data, splits.count("test"), 100 * TEST_FRACTION, seed,
        )

    entries, rows = [], {}
    for f, split, sha, image in zip(files, splits, shas, images, strict=True):
        rows.setdefault(split, []).append(image)
        entries.append({
            "path": f.relpath, "split": split, "class": f.label, "sha256": sha,
            "bytes": f.path.stat().st_size, "patient": patient_id(f.path.name),
            "index": len(rows[split]) - 1,
        })
    shared = validation.patients_in_both(entries)
    if shared:
        log.warning("%d patients have images in both train and test: %s%s", len(shared), ", ".join(shared[:10]),
                    " ..." if len(shared) > 10 else "")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: store.put_file(f"raw/{f.relpath}", f.path), files))
    for split, imgs in rows.items():
        store.put_bytes(f"tensors/{split}.npy", encode_npy(np.stack(imgs)[:, None]))
    counts = {s: {c: sum(1 for e in entries if e["split"] == s and e["class"] == c) for c in classes} for s in rows}
    manifest = {
        "format": FORMAT_VERSION, "source": data, "classes": classes, "image_size": image_size,
        "test_carved_from_train": carved, "counts": counts, "files": entries, "rejected": len(rejected),
        "patients_in_train_and_test": shared, "synthetic": _synthetic(root),
    }
    store.put_bytes("manifest.json", json.dumps(manifest, indent=1).encode())  # last: marks completeness
    return manifest


def _synthetic(root: Path) -> bool:
    from pneumonia_kfp.synthetic import MARKER

    return (root / MARKER).is_file()


def summary(uri: str, sha: str, manifest: dict, uploaded: int) -> dict:
    return {
        "uri": uri, "sha": sha, "classes": manifest["classes"], "image_size": manifest["image_size"],
        "counts": manifest["counts"], "test_carved_from_train": manifest["test_carved_from_train"],
        "uploaded": uploaded, "synthetic": manifest["synthetic"],
    }
