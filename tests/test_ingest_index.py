"""The re-ingest index (git's index for ingest), tested directly with hand-made signatures: a file
is trusted without being read only while every part of its signature is what was recorded. Through
real files a key that ignored the size or the mtime would still pass (a local rewrite changes ctime
and inode anyway), so each part is changed here alone."""
import hashlib

import pytest

from pneumonia_kfp.image_reader import FileResult
from pneumonia_kfp.source_index import RACY_NS, Index
from pneumonia_kfp.sources import ImageFile, LocalSource, S3Source
from pneumonia_kfp.storage import open_store

SHA = hashlib.sha256(b"image").hexdigest()
LOCAL_SIG = (1234, 1_700_000_000_000_000_000, 1_700_000_000_500_000_000, 98765)  # size, mtime, ctime, inode
S3_SIG = [1234, "9b2cf535f27731c974343645a3985328"]  # size, ETag


@pytest.fixture
def index(tmp_path):
    return Index.load(open_store((tmp_path / "store").as_uri()), "/data")


def _local(tmp_path, sig) -> tuple[LocalSource, ImageFile]:
    return LocalSource(tmp_path, str(tmp_path)), ImageFile("train", "NORMAL", "/x", "train/NORMAL/a.jpeg", stat=sig)


def _s3(sig) -> tuple[S3Source, ImageFile]:
    source = object.__new__(S3Source)  # no listing: its ETags are given by hand
    source.etags = {"train/NORMAL/a.jpeg": sig}
    return source, ImageFile("train", "NORMAL", "/x", "train/NORMAL/a.jpeg")


def test_a_local_file_is_trusted_only_while_size_mtime_ctime_and_inode_all_match(index, tmp_path):
    index.files["train/NORMAL/a.jpeg"] = [*LOCAL_SIG, SHA]
    assert index.known([_local(tmp_path, LOCAL_SIG)[1]], _local(tmp_path, LOCAL_SIG)[0]) == [SHA]
    for part in range(4):  # size, mtime, ctime, inode: each one alone changed
        changed = list(LOCAL_SIG)
        changed[part] += 1
        source, f = _local(tmp_path, tuple(changed))
        assert index.known([f], source) == [None], f"a change of part {part} alone went unseen"
    source, f = _local(tmp_path, None)  # no stat (it changed while scanned): read it
    assert index.known([f], source) == [None]


def test_an_s3_file_is_trusted_only_while_size_and_etag_both_match(index):
    index.files["train/NORMAL/a.jpeg"] = [*S3_SIG, SHA]
    assert index.known([_s3(S3_SIG)[1]], _s3(S3_SIG)[0]) == [SHA]
    source, f = _s3([S3_SIG[0] + 1, S3_SIG[1]])
    assert index.known([f], source) == [None]  # the size alone changed
    source, f = _s3([S3_SIG[0], S3_SIG[1][:-1] + "0"])
    assert index.known([f], source) == [None]  # the ETag alone changed
    source, f = _s3(None)
    source.etags = {}
    assert index.known([f], source) == [None]  # not listed any more


def test_unknown_and_unreadable_files(index, tmp_path):
    source, f = _local(tmp_path, LOCAL_SIG)
    assert index.known([f], source) == [None]  # never recorded
    bad = ImageFile("train", "NORMAL", "/x", "train/NORMAL/b.jpeg", problem="a FIFO, not a file")
    assert index.known([bad], source) == ["!a FIFO, not a file"]


def test_record_keeps_the_signature_seen_while_reading_and_skips_racy_files(index, tmp_path):
    source = LocalSource(tmp_path, str(tmp_path))
    files = [ImageFile("train", "NORMAL", "/x", f"train/NORMAL/{n}.jpeg") for n in "abcd"]
    scan_start = LOCAL_SIG[1] + 10 * RACY_NS
    racy = (LOCAL_SIG[0], scan_start - RACY_NS // 2, LOCAL_SIG[2], LOCAL_SIG[3])  # changed just before the scan
    results = [FileResult(SHA, signature=LOCAL_SIG), FileResult(SHA, signature=racy),
               FileResult(SHA, signature=None), FileResult(None, "cannot be read")]
    index.files["train/NORMAL/c.jpeg"] = [*LOCAL_SIG, SHA]  # an older entry for a file now changing
    index.record(files, results, source, scan_start)
    assert index.files == {"train/NORMAL/a.jpeg": [*LOCAL_SIG, SHA]}
    index.save()
    again = Index.load(index.store, "/data")
    assert again.files == {"train/NORMAL/a.jpeg": [*LOCAL_SIG, SHA]}
    assert Index.load(index.store, "/other-source").files == {}  # one index per source


def test_record_for_s3_keeps_size_and_etag(index):
    source, f = _s3(S3_SIG)
    index.record([f], [FileResult(SHA, signature=None)], source, scan_start=0)
    assert index.files == {"train/NORMAL/a.jpeg": [*S3_SIG, SHA]}
    assert index.known([f], source) == [SHA]
