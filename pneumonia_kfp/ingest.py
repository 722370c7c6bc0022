"""ingest: an ImageFolder -> a content-addressed dataset version in the store.

    datasets/<sha>/raw/<name>.pack            the original files, concatenated (one pack per worker,
                                              like git's packs): a few objects instead of one per image
    datasets/<sha>/tensors/<split>.npy        uint8 N×1×S×S, decoded and resized once
    datasets/<sha>/validation.json            what was rejected and why
    datasets/<sha>/manifest.json              written last: its presence marks a complete version. It
                                              gives the sha256 of every object, and of every file with
                                              its pack and offset, plus a checksum of itself; readers
                                              verify what they load
    ingest-index/                             a cache: each source file's stat and sha256, and the
                                              stat (or ETag) of each object whose sha256 was verified

<sha> hashes every file's content and place plus the ingest settings, so unchanged data maps to
the same version. The source is listed by ``sources``, each file is read once by ``image_reader``
(hashed, decoded and packed from the same bytes), and re-ingesting unchanged data reads no file
(``source_index``, git's index for ingest). The manifest's fields are ``manifest.Manifest``. A
version with a damaged or missing object is repaired by ingesting it again: its objects are written
anew; if that makes the published manifest's objects whole again (a tensor or the report, the same
bytes), that manifest stands, else (a pack, the manifest itself) this ingest's complete manifest
replaces it.

Any number of ingests may write into one store at once, with the same data or not, without a lock:
packs have names no other writer uses, the tensors and the report are the same bytes whoever
writes them, and the manifest is published last with ``Store.put_new`` (a conditional put), so the
first complete writer's manifest stands and the others adopt it. No writer deletes an object it did
not write, nor one that a published manifest references; what is left unreferenced is removed by
``pneumonia-kfp gc`` (``pneumonia_kfp.maintenance``), after a grace period longer than any ingest.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia_kfp import manifest as manifests
from pneumonia_kfp import validation
from pneumonia_kfp.data import grouped_holdout, patient_id
from pneumonia_kfp.documents import DocumentError
from pneumonia_kfp.image_reader import FileResult, read_files
from pneumonia_kfp.manifest import Manifest, canonical_json, sha256_of_chunks
from pneumonia_kfp.params import check_run_params, default, max_pixels
from pneumonia_kfp.scratch import scratch_dir
from pneumonia_kfp.source_index import Index
from pneumonia_kfp.sources import ImageFile, LocalSource, S3Source, open_source
from pneumonia_kfp.storage import Store, open_store
from pneumonia_kfp.telemetry import IngestTelemetry

log = logging.getLogger(__name__)
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class VersionSettings:
    """What shapes a version besides the files."""

    image_size: int
    seed: int
    on_invalid: str
    max_pixels: int


def ingest(data: str, storage: str, image_size: int = default("image_size"), seed: int = default("seed"),
           on_invalid: str = default("on_invalid"), workers: int | None = None) -> dict:
    """Ingest ``data`` into ``storage``; returns the dataset's uri, sha, classes and counts.

    ``on_invalid``: ``fail`` (default) stops at any rejected file with a summary; ``skip`` leaves
    rejected files out. Either way the validation report lists each one and why. ``workers``:
    processes for the per-file work (default: the usable cores).
    """
    check_run_params({"data": data, "storage": storage, "image_size": image_size, "seed": seed,
                      "on_invalid": on_invalid})
    settings = VersionSettings(image_size, seed, on_invalid, max_pixels())
    telemetry = IngestTelemetry()  # Prometheus pushgateway, when configured
    root = open_store(storage)
    with scratch_dir("ingest-") as tmp:
        source = open_source(data, Path(tmp) / "source")
        scan_start = time.time_ns()
        classes, files = source.scan()
        index = Index.load(root, source.uri)
        shas = index.known(files, source)
        found = checked = None
        if all(s is not None for s in shas):  # nothing changed since the last ingest: no file is read
            checked = version_sha(classes, files, shas, settings, source.synthetic)
            found = find_version(root, checked, index)
        if found is None:
            source.fetch([f for f in files if not f.problem], "ingest: download")
            results = read_files(files, Path(tmp), image_size, settings.max_pixels, workers, "ingest: read")
            index.record(files, results, source, scan_start)
            sha = version_sha(classes, files, [r.sha or f"!{r.reason}" for r in results], settings, source.synthetic)
            found = find_version(root, sha, index) if sha != checked else None
            if found is None:
                writer = VersionWriter(root.child(f"datasets/{sha}"), source, classes, files, results, settings,
                                       Path(tmp))
                found = publish(root, sha, writer.write(), writer, index)
                index.verified_now(root, sha, found[1])
        index.save()
    sha, manifest, uploaded = found
    if manifest["rejected"] and on_invalid == "fail":
        rejected = json.loads(root.get_bytes(f"datasets/{sha}/validation.json"))["rejected"]
        raise validation.rejection_error(rejected, len(files))
    telemetry.done(len(files), uploaded, manifest["counts"])
    return summary(root.uri_of(f"datasets/{sha}"), sha, manifest, uploaded)


def version_sha(classes: list[str], files: list[ImageFile], shas: list[str], settings: VersionSettings,
                synthetic: bool) -> str:
    """The version is a function of the inputs: the files and the settings that shape the output
    (a carved test split depends on seed and fraction), so no work is needed to find it."""
    identity = {
        "format": manifests.FORMAT, "classes": classes, "image_size": settings.image_size, "seed": settings.seed,
        "test_fraction": TEST_FRACTION, "min_side": validation.MIN_SIDE, "max_pixels": settings.max_pixels,
        "synthetic": synthetic, "files": [[f.relpath, h] for f, h in zip(files, shas, strict=True)],
    }
    return sha256_of_chunks(canonical_json(identity))[:16]


def find_version(root: Store, sha: str, index: Index) -> tuple[str, Manifest, int] | None:
    """(sha, manifest, 0) of a complete, intact version; None when it must be (re)written."""
    version = root.child(f"datasets/{sha}")
    current = root.signatures(f"datasets/{sha}")
    manifest_key = f"datasets/{sha}/manifest.json"
    if manifest_key not in current:
        return None
    try:  # a manifest whose stat is the one recorded when it was verified is not checksummed again
        manifest = manifests.load(version, verify=index.objects.get(manifest_key) != current[manifest_key])
    except (manifests.IntegrityError, DocumentError) as e:
        log.warning("%s: writing the version anew", e)
        return None
    index.verified(manifest_key, current[manifest_key])
    damaged = index.damaged(root, sha, manifest, current)
    if damaged:
        log.warning("dataset %s: %d damaged or missing object(s) (%s): writing the version anew",
                    version.uri, len(damaged), ", ".join(damaged))
        return None
    log.info("dataset %s is already in the store: nothing to upload", version.uri)
    return sha, manifest, 0


def publish(root: Store, sha: str, manifest: Manifest, writer: VersionWriter,
            index: Index) -> tuple[str, Manifest, int]:
    """Publish ``manifest``, whose objects are all written, unless another writer published this version
    first: then its manifest stands when it is intact (this writer's own packs, which it references not,
    are removed), and is replaced by this complete one when it is damaged."""
    data = b"".join(canonical_json(manifest))
    key = f"datasets/{sha}/manifest.json"
    if root.put_new(key, data):
        return sha, manifest, writer.uploaded + 1
    published = find_version(root, sha, index)
    if published is not None:
        referenced = set(published[1]["objects"])
        for name in manifest["objects"]:
            if name.startswith("raw/") and name not in referenced:
                writer.store.delete(name)  # this writer's own pack (a name only it uses): nobody references it
        log.info("dataset %s was published by another ingest meanwhile: using it", root.uri_of(f"datasets/{sha}"))
        return sha, published[1], writer.uploaded
    log.warning("dataset %s is damaged: replacing its manifest with this ingest's", root.uri_of(f"datasets/{sha}"))
    root.put_bytes(key, data)  # the old one's objects stay until gc: a reader holding it is not broken further
    return sha, manifest, writer.uploaded + 1


# --- writing a version -------------------------------------------------------------------------------

@dataclass
class VersionWriter:
    """The dataset version being written: where it goes, what it is made of, and with which settings."""

    store: Store  # datasets/<sha>/
    source: LocalSource | S3Source
    classes: list[str]
    files: list[ImageFile]
    results: list[FileResult]
    settings: VersionSettings
    tmp: Path  # rows.u8 and packs/ from read_files
    uploaded: int = 0

    def write(self) -> Manifest:
        """Write every object of the version; return its manifest, for ``publish``."""
        validation_sha, rejected = self.write_report()
        kept = [i for i, r in enumerate(self.results) if r.reason is None]
        splits, carved = self.check_and_split(kept)
        entries = self.entries(kept, splits)
        objects = {"validation.json": validation_sha, **self.write_packs(entries), **self.write_tensors(entries)}
        counts = {s: {c: sum(1 for e in entries if e["split"] == s and e["class"] == c) for c in self.classes}
                  for s in dict.fromkeys(e["split"] for e in entries)}
        manifest: Manifest = {
            "format": manifests.FORMAT, "source": self.source.data, "classes": self.classes,
            "image_size": self.settings.image_size, "test_carved_from_train": carved, "counts": counts,
            "settings": {"seed": self.settings.seed, "test_fraction": TEST_FRACTION, "min_side": validation.MIN_SIDE,
                         "max_pixels": self.settings.max_pixels, "on_invalid": self.settings.on_invalid},
            "files": entries, "rejected": len(rejected), "objects": objects,
            "patients_in_train_and_test": validation.patients_in_both(entries), "synthetic": self.source.synthetic,
        }
        manifest["checksum"] = manifests.checksum(manifest)
        return manifest  # not yet published: publish() writes it, last

    def write_report(self) -> tuple[str, list[dict]]:
        """validation.json: kept even when ingest stops (without a manifest the version stays invisible)."""
        rejected = [{"path": f.relpath, "reason": r.reason}
                    for f, r in zip(self.files, self.results, strict=True) if r.reason]
        report = json.dumps({"rejected": rejected}, indent=1).encode()
        self.store.put_bytes("validation.json", report)
        self.uploaded += 1
        if rejected:
            if self.settings.on_invalid == "fail":
                raise validation.rejection_error(rejected, len(self.files))
            log.warning("skipping %d rejected files (see %s)", len(rejected), self.store.uri_of("validation.json"))
        return hashlib.sha256(report).hexdigest(), rejected

    def check_and_split(self, kept: list[int]) -> tuple[list[str], bool]:
        files = [self.files[i] for i in kept]
        validation.check_classes(files, [f.split for f in files], self.classes, self.source.data)
        validation.check_leakage(files, [f.split for f in files], [self.results[i].sha for i in kept])
        splits, carved = assign_splits(files, self.classes, self.settings.seed)
        if carved:
            validation.check_classes(files, splits, self.classes, self.source.data)
            log.warning(
                "!!! %s has no test/ split: carved %d images (%.0f%%, grouped by patient, stratified by class, "
                "seed %d) out of train as the test set.", self.source.data, splits.count("test"), 100 * TEST_FRACTION,
                self.settings.seed,
            )
        shared = validation.patients_in_both([{"split": s, "patient": patient_id(f.name)}
                                              for f, s in zip(files, splits, strict=True)])
        if shared:
            log.warning("%d patients have images in both train and test: %s%s", len(shared), ", ".join(shared[:10]),
                        " ..." if len(shared) > 10 else "")
        return splits, carved

    def entries(self, kept: list[int], splits: list[str]) -> list[dict]:
        rows: dict[str, int] = {}
        packs: dict[str, str] = {}
        entries = []
        for i, split in zip(kept, splits, strict=True):
            f, r = self.files[i], self.results[i]
            entries.append({"path": f.relpath, "split": split, "class": f.label, "sha256": r.sha, "bytes": r.size,
                            "patient": patient_id(f.name), "index": rows.setdefault(split, 0),
                            "pack": packs.setdefault(r.pack, f"raw/{r.pack}"), "offset": r.offset, "row": i})
            rows[split] += 1
        return entries

    def write_packs(self, entries: list[dict]) -> dict[str, str]:
        """raw/<name>.pack: the readers' packs, streamed and hashed as they are uploaded."""
        objects = {}
        for key in sorted({e["pack"] for e in entries}):
            digest, path = hashlib.sha256(), self.tmp / "packs" / key.removeprefix("raw/")
            self.store.put_chunks(key, _hashed(_file_chunks(path), digest), size=path.stat().st_size)
            objects[key] = digest.hexdigest()
            self.uploaded += 1
        return objects

    def write_tensors(self, entries: list[dict]) -> dict[str, str]:
        """tensors/<split>.npy streamed from the rows file (flat memory), hashed as they are written."""
        objects = {}
        for split in dict.fromkeys(e["split"] for e in entries):
            rows = [e.pop("row") for e in entries if e["split"] == split]
            key = f"tensors/{split}.npy"
            digest = hashlib.sha256()
            self.store.put_chunks(key, _hashed(self._npy_chunks(rows), digest), size=self._npy_size(len(rows)))
            objects[key] = digest.hexdigest()
            self.uploaded += 1
        return objects

    def _npy_header(self, n: int) -> bytes:
        size, header = self.settings.image_size, io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": (n, 1, size, size)})
        return header.getvalue()

    def _npy_size(self, n: int) -> int:
        return len(self._npy_header(n)) + n * self.settings.image_size ** 2

    def _npy_chunks(self, rows: list[int], per_chunk: int = 1024):
        size = self.settings.image_size
        yield self._npy_header(len(rows))
        with open(self.tmp / "rows.u8", "rb") as f:
            for k in range(0, len(rows), per_chunk):
                yield b"".join(os.pread(f.fileno(), size * size, i * size * size) for i in rows[k:k + per_chunk])


def _file_chunks(path: Path, chunk: int = 8 * 1024 * 1024):
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


def _hashed(chunks, digest):
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def assign_splits(files: list[ImageFile], classes: list[str], seed: int) -> tuple[list[str], bool]:
    """Each file's split; without a test split, a patient-grouped stratified one carved from train."""
    splits = [f.split for f in files]
    if any(s == "test" for s in splits):
        return splits, False
    train = [i for i, f in enumerate(files) if f.split == "train"]
    labels = [classes.index(files[i].label) for i in train]
    groups = [patient_id(files[i].name) or files[i].relpath for i in train]  # a patient never straddles
    held = grouped_holdout(labels, groups, TEST_FRACTION, seed)
    for i, h in zip(train, held, strict=True):
        if h:
            splits[i] = "test"
    return splits, True


def summary(uri: str, sha: str, manifest: Manifest, uploaded: int) -> dict:
    return {
        "uri": uri, "sha": sha, "classes": manifest["classes"], "image_size": manifest["image_size"],
        "counts": manifest["counts"], "test_carved_from_train": manifest["test_carved_from_train"],
        "uploaded": uploaded, "synthetic": manifest["synthetic"],
    }
