"""Reading images, each file once: hashed, decoded (``validation.check_image``: fully, grayscale,
resized, within the pixel limit) and packed from the same bytes, in worker processes. ingest,
evaluate and predict all read through here, after ``sources`` has listed the files, so a file one
of them refuses the others refuse too, with the same reason.

    read_files             ingest's reader: rows, sha256s, packs of the original bytes
    read_labelled_folder   evaluate's folder (test/<class>/ or <class>/): every file must be accepted
    read_named             predict's files, folders and s3:// URIs: a refused file does not stop the rest
"""
from __future__ import annotations

import hashlib
import os
import secrets
import stat
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia_kfp import validation
from pneumonia_kfp.data import patient_id
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.params import max_pixels
from pneumonia_kfp.procs import die_with_parent, usable_cores
from pneumonia_kfp.scratch import scratch_dir
from pneumonia_kfp.sources import ImageFile, class_folders, file_signature, named_files
from pneumonia_kfp.telemetry import progress

MIN_FILES_FOR_PROCESSES = 256  # below this, starting worker processes costs more than it saves
REJECTED_REMEDY = "Fix or remove them: every file of the folder is scored."


@dataclass(frozen=True, slots=True)
class FileResult:
    """One file, read once."""

    sha: str | None  # None: it could not be read
    reason: str | None = None  # why it is refused; None: accepted, its row written and its bytes packed
    size: int = 0
    signature: tuple | None = None  # its stat, when nothing changed while it was read
    pack: str | None = None  # the pack holding its bytes, and where
    offset: int | None = None


# --- the reader: one read per file, in worker processes ---------------------------------------------------

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
    die_with_parent(job.parent_pid)  # a killed parent leaves no worker behind
    _worker = _Reader(job)


def _worker_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, FileResult]]:
    return _worker.read_chunk(chunk)


def read_files(files: list[ImageFile], tmp: Path, image_size: int, pixel_limit: int, workers: int | None = None,
               label: str = "read") -> list[FileResult]:
    """Every file read once from its local ``path`` (one the listing found unreadable is not opened): its
    sha256, its verdict, its decoded row in ``tmp/rows.u8`` and its bytes in a pack under ``tmp/packs``.
    ``workers``: processes (default: the usable cores); ``label``: the progress line's."""
    todo = [(i, f.path) for i, f in enumerate(files) if not f.problem]
    results = [FileResult(None, f.problem) if f.problem else None for f in files]
    (tmp / "packs").mkdir(parents=True)
    with open(tmp / "rows.u8", "wb") as f:
        f.truncate(len(files) * image_size ** 2)  # sparse: rows are written as they are decoded
    job = _Job(str(tmp), image_size, pixel_limit, os.getpid())
    workers = min(workers or usable_cores(), max(1, len(todo) // 8))
    for i, r in progress(_read_all(todo, job, workers), len(todo), label, "file"):
        results[i] = r
    return results


def rows(tmp: Path, n: int, image_size: int) -> np.ndarray:
    """The uint8 N×1×S×S images ``read_files`` decoded into ``tmp`` (a refused file's row is zeros)."""
    return np.fromfile(tmp / "rows.u8", dtype=np.uint8, count=n * image_size ** 2).reshape(n, 1, image_size,
                                                                                          image_size)


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


# --- evaluate's and predict's folders ----------------------------------------------------------------------

def read_labelled_folder(data: str, image_size: int, classes: list[str]) -> tuple[np.ndarray, np.ndarray,
                                                                                  list[dict]]:
    """A folder to score (evaluate): its ``test/`` split when it has one, else its class folders; local or
    an s3:// prefix. Listed by ``sources`` and read by ``read_files``, as ingest lists and reads, so
    whatever ingest refuses is refused here; every file must be accepted (a one-line error names the
    refused ones). Returns uint8 N×1×S×S images, labels (indices into ``classes``) and entries (path,
    patient, class)."""
    with scratch_dir("external-") as tmp:
        found, files = class_folders(data, Path(tmp) / "source")
        base = f"{data}/test" if any(f.relpath.startswith("test/") for f in files) else data
        unknown = sorted(set(found) - set(classes))
        if not found or unknown:
            raise DataError(f"{base} has class folders {found}: expected some of {classes} (the model's classes), "
                            f"in {data}/test/<class>/ or {data}/<class>/")
        for c in found:
            if not any(f.label == c for f in files):  # as ingest: an empty class folder is a mistake
                raise DataError(f"{base}/{c} holds no images: put the class's images in it or remove it")
        results = read_files(files, Path(tmp) / "read", image_size, max_pixels(), label="evaluate: read")
        rejected = [{"path": f.relpath, "reason": r.reason} for f, r in zip(files, results, strict=True) if r.reason]
        if rejected:
            raise validation.rejection_error(rejected, len(files), REJECTED_REMEDY)
        images = rows(Path(tmp) / "read", len(files), image_size)
    entries = [{"path": f.relpath, "patient": patient_id(f.name), "class": f.label} for f in files]
    labels = np.array([classes.index(f.label) for f in files], dtype=np.int64)
    return images, labels, entries


def read_named(args: list[str], image_size: int) -> tuple[list[ImageFile], list[FileResult], np.ndarray]:
    """predict's images: every file its arguments name (``sources.named_files``), read by ``read_files``;
    a refused file carries its reason and does not stop the others. Returns the files (``relpath``: as
    named), their results and the uint8 N×1×S×S images (a refused file's row is zeros)."""
    with scratch_dir("predict-") as tmp:
        files = named_files(args, Path(tmp) / "s3")
        results = read_files(files, Path(tmp) / "read", image_size, max_pixels(), label="predict: read")
        images = rows(Path(tmp) / "read", len(files), image_size)
    return files, results, images
