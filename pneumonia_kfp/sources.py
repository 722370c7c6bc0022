"""Where images come from, listed without opening a file: an ImageFolder on local disk or under an
s3:// prefix (ingest), a folder of class folders (evaluate), the files and folders predict is given.

A local file costs one ``stat`` (``os.scandir``); anything that is not a regular file (FIFO, socket,
device), a symlink loop or a symlink leaving the root given is listed with the reason it cannot be
read, and never opened. A split or class folder that resolves outside the root is an error. An s3://
object costs its line in the listing (size and ETag); it is downloaded only when it must be read.
Reading the files is ``image_reader``'s.
"""
from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pneumonia_kfp.errors import DataError
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.synthetic import MARKER
from pneumonia_kfp.telemetry import progress

SPLITS = ("train", "val", "test")  # an ImageFolder's split folders


@dataclass(frozen=True, slots=True)
class ImageFile:
    split: str
    label: str  # its class name
    path: str  # on local disk (a str, not a Path: ingest makes tens of thousands)
    relpath: str  # split/class/name, the same in the store
    stat: tuple | None = None  # (size, mtime_ns, ctime_ns, inode) of what the name leads to, from the scan
    problem: str | None = None  # why it cannot be read at all, found without opening it

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


# --- an ImageFolder on local disk ----------------------------------------------------------------------

def scan_image_folder(root: str | Path) -> tuple[list[str], list[ImageFile]]:
    """Classes (sorted folder names, the same in every split) and the image files, sorted, of
    ``root/{train,val,test}/<class>/``."""
    root = _folder(root)
    real_root = os.path.realpath(root)
    tree: dict[str, dict[str, list[os.DirEntry]]] = {}
    for s in SPLITS:
        if (root / s).is_dir():
            _check_inside(root / s, real_root, root)
            tree[s] = _class_folders(root / s, real_root, root)
    classes = check_layout(str(root), {s: {c: len(es) for c, es in cs.items()} for s, cs in tree.items()})
    return classes, [ImageFile(s, c, e.path, f"{s}/{c}/{e.name}", *_stat(e, real_root))
                     for s, by_class in tree.items() for c in classes for e in by_class[c]]


def scan_class_folders(root: str | Path) -> tuple[list[str], list[ImageFile]]:
    """A folder to score (evaluate): ``root/test/<class>/`` when there is a ``test/`` folder, else
    ``root/<class>/``. Class names (sorted) and the files, checked as ``scan_image_folder`` checks them.
    Files directly in the folder beside the class folders are ignored; a class folder with no files
    gives none (the caller, which knows which class names are expected, says what is wrong)."""
    root = _folder(root)
    real_root = os.path.realpath(root)
    split, base = ("test", root / "test") if (root / "test").is_dir() else ("", root)
    _check_inside(base, real_root, root)
    folders = _class_folders(base, real_root, root)
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
    check_every_class(where, counts, classes, "holds no images")
    return classes


def check_every_class(where: str, counts: dict[str, dict[str, int]], classes: list[str], why: str) -> None:
    """Every split present needs at least one image of every class ({split: {class: images}})."""
    for s in SPLITS:
        for c in classes if s in counts else ():
            if not counts[s].get(c):
                raise DataError(f"{where}/{s}/{c} {why}: every split needs at least one image of every class")


def _folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    return root


def _class_folders(base: Path, real_root: str, root: Path) -> dict[str, list[os.DirEntry]]:
    """{class: its file entries} of the folders in ``base``, each checked to lie inside the root."""
    folders = {}
    for d in _visible(base):
        if _is_class_folder(d, real_root):
            _check_inside(Path(d.path), real_root, root)
            folders[d.name] = [e for e in _visible(d.path) if e.is_symlink() or not e.is_dir()]
    return folders


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
DIRECTORY = "not a regular file (a directory)"


def _stat(e, real_root: str) -> tuple[tuple | None, str | None]:
    """(size, mtime_ns, ctime_ns, inode) of a regular file, or (None, why it cannot be read). ``e``: an
    ``os.DirEntry`` or a ``_Named`` path."""
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


class _Named:
    """What ``_stat`` reads of a directory entry, for a path given by name."""

    def __init__(self, path: str):
        self.path = path

    def stat(self):
        return os.stat(self.path)

    def is_symlink(self) -> bool:
        return os.path.islink(self.path)


# --- the sources ingest reads ----------------------------------------------------------------------------

class LocalSource:
    """An ImageFolder on local disk."""

    def __init__(self, root: Path, data: str):
        self.root, self.data = root, data
        self.uri = os.path.realpath(root)
        self.synthetic = (root / MARKER).is_file()

    def scan(self) -> tuple[list[str], list[ImageFile]]:
        return scan_image_folder(self.root)

    def signature(self, f: ImageFile, result=None) -> tuple | None:
        """The file's stat as the scan saw it; once read (``result``, an ``image_reader.FileResult``), as its
        reading saw it: None when it changed meanwhile."""
        return result.signature if result is not None else f.stat

    def fetch(self, files: list[ImageFile], label: str = "download") -> None:
        pass  # already here


class S3Source:
    """An ImageFolder under an s3:// prefix: listed with ETags; downloaded only when files must be read."""

    def __init__(self, data: str, workdir: Path):
        self.data, self.uri, self.workdir = data, data.rstrip("/"), workdir
        self.store = open_store(data)
        self.etags = self.store.signatures()
        self.synthetic = MARKER in self.etags

    def scan(self) -> tuple[list[str], list[ImageFile]]:
        if not self.etags:
            raise DataError(f"{self.data} holds no files")
        return image_folder_from_keys(sorted(self.etags), self.uri, self.workdir)

    def signature(self, f: ImageFile, result=None) -> tuple | None:
        """The object's size and ETag from the listing."""
        sig = self.etags.get(f.relpath)
        return tuple(sig) if sig else None

    def fetch(self, files: list[ImageFile], label: str = "download") -> None:
        """Download ``files`` (their relpath: the key) to their path; ``label``: the progress line's."""
        with ThreadPoolExecutor(16) as pool:  # network-bound: threads overlap the requests
            list(progress(pool.map(lambda f: self.store.get_file(f.relpath, f.path), files), len(files), label,
                          "file"))


def open_source(data: str, workdir: Path) -> LocalSource | S3Source:
    """The source ``data`` names; an s3:// one downloads what must be read into ``workdir``."""
    if data.startswith("s3://"):
        return S3Source(data, workdir)
    if "://" in data and not data.startswith("file://"):
        raise DataError(f"data source {data!r}: use a local directory, file:///dir or s3://bucket/prefix")
    return LocalSource(Path(data.removeprefix("file://")).expanduser(), data)


# --- the folders evaluate and predict read -----------------------------------------------------------------

def class_folders(data: str, workdir: Path) -> tuple[list[str], list[ImageFile]]:
    """``scan_class_folders`` of a local folder or an s3:// prefix; an s3:// prefix's ``<class>/<name>``
    or (when it has any) ``test/<class>/<name>`` objects are downloaded into ``workdir`` first, then
    scanned there as a local folder."""
    source = open_source(data, workdir)
    if isinstance(source, LocalSource):
        return scan_class_folders(source.root)
    keys = [k for k in source.etags if 2 <= k.count("/") + 1 <= 3]  # <class>/<name>, test/<class>/<name>
    if not keys:
        raise DataError(f"{data} holds no files in <class>/ or test/<class>/ folders")
    if any(k.startswith("test/") for k in keys):
        keys = [k for k in keys if k.startswith("test/")]
    source.fetch([ImageFile("", "", str(workdir / k), k) for k in keys])
    return scan_class_folders(workdir)


def named_files(args: list[str], workdir: Path) -> list[ImageFile]:
    """The files predict's arguments name, in order: a file, every file under a folder (hidden ones left
    out) or an s3:// object or prefix (downloaded into ``workdir``). Each is shown (``relpath``) as the
    argument names it; one that cannot be read carries its reason."""
    files = []
    for k, arg in enumerate(args):
        files += _s3_files(arg, workdir / str(k)) if arg.startswith("s3://") else _local_files(arg)
    return files


def _named(path: str, shown: str, st: tuple | None = None, problem: str | None = None) -> ImageFile:
    return ImageFile("", "", path, shown, st, problem)


def _local_files(arg: str) -> list[ImageFile]:
    """The file an argument names, or every file under a folder, as the scan of a folder sees them
    (one stat each, a symlink leading out of the folder refused)."""
    path = arg.removeprefix("file://")
    if not os.path.lexists(path):
        return [_named(path, arg, None, "does not exist")]
    if not os.path.isdir(path):
        return [_named(path, arg, *_stat(_Named(path), os.path.realpath(path)))]
    real_root, found, seen = os.path.realpath(path), [], {os.path.realpath(path)}

    def walk(folder: str, shown: str) -> None:
        for e in _visible(folder):
            name = f"{shown.rstrip('/')}/{e.name}"
            st, problem = _stat(e, real_root)
            if problem == DIRECTORY:
                real = os.path.realpath(e.path)
                if real not in seen:  # a folder, or a symlink to one inside the root, visited once
                    seen.add(real)
                    walk(e.path, name)
                continue
            found.append(_named(e.path, name, st, problem))

    walk(path, arg)
    return found or [_named(path, arg, None, "a folder holding no files")]


def _s3_files(uri: str, workdir: Path) -> list[ImageFile]:
    """The objects an s3:// URI names (one object, or every object under a prefix), downloaded into ``workdir``."""
    source = S3Source(uri, workdir)
    keys = sorted(k for k in source.etags if not any(p.startswith(".") for p in k.split("/")))
    if not keys:  # not a prefix: perhaps one object
        parent, _, name = uri.rstrip("/").rpartition("/")
        if parent.count("/") >= 2:  # s3://bucket/name at least
            source = S3Source(parent, workdir)
            keys = [name] if name in source.etags else []
    if not keys:
        return [_named(str(workdir), uri, None, "no such object, and no objects under it as a prefix")]
    source.fetch([_named(str(workdir / k), k) for k in keys])  # relpath: the key
    return [_named(str(workdir / k), f"{source.uri}/{k}") for k in keys]
