"""Per-epoch training state in the store, so a restarted (preempted) train task resumes.

The key is the task's identity -- dataset version, backbone and every training setting -- so a
retried pod finds its own state and nothing else's. Written atomically each epoch.
"""
import hashlib
import io
import json
import logging

from pneumonia_kfp.storage import StorageError, Store, open_store

log = logging.getLogger(__name__)


def state_store(dataset_uri: str, identity: dict) -> Store:
    """``<storage>/checkpoints/<identity hash>/`` beside the dataset versions."""
    root = dataset_uri.rsplit("/datasets/", 1)[0]
    key = hashlib.sha256(json.dumps({"dataset": dataset_uri, **identity}, sort_keys=True).encode()).hexdigest()[:16]
    return open_store(f"{root}/checkpoints/{key}")


def save(store: Store, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    store.put_bytes("last.pt", buf.getvalue())


def load(store: Store, device) -> dict | None:
    import torch

    try:
        data = store.get_bytes("last.pt")
    except StorageError as e:
        if e.code in ("NoSuchKey", "NoSuchBucket"):
            return None
        raise
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
