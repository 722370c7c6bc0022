"""The dataset manifest (``datasets/<sha>/manifest.json``): one typed definition for its writer
(ingest) and its readers (``data.StoredDataset``, ingest finding a version, ``maintenance``).

It is written last, so its presence marks a complete version. It gives the sha256 of every object and
of every original file (with its pack and offset), and a checksum of itself over its canonical JSON:
a reader checks the checksum, then the format, then that every field the writer writes is there.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator, TypedDict

from pneumonia_kfp.documents import DocumentError, check_format, require
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.storage import storage_root

FORMAT = 2
KIND = "dataset manifest"
NAME = "manifest.json"

# One original file kept in the version: where it is (split, class, row ``index`` in its split's tensor)
# and where its bytes are (``bytes`` from ``offset`` in ``pack``). "class" is a keyword: the functional form.
FileEntry = TypedDict("FileEntry", {"path": str, "split": str, "class": str, "sha256": str, "bytes": int,
                                    "patient": "str | None", "index": int, "pack": str, "offset": int})


class ManifestSettings(TypedDict):
    """The settings, besides the files and the image size, that shaped the version."""

    seed: int
    test_fraction: float
    min_side: int
    max_pixels: int
    on_invalid: str


class Manifest(TypedDict):
    format: int
    source: str  # the data it was ingested from, as given
    classes: list[str]
    image_size: int
    test_carved_from_train: bool
    counts: dict[str, dict[str, int]]  # {split: {class: files}}
    settings: ManifestSettings
    files: list[FileEntry]
    rejected: int  # files left out (listed in validation.json)
    objects: dict[str, str]  # {name under the version: sha256}
    patients_in_train_and_test: list[str]
    synthetic: bool
    checksum: str  # sha256 of the canonical JSON of every other field


FIELDS = tuple(Manifest.__annotations__)


class IntegrityError(DataError):
    """A stored object is missing or its bytes are not those the manifest's sha256 names."""


def canonical_json(obj, per_chunk: int = 2048) -> Iterator[bytes]:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"))``, encoded, in pieces: a list of tens of
    thousands of entries (the manifest's files) is never one string in memory."""
    if isinstance(obj, dict):
        yield b"{"
        for n, key in enumerate(sorted(obj)):
            yield (b"," if n else b"") + json.dumps(key).encode() + b":"
            yield from canonical_json(obj[key], per_chunk)
        yield b"}"
    elif isinstance(obj, list) and len(obj) > per_chunk:
        yield b"["
        for k in range(0, len(obj), per_chunk):
            yield (b"," if k else b"") + _canonical(obj[k:k + per_chunk])[1:-1]
        yield b"]"
    else:
        yield _canonical(obj)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_of_chunks(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def checksum(manifest: dict) -> str:
    """sha256 of the manifest without its own ``checksum`` field (canonical JSON)."""
    return sha256_of_chunks(canonical_json({k: v for k, v in manifest.items() if k != "checksum"}))


def check(doc, where: str) -> Manifest:
    """``doc`` as a manifest of this format with every field; one line naming ``where`` when it is not."""
    check_format(doc, KIND, FORMAT, where)
    require(doc, FIELDS, KIND, where)
    for name, kind in (("objects", dict), ("files", list), ("classes", list), ("settings", dict)):
        if not isinstance(doc[name], kind):
            raise DocumentError(f"{where}: {KIND} field {name} is not a JSON {'object' if kind is dict else 'list'}; "
                                "it was not written by pneumonia-kfp, regenerate it")
    return doc


def load(store, key: str = NAME, verify: bool = True) -> Manifest | None:
    """The manifest at ``key`` in ``store``, its checksum verified (unless the caller knows it is) and its
    format checked; None when there is none (the version is not complete)."""
    if not store.exists(key):
        return None
    where = store.uri_of(key)
    try:
        doc = json.loads(store.get_bytes(key))
        ok = isinstance(doc, dict) and (not verify or doc.get("checksum") == checksum(doc))
    except ValueError:
        ok = False
    if not ok:
        prefix = key.rpartition("/")[0]
        raise IntegrityError(f"{where} is damaged (its checksum does not match its content). "
                             f"{repair_hint(store.uri_of(prefix) if prefix else store.uri)}")
    return check(doc, where)


def repair_hint(version_uri: str, manifest: Manifest | None = None) -> str:
    """How to repair a damaged version: ingest the same data with the same settings again."""
    storage = storage_root(version_uri)
    if manifest is None:
        return (f"Repair it in place by ingesting the same data again with the same settings: "
                f"pneumonia-kfp ingest --data SOURCE --storage {storage} ...")
    flags = f" --image-size {manifest['image_size']} --seed {manifest['settings']['seed']}"
    flags += " --on-invalid skip" if manifest["rejected"] else ""
    return (f"Repair it in place by ingesting the same data again: "
            f"pneumonia-kfp ingest --data {manifest['source']} --storage {storage}{flags}")
