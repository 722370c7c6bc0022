"""The dataset as training and evaluation read it: a version in the store (``StoredDataset``, verified
as it is read), patient ids and patient-grouped hold-outs. Listing and reading image folders is
``sources``' and ``image_reader``'s; the manifest's fields are ``manifest.Manifest``."""
from __future__ import annotations

import hashlib
import io
import re

import numpy as np

from pneumonia_kfp import manifest as manifests
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.manifest import IntegrityError, Manifest, repair_hint
from pneumonia_kfp.storage import NotFound, open_store

# Kermany file names: PNEUMONIA "person1_bacteria_1.jpeg", NORMAL "IM-0115-0001.jpeg" and
# "NORMAL2-IM-1427-0001.jpeg". Anything else is treated as its own patient.
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))


def patient_id(file_name: str) -> str | None:
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(file_name)
        if m:
            return m.group(1)
    return None


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
    """Patient id of each manifest entry; a file without one (None) is its own group."""
    return [e["patient"] or e["path"] for e in entries]


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def verify(data: bytes, want: str | None, where: str, hint: str) -> bytes:
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise IntegrityError(f"{where} is damaged: its sha256 is {got[:16]}..., the manifest says "
                             f"{(want or 'none')[:16]}.... {hint}")
    return data


class StoredDataset:
    """A dataset version in the store, as ingest wrote it (``datasets/<sha>/``), verified as it is read:
    the manifest against its own checksum, every other object against the sha256 the manifest gives."""

    def __init__(self, uri: str):
        self.uri = uri
        self.store = open_store(uri)
        manifest = manifests.load(self.store)
        if manifest is None:
            raise DataError(f"{uri} holds no complete dataset (no manifest.json): run ingest first")
        self.manifest: Manifest = manifest
        self.classes: list[str] = self.manifest["classes"]

    def entries(self, split: str) -> list[dict]:
        """Manifest entries of a split, in tensor row order."""
        rows = [e for e in self.manifest["files"] if e["split"] == split]
        return sorted(rows, key=lambda e: e["index"])

    def read(self, key: str) -> bytes:
        """A version object (``tensors/train.npy``, ``validation.json``), checked against the manifest."""
        return self._verified(key, self.manifest["objects"].get(key), lambda: self.store.get_bytes(key))

    def raw(self, entry: dict) -> bytes:
        """The original bytes of a file (a range of its pack), checked against its sha256."""
        return self._verified(entry["pack"], entry["sha256"],
                              lambda: self.store.get_range(entry["pack"], entry["offset"], entry["bytes"]),
                              f"{self.uri}/{entry['pack']} (bytes {entry['offset']}+{entry['bytes']}: {entry['path']})")

    def _verified(self, key: str, want: str | None, fetch, where: str | None = None) -> bytes:
        hint = repair_hint(self.uri, self.manifest)
        try:
            data = fetch()
        except NotFound:
            raise IntegrityError(f"{self.store.uri_of(key)} is missing from the dataset version. {hint}") from None
        return verify(data, want, where or self.store.uri_of(key), hint)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """(uint8 images N×1×S×S, int64 labels, manifest entries) of a split."""
        entries = self.entries(split)
        if not entries:
            return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), []
        images = decode_npy(self.read(f"tensors/{split}.npy"))
        labels = np.array([self.classes.index(e["class"]) for e in entries], dtype=np.int64)
        if len(images) != len(entries):
            raise DataError(f"{self.uri}/tensors/{split}.npy has {len(images)} rows, manifest {len(entries)}")
        return images, labels, entries
