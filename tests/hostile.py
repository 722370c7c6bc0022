"""Hostile files for the tests of every command that reads a folder of images (ingest, evaluate, predict):
made once here, so each command is tested against the same cases."""
import contextlib
import os
import socket
import stat
import struct
import zlib
from pathlib import Path


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height pixels and holds none (a decompression-bomb header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@contextlib.contextmanager
def special_files(folder: Path):
    """In ``folder``: a FIFO, a symlink to it, a bound Unix socket, a symlink loop, a dangling symlink, a
    decompression-bomb header and a device (a symlink to one without root); yields {name: reason}."""
    os.mkfifo(folder / "fifo.jpeg")
    os.symlink(folder / "fifo.jpeg", folder / "link-to-fifo.jpeg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.jpeg"))
    os.symlink(folder / "loop-b.jpeg", folder / "loop-a.jpeg")
    os.symlink(folder / "loop-a.jpeg", folder / "loop-b.jpeg")
    os.symlink(folder / "gone.jpeg", folder / "dangling.jpeg")
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    expected = {
        "fifo.jpeg": "not a regular file (a FIFO)",
        "link-to-fifo.jpeg": "not a regular file (a FIFO)",
        "socket.jpeg": "not a regular file (a socket)",
        "loop-a.jpeg": "symlink loop",
        "loop-b.jpeg": "symlink loop",
        "dangling.jpeg": "broken symlink (its target does not exist)",
        "bomb.png": "too large: 30000x30000 px = 900 MP, over the pixel limit of 50 MP (PNEUMONIA_KFP_MAX_PIXELS)",
    }
    if os.geteuid() == 0:  # a device node needs root to make; without root, a symlink to one (outside the root)
        os.mknod(folder / "device.jpeg", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        expected["device.jpeg"] = "not a regular file (a character device)"
    else:
        os.symlink("/dev/zero", folder / "device.jpeg")
        expected["device.jpeg"] = "symlink pointing outside the data root"
    try:
        yield expected
    finally:
        sock.close()
