"""The dataset on disk and in the store: ImageFolder scanning, patient ids, grouped splits, tensors."""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia_kfp.errors import DataError  # noqa: F401  (re-exported: the data module's error)

SPLITS = ("train", "val", "test")
# Kermany file names: PNEUMONIA "person1_bacteria_1.jpeg", NORMAL "IM-0115-0001.jpeg" and
# "NORMAL2-IM-1427-0001.jpeg". Anything else is treated as its own patient.
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))


@dataclass(frozen=True)
class ImageFile:
    split: str
    label: str
    path: Path  # absolute path on disk
    relpath: str  # split/class/name, the same in the store


def patient_id(file_name: str) -> str | None:
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(file_name)
        if m:
            return m.group(1)
    return None


def scan_image_folder(root: str | Path) -> tuple[list[str], list[ImageFile]]:
    """Classes (sorted folder names, the same in every split) and the image files, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in splits:
        raise DataError(
            f"{root} has no train/ folder: expected ImageFolder layout "
            f"{root}/{{train,val,test}}/<class>/<image>"
        )
    classes_by_split = {
        s: sorted(d.name for d in (root / s).iterdir() if d.is_dir() and not d.name.startswith("."))
        for s in splits
    }
    classes = classes_by_split["train"]
    if len(classes) < 2:
        raise DataError(f"{root}/train has {len(classes)} class folder(s) {classes}: need at least 2")
    for s, cs in classes_by_split.items():
        if cs != classes:
            raise DataError(f"{root}/{s} has class folders {cs}, but train has {classes}: make them match")
    files = []
    for s in splits:
        for c in classes:
            # every visible file counts (ingest decodes it to decide); hidden files are ignored
            found = sorted(
                p for p in (root / s / c).iterdir()
                if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")
            )
            if not found and s == "train":
                raise DataError(f"{root}/{s}/{c} holds no images: a class needs at least one")
            files += [ImageFile(s, c, p, f"{s}/{c}/{p.name}") for p in found]
    return classes, files


def grouped_holdout(labels, groups, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a class-stratified hold-out of about ``fraction`` that never splits a group.

    Groups are patients: all images of one patient land on the same side, so the hold-out
    measures generalisation to new patients.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_splits = max(2, round(1 / fraction))
    if len(np.unique(groups)) < n_splits:
        raise DataError(f"too few patients ({len(np.unique(groups))}) to hold out {fraction:.0%} of them")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(folds.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def groups_of(entries: list[dict]) -> list[str]:
    """Patient id of each manifest entry; a file without one is its own group."""
    return [e.get("patient") or e["path"] for e in entries]


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class StoredDataset:
    """A dataset version in the store, as ingest wrote it (``datasets/<sha>/``)."""

    def __init__(self, uri: str):
        from pneumonia_kfp.storage import open_store

        self.uri = uri
        self.store = open_store(uri)
        if not self.store.exists("manifest.json"):
            raise DataError(f"{uri} holds no complete dataset (no manifest.json): run ingest first")
        self.manifest = json.loads(self.store.get_bytes("manifest.json"))
        self.classes: list[str] = self.manifest["classes"]

    def entries(self, split: str) -> list[dict]:
        """Manifest entries of a split, in tensor row order."""
        rows = [e for e in self.manifest["files"] if e["split"] == split]
        return sorted(rows, key=lambda e: e["index"])

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """(uint8 images N×1×S×S, int64 labels, manifest entries) of a split."""
        entries = self.entries(split)
        if not entries:
            return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), []
        images = decode_npy(self.store.get_bytes(f"tensors/{split}.npy"))
        labels = np.array([self.classes.index(e["class"]) for e in entries], dtype=np.int64)
        if len(images) != len(entries):
            raise DataError(f"{self.uri}/tensors/{split}.npy has {len(images)} rows, manifest {len(entries)}")
        return images, labels, entries
