"""Per-epoch training state in the store, so a restarted (preempted) train task resumes.

The key is the task's identity -- dataset version, backbone, every training setting, and the
package version plus a hash of the library's code -- so a retried pod finds its own state and
nothing else's, and a rerun after a code change trains afresh instead of reusing an old ``last.pt``.
Written atomically each epoch, with a checksum that is verified before the state is used.
"""
import hashlib
import io
import json
import logging

from pneumonia_kfp.storage import NotFound, Store, open_store, storage_root

log = logging.getLogger(__name__)


def code_identity() -> dict:
    """The installed package version and a hash of the library's source (every module of pneumonia_kfp)."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        package = version("pneumonia-kfp")
    except PackageNotFoundError:  # run from a source tree without installing
        package = "unknown"
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"package": package, "code": code.hexdigest()[:16]}


def state_store(dataset_uri: str, identity: dict) -> Store:
    """``<storage>/checkpoints/<identity hash>/`` beside the dataset versions."""
    root = storage_root(dataset_uri)
    key = hashlib.sha256(json.dumps({"dataset": dataset_uri, **identity, **code_identity()},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return open_store(f"{root}/checkpoints/{key}")


# last.pt is this header line, then torch.save's bytes: the header's sha256 covers the rest, so a damaged
# state is found before it is unpickled and trained on
HEADER = b"pneumonia-kfp-state sha256="


def save(store: Store, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    store.put_bytes("last.pt", HEADER + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def load(store: Store) -> dict | None:
    """The saved state, verified; None when there is none, or when it is damaged (with a warning:
    training starts over rather than resume from bytes that are not what was saved).

    Tensors load on the CPU: each object's load_state_dict moves them where they belong, and the
    optimizer's ``step`` counts stay on the CPU (on the GPU each step would read them back).
    """
    import torch

    try:
        data = store.get_bytes("last.pt")
    except NotFound:
        return None
    head, _, body = data.partition(b"\n")
    want = head.removeprefix(HEADER).decode("ascii", "replace") if head.startswith(HEADER) else None
    why = ("it has no checksum header" if want is None else
           None if hashlib.sha256(body).hexdigest() == want else "its sha256 does not match its header")
    if why is None:
        try:
            return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as e:  # whatever unpickling a bad state raises: start over
            why = f"it does not load ({type(e).__name__})"
    log.warning("%s is damaged (%s): training starts over from epoch 1", store.uri_of("last.pt"), why)
    return None
