"""Output files are written whole or not at all; a full disk is one line; documents are strict JSON.

The write failures here are injected (a file object that stops with ENOSPC part-way); the real small
filesystem runs in tests/test_evaluate_inputs.py."""
import errno
import io
import json
import math

import pytest

from pneumonia_kfp import outputs
from pneumonia_kfp.outputs import OutputError, document, replacing, write_file, write_files
from pneumonia_kfp.report import write_outputs


class _Full(io.BufferedWriter):
    """A file that takes ``room`` bytes and then fails with ENOSPC, as a full disk does."""

    room = 10

    def write(self, data):
        left = self.room - self.tell()
        if len(data) > left:
            super().write(data[:max(left, 0)])
            super().flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


@pytest.fixture
def full_disk(monkeypatch):
    """Every file that outputs opens holds 10 bytes at most."""
    real_open = open

    def opening(path, mode="r", *args, **kwargs):
        if "w" in mode:
            return _Full(real_open(path, mode, buffering=0))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(outputs, "open", opening, raising=False)


def test_write_files_replaces_every_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    write_files({tmp_path / "a.txt": "new a", tmp_path / "b.bin": b"\x00\x01"})
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_a_full_disk_keeps_the_previous_files_and_says_so_in_one_line(tmp_path, full_disk):
    (tmp_path / "results.json").write_text("previous")
    with pytest.raises(OutputError) as e:
        write_files({tmp_path / "results.json": "short", tmp_path / "report.html": "x" * 1000})
    message = str(e.value)
    assert message.startswith(f"cannot write {tmp_path / 'report.html'}: no space left on the device (1,000 bytes "
                              "needed, ") and " free)" in message and "\n" not in message
    assert e.value.errno == errno.ENOSPC
    # the first file was complete but is not renamed either: all or none
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"results.json": "previous"}


def test_a_full_disk_on_the_first_file_leaves_nothing(tmp_path, full_disk):
    with pytest.raises(OutputError, match="no space left"):
        write_file(tmp_path / "report.html", "y" * 100)
    assert list(tmp_path.iterdir()) == []


def test_replacing_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match=f"cannot write {target}: no space left on the device \\(5 bytes needed"):
        with replacing(target, needed=5) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".pt2" and tmp.name.startswith(".model.")
            tmp.write_bytes(b"ha")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"] and target.read_bytes() == b"old"
    with replacing(target) as tmp:
        tmp.write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"] and target.read_bytes() == b"new"


def test_replacing_passes_on_other_errors_untouched(tmp_path):
    with pytest.raises(KeyError):
        with replacing(tmp_path / "x.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise KeyError("a bug, not the disk")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_hides_enospc_on_a_nearly_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as RuntimeError("file write failed"): told by the free space."""
    monkeypatch.setattr(outputs, "_free_bytes", lambda folder: 100)
    with pytest.raises(OutputError, match=r"cannot write .*checkpoint\.pt: no space left on the device \(100 free\)"):
        with replacing(tmp_path / "checkpoint.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(outputs, "_free_bytes", lambda folder: outputs.NEARLY_FULL)
    with pytest.raises(RuntimeError):  # room enough: not the disk
        with replacing(tmp_path / "checkpoint.pt"):
            raise RuntimeError("file write failed")


def test_documents_are_strict_json():
    assert json.loads(document({"auc": None, "n": 3})) == {"auc": None, "n": 3}
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            document({"auc": bad})


def test_write_outputs_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_outputs(tmp_path / "out", {"auc": math.nan}, "md", "html", "csv")
    assert list((tmp_path / "out").iterdir()) == []
    write_outputs(tmp_path / "out", {"auc": None}, "md", "html", "csv")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"auc": None}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.csv", "report.html", "report.md",
                                                                     "results.json"]


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'out'}: "):
        write_outputs(tmp_path / "out", {}, "md", "html", "csv")


def test_a_full_quota_is_named_as_such(tmp_path):
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'a.json'}: disk quota exceeded \\(3 bytes"):
        with replacing(tmp_path / "a.json", needed=3):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
