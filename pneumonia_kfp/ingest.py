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
the same version. Each file is read once, in worker processes: hashed, decoded and packed from the
same bytes. Re-ingesting unchanged data reads no file, the way git's index works: a file whose
size, times and inode are those recorded keeps its recorded sha256 (its content decides whenever
they change; an s3:// source is judged by ETag), and the version's objects are checked the same
way against the store's own stat or ETag. A version with a damaged or missing object is repaired by
ingesting it again: its objects are written anew; if that makes the published manifest's objects
whole again (a tensor or the report, the same bytes), that manifest stands, else (a pack, the
manifest itself) this ingest's complete manifest replaces it.

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
import secrets
import stat
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumonia_kfp import validation
from pneumonia_kfp.data import (
    DataError,
    ImageFile,
    IntegrityError,
    canonical_json,
    file_signature,
    grouped_holdout,
    image_folder_from_keys,
    manifest_checksum,
    patient_id,
    read_manifest,
    scan_image_folder,
    sha256_of_chunks,
)
from pneumonia_kfp.params import check_run_params, default, max_pixels
from pneumonia_kfp.procs import die_with_parent, usable_cores
from pneumonia_kfp.scratch import scratch_dir
from pneumonia_kfp.storage import Store, open_store
from pneumonia_kfp.telemetry import IngestTelemetry, progress

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
TEST_FRACTION = 0.1
# a file changed this close before the scan may change again within the same clock tick, unseen by
# its stat: its hash is not cached (git's "racy" entries)
RACY_NS = 100_000_000
MIN_FILES_FOR_PROCESSES = 256  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class Settings:
    """What shapes a version besides the files."""

    image_size: int
    seed: int
    on_invalid: str
    max_pixels: int


@dataclass(frozen=True, slots=True)
class FileResult:
    """One file, read once."""

    sha: str | None  # None: it could not be read
    reason: str | None = None  # why it is rejected; None: kept, its row written and its bytes packed
    size: int = 0
    signature: tuple | None = None  # its stat, when nothing changed while it was read
    pack: str | None = None  # the pack holding its bytes, and where
    offset: int | None = None


def ingest(data: str, storage: str, image_size: int = default("image_size"), seed: int = default("seed"),
           on_invalid: str = default("on_invalid"), workers: int | None = None) -> dict:
    """Ingest ``data`` into ``storage``; returns the dataset's uri, sha, classes and counts.

    ``on_invalid``: ``fail`` (default) stops at any rejected file with a summary; ``skip`` leaves
    rejected files out. Either way the validation report lists each one and why. ``workers``:
    processes for the per-file work (default: the usable cores).
    """
    check_run_params({"data": data, "storage": storage, "image_size": image_size, "seed": seed,
                      "on_invalid": on_invalid})
    settings = Settings(image_size, seed, on_invalid, max_pixels())
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
            results = read_files(source, files, Path(tmp), settings, workers)
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


def version_sha(classes: list[str], files: list[ImageFile], shas: list[str], settings: Settings,
                synthetic: bool) -> str:
    """The version is a function of the inputs: the files and the settings that shape the output
    (a carved test split depends on seed and fraction), so no work is needed to find it."""
    identity = {
        "format": FORMAT_VERSION, "classes": classes, "image_size": settings.image_size, "seed": settings.seed,
        "test_fraction": TEST_FRACTION, "min_side": validation.MIN_SIDE, "max_pixels": settings.max_pixels,
        "synthetic": synthetic, "files": [[f.relpath, h] for f, h in zip(files, shas, strict=True)],
    }
    return sha256_of_chunks(canonical_json(identity))[:16]


def find_version(root: Store, sha: str, index: Index) -> tuple[str, dict, int] | None:
    """(sha, manifest, 0) of a complete, intact version; None when it must be (re)written."""
    version = root.child(f"datasets/{sha}")
    current = root.signatures(f"datasets/{sha}")
    manifest_key = f"datasets/{sha}/manifest.json"
    if manifest_key not in current:
        return None
    try:  # a manifest whose stat is the one recorded when it was verified is not checksummed again
        manifest = read_manifest(version, verify=index.objects.get(manifest_key) != current[manifest_key])
    except IntegrityError as e:
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


def publish(root: Store, sha: str, manifest: dict, writer: VersionWriter, index: Index) -> tuple[str, dict, int]:
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


# --- the source ------------------------------------------------------------------------------------

class LocalSource:
    """An ImageFolder on local disk."""

    def __init__(self, root: Path, data: str):
        self.root, self.data = root, data
        self.uri = os.path.realpath(root)
        self.synthetic = (root / _marker()).is_file()

    def scan(self) -> tuple[list[str], list[ImageFile]]:
        return scan_image_folder(self.root)

    def signature(self, f: ImageFile, result: FileResult | None = None) -> tuple | None:
        return result.signature if result is not None else f.stat

    def fetch(self, files: list[ImageFile]) -> None:
        pass  # already here


class S3Source:
    """An ImageFolder under an s3:// prefix: listed with ETags; downloaded only when files must be read."""

    def __init__(self, data: str, workdir: Path):
        self.data, self.uri, self.workdir = data, data.rstrip("/"), workdir
        self.store = open_store(data)
        self.etags = self.store.signatures()
        self.synthetic = _marker() in self.etags

    def scan(self) -> tuple[list[str], list[ImageFile]]:
        if not self.etags:
            raise DataError(f"{self.data} holds no files")
        return image_folder_from_keys(sorted(self.etags), self.uri, self.workdir)

    def signature(self, f: ImageFile, result: FileResult | None = None) -> tuple | None:
        sig = self.etags.get(f.relpath)
        return tuple(sig) if sig else None

    def fetch(self, files: list[ImageFile]) -> None:
        with ThreadPoolExecutor(16) as pool:  # network-bound: threads overlap the requests
            list(progress(pool.map(lambda f: self.store.get_file(f.relpath, f.path), files), len(files),
                          "ingest: download", "file"))


def open_source(data: str, workdir: Path) -> LocalSource | S3Source:
    if data.startswith("s3://"):
        return S3Source(data, workdir)
    if "://" in data and not data.startswith("file://"):
        raise DataError(f"data source {data!r}: use a local directory, file:///dir or s3://bucket/prefix")
    return LocalSource(Path(data.removeprefix("file://")).expanduser(), data)


def _marker() -> str:
    from pneumonia_kfp.synthetic import MARKER

    return MARKER


# --- the index: re-ingest by stat --------------------------------------------------------------------

@dataclass
class Index:
    """git's index for ingest, kept in the store: per source, {relpath: [*stat, sha256]} of its files;
    for the whole store, {key: stat or ETag} of the objects whose sha256 was last verified. Only a
    cache: whatever does not match is read and hashed again."""

    store: Store
    key: str
    files: dict = field(default_factory=dict)
    objects: dict = field(default_factory=dict)
    dirty: set = field(default_factory=set)

    OBJECTS = "ingest-index/objects.json"

    @classmethod
    def load(cls, root: Store, source_uri: str) -> Index:
        index = cls(root, f"ingest-index/{hashlib.sha256(source_uri.encode()).hexdigest()[:16]}.json")
        index.files, index.objects = index._read(index.key), index._read(cls.OBJECTS)
        return index

    def _read(self, key: str) -> dict:
        try:
            if self.store.exists(key):
                saved = json.loads(self.store.get_bytes(key))
                if saved.get("format") == FORMAT_VERSION:
                    return saved["entries"]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ingest index %s is unreadable: starting it again", self.store.uri_of(key))
        return {}

    def known(self, files: list[ImageFile], source) -> list[str | None]:
        """Each file's sha256 from the cache (a name that cannot be read: its reason); None: read it."""
        out = []
        for f in files:
            if f.problem:
                out.append(f"!{f.problem}")
                continue
            sig, cached = source.signature(f), self.files.get(f.relpath)
            out.append(cached[-1] if sig is not None and cached and list(sig) == cached[:-1] else None)
        return out

    def record(self, files: list[ImageFile], results: list[FileResult], source, scan_start: int) -> None:
        for f, r in zip(files, results, strict=True):
            sig = source.signature(f, r)
            racy = isinstance(source, LocalSource) and sig is not None and max(sig[1], sig[2]) > scan_start - RACY_NS
            if r.sha and sig is not None and not racy:
                self.files[f.relpath] = [*sig, r.sha]
            else:
                self.files.pop(f.relpath, None)
        self.dirty.add(self.key)

    def damaged(self, root: Store, sha: str, manifest: dict, current: dict) -> list[str]:
        """Keys of the version's objects that are missing or whose bytes are not the manifest's sha256;
        an object whose stat (or ETag) is the one recorded when it was last verified is not read."""
        bad = []
        for name, want in manifest["objects"].items():
            key = f"datasets/{sha}/{name}"
            sig = current.get(key)
            if sig is None:
                bad.append(key)
            elif self.objects.get(key) != list(sig):
                if root.sha256(key) == want:
                    self.verified(key, sig)
                else:
                    bad.append(key)
        return bad

    def verified(self, key: str, signature) -> None:
        """Record that the object ``key``, as its ``signature`` shows it now, has been checked."""
        if self.objects.get(key) != list(signature):
            self.objects[key] = list(signature)
            self.dirty.add(self.OBJECTS)

    def verified_now(self, root: Store, sha: str, manifest: dict) -> None:
        """Record the signatures of a version's objects, just written and hashed as they were."""
        current = root.signatures(f"datasets/{sha}")
        for name in [*manifest["objects"], "manifest.json"]:
            key = f"datasets/{sha}/{name}"
            if key in current:
                self.verified(key, current[key])

    def save(self) -> None:
        for key in sorted(self.dirty):
            entries = self.objects if key == self.OBJECTS else self.files
            self.store.put_chunks(key, canonical_json({"format": FORMAT_VERSION, "entries": entries}))
        self.dirty.clear()


# --- reading the files: one read each, in worker processes -------------------------------------------

@dataclass(frozen=True)
class _Job:
    """What every reader needs, sent to each worker once."""

    tmp: str  # holds rows.u8 (preallocated: file i at row i) and packs/, one pack of raw bytes per reader
    image_size: int
    max_pixels: int
    parent_pid: int


class _Reader:
    """Reads files for one process: each file's bytes are hashed, decoded into its row and appended to
    this reader's pack, all from the one read."""

    def __init__(self, job: _Job):
        self.job, self.row_bytes = job, job.image_size * job.image_size
        self.rows = os.open(os.path.join(job.tmp, "rows.u8"), os.O_WRONLY | os.O_CLOEXEC)
        self.pack_name = f"{secrets.token_hex(16)}.pack"  # 128 random bits: no other writer uses it
        self.pack = open(os.path.join(job.tmp, "packs", self.pack_name), "ab")

    def read(self, i: int, path: str) -> FileResult:
        try:
            # O_NONBLOCK: a name swapped for a FIFO since the scan must not block the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return FileResult(None, f"cannot be read: {e.strerror}")
        with open(fd, "rb") as f:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return FileResult(None, "not a regular file")
            data = f.read()
            after = os.fstat(fd)
        unchanged = file_signature(before) == file_signature(after) and len(data) == after.st_size
        sha = hashlib.sha256(data).hexdigest()
        image, reason = validation.check_image(data, self.job.image_size, self.job.max_pixels)
        pack = offset = None
        if image is not None:
            os.pwrite(self.rows, np.ascontiguousarray(image).tobytes(), i * self.row_bytes)
            pack, offset = self.pack_name, self.pack.tell()
            self.pack.write(data)
        return FileResult(sha, reason, len(data), file_signature(after) if unchanged else None, pack, offset)

    def read_chunk(self, chunk: list[tuple[int, str]]) -> list[tuple[int, FileResult]]:
        results = [(i, self.read(i, path)) for i, path in chunk]
        self.pack.flush()  # complete on disk before the parent gets the results
        return results

    def close(self) -> None:
        self.pack.close()
        os.close(self.rows)


_worker: _Reader | None = None


def _start_worker(job: _Job) -> None:
    global _worker
    die_with_parent(job.parent_pid)  # a killed ingest leaves no worker behind
    _worker = _Reader(job)


def _worker_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, FileResult]]:
    return _worker.read_chunk(chunk)


def read_files(source, files: list[ImageFile], tmp: Path, settings: Settings,
               workers: int | None) -> list[FileResult]:
    """Every file read once (a file the scan found unreadable is not opened): its sha256, its
    verdict, its decoded row in ``tmp/rows.u8`` and its bytes in a pack under ``tmp/packs``."""
    todo = [(i, f.path) for i, f in enumerate(files) if not f.problem]
    results = [FileResult(None, f.problem) if f.problem else None for f in files]
    source.fetch([files[i] for i, _ in todo])
    (tmp / "packs").mkdir()
    with open(tmp / "rows.u8", "wb") as f:
        f.truncate(len(files) * settings.image_size ** 2)  # sparse: rows are written as they are decoded
    job = _Job(str(tmp), settings.image_size, settings.max_pixels, os.getpid())
    workers = min(workers or usable_cores(), max(1, len(todo) // 8))
    for i, r in progress(_read_all(todo, job, workers), len(todo), "ingest: read", "file"):
        results[i] = r
    return results


def _read_all(todo: list[tuple[int, str]], job: _Job, workers: int):
    if workers <= 1 or len(todo) < MIN_FILES_FOR_PROCESSES:
        reader = _Reader(job)
        try:
            for k in range(0, len(todo), 128):
                yield from reader.read_chunk(todo[k:k + 128])
        finally:
            reader.close()
        return
    import multiprocessing

    size = max(8, min(128, len(todo) // (workers * 8)))
    chunks = [todo[k:k + size] for k in range(0, len(todo), size)]
    # spawn: fresh interpreters, safe whatever threads this process runs (moto, minio, tqdm)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(job,))
    try:
        for future in as_completed([pool.submit(_worker_chunk, c) for c in chunks]):
            yield from future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # a failure stops the rest instead of running it to the end


# --- writing a version -------------------------------------------------------------------------------

@dataclass
class VersionWriter:
    """The dataset version being written: where it goes, what it is made of, and with which settings."""

    store: Store  # datasets/<sha>/
    source: LocalSource | S3Source
    classes: list[str]
    files: list[ImageFile]
    results: list[FileResult]
    settings: Settings
    tmp: Path  # rows.u8 and packs/ from read_files
    uploaded: int = 0

    def write(self) -> dict:
        """Write every object of the version; return its manifest, for ``publish``."""
        validation_sha, rejected = self.write_report()
        kept = [i for i, r in enumerate(self.results) if r.reason is None]
        splits, carved = self.check_and_split(kept)
        entries = self.entries(kept, splits)
        objects = {"validation.json": validation_sha, **self.write_packs(entries), **self.write_tensors(entries)}
        counts = {s: {c: sum(1 for e in entries if e["split"] == s and e["class"] == c) for c in self.classes}
                  for s in dict.fromkeys(e["split"] for e in entries)}
        manifest = {
            "format": FORMAT_VERSION, "source": self.source.data, "classes": self.classes,
            "image_size": self.settings.image_size, "test_carved_from_train": carved, "counts": counts,
            "settings": {"seed": self.settings.seed, "test_fraction": TEST_FRACTION, "min_side": validation.MIN_SIDE,
                         "max_pixels": self.settings.max_pixels, "on_invalid": self.settings.on_invalid},
            "files": entries, "rejected": len(rejected), "objects": objects,
            "patients_in_train_and_test": validation.patients_in_both(entries), "synthetic": self.source.synthetic,
        }
        manifest["checksum"] = manifest_checksum(manifest)
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


def summary(uri: str, sha: str, manifest: dict, uploaded: int) -> dict:
    return {
        "uri": uri, "sha": sha, "classes": manifest["classes"], "image_size": manifest["image_size"],
        "counts": manifest["counts"], "test_carved_from_train": manifest["test_carved_from_train"],
        "uploaded": uploaded, "synthetic": manifest["synthetic"],
    }
