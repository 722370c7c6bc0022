"""Writing output files: whole or not at all.

Every output file (results.json, the reports, predictions.csv, metadata.json, the exported models) is
written under a temporary name in its own directory and renamed over the final name only once it is
complete, so a full disk or a killed process leaves the previous file or none -- never a cut one. A
full disk is one line naming the file and, where known, the bytes it needed. JSON documents are
written strictly (``allow_nan=False``): NaN is not JSON, and an undefined figure is ``null``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path

from pneumonia_kfp.errors import PneumoniaKfpError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(PneumoniaKfpError):
    """An output file could not be written (a full disk, a read-only folder)."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def document(obj, indent: int | None = 1) -> str:
    """``obj`` as strict JSON: a NaN or infinity raises ValueError instead of writing invalid JSON."""
    return json.dumps(obj, indent=indent, allow_nan=False)


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_error(path: Path, e: OSError, needed: int | None = None) -> OutputError:
    """A one-line error for a failed write of ``path``."""
    if e.errno in DISK_FULL:
        free = _free_bytes(path.parent)
        size = f"{needed:,} bytes needed, " if needed is not None else ""
        room = f"{free:,} free" if free is not None else "free space unknown"
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return OutputError(f"cannot write {path}: {what} ({size}{room}); free some space or choose another "
                           "output folder", e.errno)
    return OutputError(f"cannot write {path}: {e.strerror or e}", e.errno)


PARTIAL = ".partial-"  # in every temporary name: hidden, then this, the writer's PID, a random part


def _temporary(path: Path) -> Path:
    # hidden, beside the file (the same filesystem, so the rename is atomic), with its suffix kept; the PID
    # lets run-local remove a killed run's partial files from its OUT
    return path.with_name(f".{path.stem}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NEARLY_FULL = 64 * 1024  # bytes free under which a writer's failure is taken for a full disk


@contextlib.contextmanager
def replacing(path: str | Path, needed: int | None = None):
    """Yields a temporary path beside ``path`` for a writer that takes a file name (torch.save, onnx.save):
    on success it replaces ``path``; on any error it is removed and ``path`` is left as it was. A full
    disk becomes a one-line OutputError, also when the writer reports it as something other than
    OSError (torch's zip writer raises RuntimeError "file write failed")."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e, needed) from e
    except Exception as e:
        free = _free_bytes(path.parent)  # before the partial file goes
        _remove(tmp)
        if free is not None and free < NEARLY_FULL:
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed) from e
        raise
    except BaseException:
        _remove(tmp)
        raise


def write_files(files: dict[str | Path, str | bytes]) -> None:
    """Write every file of ``files`` ({path: content}) under a temporary name, then rename them all:
    when any cannot be written, none is replaced (each keeps its previous content, or stays absent)."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            data = content.encode() if isinstance(content, str) else content
            tmp = _temporary(path)
            written.append((tmp, path))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                for t, _ in written:  # first: the free space the message gives is what they took no more
                    _remove(t)
                raise write_error(path, e, len(data)) from e
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            _remove(tmp)
        raise


def write_file(path: str | Path, content: str | bytes) -> None:
    write_files({path: content})
