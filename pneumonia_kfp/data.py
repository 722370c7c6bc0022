"""The dataset on disk and in the store: ImageFolder scanning, patient ids, grouped splits, tensors."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pneumonia_kfp.errors import DataError  # noqa: F401  (re-exported: the data module's error)

SPLITS = ("train", "val", "test")
# Kermany file names: PNEUMONIA "person1_bacteria_1.jpeg", NORMAL "IM-0115-0001.jpeg" and
# "NORMAL2-IM-1427-0001.jpeg". Anything else is treated as its own patient.
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))


@dataclass(frozen=True, slots=True)
class ImageFile:
    split: str
    label: str
    path: str  # on local disk (a str, not a Path: ingest makes tens of thousands)
    relpath: str  # split/class/name, the same in the store
    stat: tuple | None = None  # (size, mtime_ns, ctime_ns, inode) of what the name leads to, from the scan
    problem: str | None = None  # why it cannot be read at all, found without opening it

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[1]


def patient_id(file_name: str) -> str | None:
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(file_name)
        if m:
            return m.group(1)
    return None


def scan_image_folder(root: str | Path) -> tuple[list[str], list[ImageFile]]:
    """Classes (sorted folder names, the same in every split) and the image files, sorted.

    One ``stat`` per file (``os.scandir``), none opened: anything that is not a regular file
    (FIFO, socket, device), a symlink loop or a symlink leaving the data root is listed with the
    reason it cannot be read. A split or class folder that resolves outside the root is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    real_root = os.path.realpath(root)
    tree: dict[str, dict[str, list[os.DirEntry]]] = {}
    for s in SPLITS:
        if (root / s).is_dir():
            _check_inside(root / s, real_root, root)
            tree[s] = {}
            for d in _visible(root / s):
                if _is_class_folder(d, real_root):
                    _check_inside(Path(d.path), real_root, root)
                    tree[s][d.name] = [e for e in _visible(d.path) if e.is_symlink() or not e.is_dir()]
    classes = check_layout(str(root), {s: {c: len(es) for c, es in cs.items()} for s, cs in tree.items()})
    files = []
    for s, by_class in tree.items():
        for c in classes:
            for e in by_class[c]:
                st, problem = _stat(e, real_root)
                files.append(ImageFile(s, c, e.path, f"{s}/{c}/{e.name}", st, problem))
    return classes, files


def scan_class_folders(root: str | Path) -> tuple[list[str], list[ImageFile]]:
    """A folder to score (evaluate): ``root/test/<class>/`` when there is a ``test/`` folder, else
    ``root/<class>/``. Class names (sorted) and the files, checked as ``scan_image_folder`` checks them:
    one ``stat`` each, none opened, each unreadable one listed with its reason; a test or class folder
    resolving outside the root, or a class folder that is a symlink loop or leads nowhere, is an error.
    Files directly in the folder beside the class folders are ignored; a class folder with no files
    gives none (the caller, which knows which class names are expected, says what is wrong)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    real_root = os.path.realpath(root)
    split, base = ("test", root / "test") if (root / "test").is_dir() else ("", root)
    _check_inside(base, real_root, root)
    folders = {}
    for d in _visible(base):
        if _is_class_folder(d, real_root):
            _check_inside(Path(d.path), real_root, root)
            folders[d.name] = [e for e in _visible(d.path) if e.is_symlink() or not e.is_dir()]
    prefix = f"{split}/" if split else ""
    files = [ImageFile(split or "test", c, e.path, f"{prefix}{c}/{e.name}", *_stat(e, real_root))
             for c in sorted(folders) for e in folders[c]]
    return sorted(folders), files


def image_folder_from_keys(keys: list[str], where: str, root: Path) -> tuple[list[str], list[ImageFile]]:
    """The same as ``scan_image_folder`` for object keys ``split/class/name`` (an s3:// source);
    each file's path is ``root/key``, where it is downloaded to."""
    tree: dict[str, dict[str, list[str]]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] in SPLITS and not any(p.startswith(".") for p in parts):
            tree.setdefault(parts[0], {}).setdefault(parts[1], []).append(parts[2])
    classes = check_layout(where, {s: {c: len(ns) for c, ns in cs.items()} for s, cs in tree.items()})
    files = [ImageFile(s, c, f"{root}/{s}/{c}/{n}", f"{s}/{c}/{n}")
             for s in SPLITS if s in tree for c in classes for n in sorted(tree[s][c])]
    return classes, files


def check_layout(where: str, counts: dict[str, dict[str, int]]) -> list[str]:
    """The classes of an ImageFolder given {split: {class: files}}; a DataError for a malformed one."""
    if "train" not in counts:
        raise DataError(
            f"{where} has no train/ folder: expected ImageFolder layout "
            f"{where}/{{train,val,test}}/<class>/<image>"
        )
    classes = sorted(counts["train"])
    if len(classes) < 2:
        raise DataError(f"{where}/train has {len(classes)} class folder(s) {classes}: need at least 2")
    for s in SPLITS:
        if s in counts and sorted(counts[s]) != classes:
            raise DataError(f"{where}/{s} has class folders {sorted(counts[s])}, but train has {classes}: "
                            "make them match")
        for c in classes if s in counts else ():
            if not counts[s][c]:
                raise DataError(f"{where}/{s}/{c} holds no images: every split needs at least one image of "
                                "every class")
    return classes


def _is_class_folder(d: os.DirEntry, real_root: str) -> bool:
    """Whether an entry beside the class folders is a folder. A symlink there that leads nowhere (a
    loop, a dangling link) is an error: it would leave a class out silently (and a loop makes
    ``DirEntry.is_dir`` raise)."""
    try:
        if d.is_dir():
            return True
    except OSError:
        pass
    why = _stat(d, real_root)[1] if d.is_symlink() else None
    if why and why.startswith(("symlink loop", "broken", "cannot")):
        raise DataError(f"{d.path} is a {why}, where a class folder was expected: replace it with the folder "
                        "of images or remove it")
    return False


def _visible(folder) -> list[os.DirEntry]:
    """Entries of ``folder`` by name, hidden ones (.DS_Store, ...) left out."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _inside(real_path: str, real_root: str) -> bool:
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


def _check_inside(folder: Path, real_root: str, root: Path) -> None:
    real = os.path.realpath(folder)
    if not _inside(real, real_root):
        raise DataError(f"{folder} resolves to {real}, outside the data root {root}: "
                        "copy or move the images under the data root")


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def _stat(e: os.DirEntry, real_root: str) -> tuple[tuple | None, str | None]:
    """(size, mtime_ns, ctime_ns, inode) of a regular file, or (None, why it cannot be read)."""
    try:
        st = e.stat()  # follows a symlink: ELOOP for a loop
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "symlink loop"
        if err.errno == errno.ENOENT:
            return None, "broken symlink (its target does not exist)"
        return None, f"cannot be read: {err.strerror}"
    if e.is_symlink() and not _inside(os.path.realpath(e.path), real_root):
        return None, "symlink pointing outside the data root"
    if not stat.S_ISREG(st.st_mode):
        return None, f"not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')})"
    return file_signature(st), None


def file_signature(st: os.stat_result) -> tuple:
    """What git's index keeps to tell a file changed without reading it: size, times, inode."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


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


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest without its own ``checksum`` field (canonical JSON)."""
    return sha256_of_chunks(canonical_json({k: v for k, v in manifest.items() if k != "checksum"}))


def read_manifest(store, verify: bool = True) -> dict | None:
    """A version's manifest, verified (unless the caller knows it is); None when there is none (the
    version is not complete)."""
    if not store.exists("manifest.json"):
        return None
    try:
        manifest = json.loads(store.get_bytes("manifest.json"))
        ok = isinstance(manifest, dict) and (not verify or manifest.get("checksum") == manifest_checksum(manifest))
    except ValueError:
        ok = False
    if not ok:
        raise IntegrityError(f"{store.uri_of('manifest.json')} is damaged (its checksum does not match its "
                             f"content). {repair_hint(store.uri)}")
    return manifest


def repair_hint(version_uri: str, manifest: dict | None = None) -> str:
    """How to repair a damaged version: ingest the same data with the same settings again."""
    storage = version_uri.rsplit("/datasets/", 1)[0]
    if manifest is None:
        return (f"Repair it in place by ingesting the same data again with the same settings: "
                f"pneumonia-kfp ingest --data SOURCE --storage {storage} ...")
    s = manifest.get("settings", {})
    flags = f" --image-size {manifest['image_size']} --seed {s.get('seed', 0)}"
    flags += " --on-invalid skip" if manifest.get("rejected") else ""
    return (f"Repair it in place by ingesting the same data again: "
            f"pneumonia-kfp ingest --data {manifest['source']} --storage {storage}{flags}")


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
        from pneumonia_kfp.storage import open_store

        self.uri = uri
        self.store = open_store(uri)
        manifest = read_manifest(self.store)
        if manifest is None:
            raise DataError(f"{uri} holds no complete dataset (no manifest.json): run ingest first")
        self.manifest = manifest
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
        from pneumonia_kfp.storage import StorageError

        hint = repair_hint(self.uri, self.manifest)
        try:
            data = fetch()
        except StorageError as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise IntegrityError(f"{self.store.uri_of(key)} is missing from the dataset version. {hint}") \
                    from None
            raise
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
