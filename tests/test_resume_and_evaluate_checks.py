"""Resume verifies last.pt before using it; evaluate refuses a test split without both classes."""
import hashlib
import io
import logging
import re
import shutil

import pytest
import torch

from pneumonia_kfp import resume, validation
from pneumonia_kfp.data import DataError
from pneumonia_kfp.evaluation import evaluate
from pneumonia_kfp.ingest import ingest
from pneumonia_kfp.storage import open_store


@pytest.fixture
def states(tmp_path):
    store = open_store((tmp_path / "checkpoints").as_uri())
    state = {"epoch": 2, "model": {"w": torch.arange(4096, dtype=torch.float32)}, "history": [{"epoch": 1}]}
    resume.save(store, state)
    return store, state, tmp_path / "checkpoints" / "last.pt"


def test_a_saved_state_loads_back(states):
    store, state, _ = states
    loaded = resume.load(store)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_a_state_saved_on_a_gpu_loads_on_the_cpu(states, monkeypatch):
    """Every tensor comes back on the CPU, whatever device saved it (each load_state_dict then moves its
    own: the optimizer's step counts, left on a GPU, would be read back every step)."""
    store, state, _ = states
    with monkeypatch.context() as m:  # torch.save records each tensor's device: here, a GPU's
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        resume.save(store, {**state, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}})
    loaded = resume.load(store)
    assert loaded["optimizer"]["state"][0]["step"].device.type == "cpu" and loaded["model"]["w"].device.type == "cpu"


def checksummed(body: bytes) -> bytes:
    """last.pt's layout, written out here: the header line with the body's sha256, then the body."""
    return b"pneumonia-kfp-state sha256=" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("damage, why", [
    ("flip", "its sha256 does not match its header"),  # 4 KB flipped in the middle of the tensors
    ("truncate", "its sha256 does not match its header"),
    ("old format", "it has no checksum header"),  # a torch.save file without the header: cannot be verified
    ("binary header", "its sha256 does not match its header"),  # bytes that are not ASCII where the hash goes
    ("not torch", "it does not load (UnpicklingError)"),  # the checksum holds, the bytes are no torch.save
    ("code in the pickle", "it does not load (UnpicklingError)"),  # weights only: a pickled callable is refused
])
def test_a_damaged_state_is_not_used_and_training_starts_over(states, damage, why, caplog):
    store, state, path = states
    data = path.read_bytes()
    if damage == "flip":
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 4096]) + data[mid + 4096:]
    elif damage == "truncate":
        data = data[:len(data) // 3]
    elif damage == "old format":
        data = data.partition(b"\n")[2]
    elif damage == "binary header":
        data = b"pneumonia-kfp-state sha256=\xff\xfe\x80" + b"\n" + data.partition(b"\n")[2]
    elif damage == "not torch":
        data = checksummed(b"not a pickle at all")
    else:
        data = checksummed(torch_bytes({"epoch": 2, "hook": print}))
    assert data.startswith(b"pneumonia-kfp-state") == (damage != "old format")
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        assert resume.load(store) is None
    assert f"last.pt is damaged ({why}): training starts over from epoch 1" in caplog.text


def test_a_state_written_by_hand_in_the_documented_layout_loads(states):
    store, _, path = states
    path.write_bytes(checksummed(torch_bytes({"epoch": 7})))
    assert resume.load(store) == {"epoch": 7}


def test_the_state_store_is_keyed_by_every_part_of_the_identity(tmp_path):
    """state_store's place: <storage>/checkpoints/<16 hex>, one key per (dataset, identity), whatever the
    identity's order; the storage root's own path may hold "/datasets/" (only the last one splits)."""
    root = (tmp_path / "datasets" / "store").as_uri()
    base = {"backbone": "resnet18", "epochs": 3, "learning_rate": 1e-3}
    uri = f"{root}/datasets/abc"
    key = resume.state_store(uri, base).uri
    assert re.fullmatch(re.escape(root) + r"/checkpoints/[0-9a-f]{16}", key), key
    assert resume.state_store(uri, dict(reversed(base.items()))).uri == key  # order is not identity
    others = [resume.state_store(f"{root}/datasets/abd", base).uri,
              *(resume.state_store(uri, {**base, k: v}).uri for k, v in
                (("backbone", "resnet50"), ("epochs", 4), ("learning_rate", 1e-4), ("seed", 1)))]
    assert len({key, *others}) == 1 + len(others)


def test_evaluate_refuses_a_one_class_test_split(image_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    for p in (data / "test" / "NORMAL").iterdir():
        p.write_bytes(b"not an image")
    # a version with a one-class test split, as an older ingest could write it (today's refuses)
    monkeypatch.setattr(validation, "check_classes", lambda *a: None)
    info = ingest(str(data), (tmp_path / "store").as_uri(), image_size=32, on_invalid="skip")
    assert info["counts"]["test"] == {"NORMAL": 0, "PNEUMONIA": 12}
    with pytest.raises(DataError, match="has 12 test images of 1 class.*needs images of each of NORMAL, PNEUMONIA"):
        evaluate(info["uri"], str(tmp_path / "no-model-needed.pt"))
