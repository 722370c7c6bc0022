"""Backbones by timm name, with a real 2-class head and 1-channel (grayscale) input."""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.scratch import scratch_dir


class BackboneError(UsageError):
    """A backbone name or an image size it cannot take."""


def check_backbone(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise BackboneError(f"unknown backbone {name!r}: not a timm model name.{hint}")


def check_image_size(name: str, size: int) -> None:
    """Reject an image size the backbone cannot take (fixed-size models such as ViTs); the size's own
    limits are params' (checked with the other run parameters before this)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and size != cfg.input_size[-1]:
        raise BackboneError(f"{name} takes only {cfg.input_size[-1]} px images, not --image-size {size}")


def create_backbone(name: str, num_classes: int = 2, pretrained: bool = False, weights: str = ""):
    """A timm model with ``num_classes`` outputs and ``in_chans=1``.

    ``pretrained`` loads ImageNet weights: from ``weights`` (the ``pretrained_weights`` parameter, for
    air-gapped clusters: one file, a directory of ``<backbone>.safetensors|.pth|.pt`` or a mapping
    ``backbone=file,...``; see PretrainedWeights) when given, otherwise from timm's hub. timm sums the
    first conv over RGB for the single grayscale channel and drops the 1000-class classifier.
    """
    import timm

    check_backbone(name)
    kwargs = dict(num_classes=num_classes, in_chans=1)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if not weights:
        return _checked_pretrained(name, "timm's hub weights", **kwargs)
    source = PretrainedWeights(weights).file_for(name)
    with scratch_dir("weights-") as tmp:
        path = _local_weights(source, Path(tmp))
        return _checked_pretrained(name, source, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


class WeightsError(BackboneError):
    """A ``pretrained_weights`` value that is malformed, or that holds no weights for a backbone."""


# a name ending so is one weights file (timm reads .safetensors with safetensors, the rest with torch.load);
# any other name is a directory
WEIGHTS_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
DIRECTORY_SUFFIXES = (".safetensors", ".pth", ".pt")  # <backbone><suffix> in a directory, the first found wins
_MAPPING_ENTRY = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*=(.*)")
EXAMPLE_MAPPING = "resnet18=/weights/resnet18.safetensors,efficientnet_b3=s3://bucket/w/efficientnet_b3.safetensors"


class PretrainedWeights:
    """What ``pretrained_weights`` names, read from its text alone (no I/O):

    - ``""``: timm's hub;
    - one weights file, a name ending in .safetensors, .pth, .pt, .bin or .ckpt (a local path, file:// or
      s3:// URI): every backbone's weights, so valid only for a run of one backbone;
    - a directory (any other local path, file:// or s3:// prefix) holding ``<backbone>.safetensors``
      (or ``.pth`` / ``.pt`` state dicts), looked up for each backbone when it is built;
    - a mapping ``resnet18=/w/a.safetensors,efficientnet_b3=s3://b/w.safetensors`` (files, as above).
    """

    def __init__(self, value: str):
        from pneumonia_kfp.storage import StorageError, check_uri

        self.value = value = value.strip()
        self.mapping: dict[str, str] = {}
        parts = value.split(",")
        if _MAPPING_ENTRY.fullmatch(parts[0]):
            for part in parts:
                m = _MAPPING_ENTRY.fullmatch(part)
                if not m or not m.group(2).strip():
                    raise WeightsError(f"pretrained_weights entry {part.strip()!r} is not backbone=FILE: write "
                                       f"e.g. {EXAMPLE_MAPPING}")
                name, source = m.group(1), m.group(2).strip()
                if name in self.mapping:
                    raise WeightsError(f"pretrained_weights maps {name} more than once")
                try:
                    check_backbone(name)
                except BackboneError as e:
                    raise WeightsError(f"pretrained_weights maps {e}") from None
                self.mapping[name] = source
            self.kind = "mapping"
        elif not value:
            self.kind = "hub"
        else:
            self.kind = "file" if value.rstrip("/") == value and value.endswith(WEIGHTS_FILE_SUFFIXES) \
                else "directory"
        for source in self.mapping.values() or ([value] if value else []):
            try:
                check_uri(source, "pretrained_weights")
            except StorageError as e:
                raise WeightsError(str(e)) from None

    def check(self, backbones: list[str]) -> None:
        """What can be told without I/O: one file for several backbones, a mapping that lacks one."""
        if self.kind == "file" and len(backbones) > 1:
            raise WeightsError(
                f"pretrained_weights {self.value} is one weights file, but the run trains {len(backbones)} backbones "
                f"({', '.join(backbones)}): give a directory holding <backbone>.safetensors for each, or a mapping "
                f"such as {EXAMPLE_MAPPING}")
        if self.kind == "mapping":
            missing = [b for b in backbones if b not in self.mapping]
            if missing:
                raise WeightsError(
                    f"pretrained_weights maps no weights to {', '.join(missing)} (it maps {', '.join(self.mapping)}): "
                    f"add {missing[0]}=FILE")

    def file_for(self, backbone: str) -> str:
        """The weights file (local path or store URI) for ``backbone``; a WeightsError naming the backbone and
        where it looked when there is none. A directory is looked into here (its listing is I/O)."""
        if self.kind == "mapping":
            self.check([backbone])
            return self.mapping[backbone]
        if self.kind != "directory":
            return self.value
        names = [backbone + suffix for suffix in DIRECTORY_SUFFIXES]
        if self.value.startswith(("s3://", "file://")):
            from pneumonia_kfp.storage import open_store

            store = open_store(self.value.rstrip("/"))
            found = next((n for n in names if store.exists(n)), None)
            where = store.uri
            if found:
                return store.uri_of(found)
        else:
            folder = Path(self.value).expanduser()
            if folder.is_file():
                raise WeightsError(
                    f"pretrained_weights {self.value} is a file whose name does not end in "
                    f"{', '.join(WEIGHTS_FILE_SUFFIXES)}, so it reads as a directory: rename it, e.g. to "
                    f"{folder.name}.pth (a torch state dict) or {folder.name}.safetensors")
            if not folder.is_dir():
                raise WeightsError(f"pretrained_weights directory {self.value} does not exist (looked there for "
                                   f"{backbone}'s weights: {', '.join(names)})")
            found = next((n for n in names if (folder / n).is_file()), None)
            where = str(folder)
            if found:
                return str(folder / found)
        raise WeightsError(f"pretrained_weights has no weights for {backbone}: looked for {', '.join(names)} "
                           f"in {where}")


def _checked_pretrained(name: str, source: str, **kwargs):
    """timm's pretrained model, and an error when the weights left any backbone tensor unloaded.

    timm loads non-strictly once the head is replaced, so weights in another layout (a torchvision
    state dict of an EfficientNet, say) load nothing and training would silently start from random
    weights. Which tensors were loaded is told by value, whatever the checkpoint's key names: the
    model is built from the same random state as a reference left unloaded, and a tensor that is
    random at init (it differs in a second reference built from another state) but still equals the
    reference was not loaded. The new classifier head and a first conv timm had to re-make are exempt.
    """
    import timm
    import torch

    rng = torch.random.get_rng_state()
    reference = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1)
        other = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    torch.random.set_rng_state(rng)  # the loaded model gets exactly the reference's initial values
    model = timm.create_model(name, pretrained=True, **kwargs)
    cfg = model.pretrained_cfg
    exempt = tuple(f"{m}." for m in _names(cfg.get("classifier")) + _names(cfg.get("first_conv")))
    missing = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not k.startswith(exempt)
               and not torch.equal(reference[k], other[k]) and torch.equal(v, reference[k])]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise BackboneError(
            f"pretrained weights {source} left {len(missing)} {name} tensors unloaded ({shown}): they are not "
            f"{name} weights in timm's layout (a torchvision state dict names many models' layers differently). "
            f"Use weights saved from timm.create_model({name!r}) or timm's hub.")
    return model


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _local_weights(weights: str, tmp: Path) -> Path:
    if weights.startswith("s3://") or weights.startswith("file://"):
        from pneumonia_kfp.storage import open_store

        parent, _, key = weights.rpartition("/")
        open_store(parent).get_file(key, tmp / key)
        return tmp / key
    path = Path(weights).expanduser()
    if path.is_dir():
        raise WeightsError(f"pretrained weights file {weights} is a directory: name the weights file itself")
    if not path.is_file():
        raise WeightsError(f"pretrained weights file {weights} does not exist")
    return path


def grayscale_normalization(model) -> tuple[float, float]:
    """The model's RGB mean/std averaged to one channel (what its pretraining expects)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


def save_checkpoint(path, model, **meta) -> None:
    """checkpoint.pt: the weights and ``meta`` (train's is a documents.CheckpointMeta), stamped with the format."""
    import torch

    from pneumonia_kfp.documents import CHECKPOINT_FORMAT
    from pneumonia_kfp.outputs import replacing

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with replacing(path) as tmp:  # whole or not at all
        torch.save({"state_dict": state, **meta, "format": CHECKPOINT_FORMAT}, tmp)


class ModelFileError(UsageError):
    """A model file that cannot be used: missing, damaged, of another kind, or not this project's."""


CHECKPOINT_KEYS = ("state_dict", "backbone", "classes")  # what makes a file a checkpoint and loads the model
SERVING_FORMATS = {".onnx": "an ONNX model", ".pt2": "a torch.export program"}
WHERE_MODELS_ARE = "a model directory (OUT/models/<backbone> of run-local, or the train step's model artifact)"


def read_checkpoint(path, required: tuple[str, ...] = ()) -> dict:
    """The checkpoint dict train wrote to ``path``, its format and the metadata fields the caller reads
    (``required``, of documents.CheckpointMeta) checked; one line naming the file and what is wrong
    (ModelFileError, DocumentError) for anything else. Only tensors and plain data are unpickled."""
    import pickle

    import torch

    from pneumonia_kfp.documents import read_checkpoint_meta

    path = Path(path)
    if path.suffix in SERVING_FORMATS:
        raise ModelFileError(f"{path} is {SERVING_FORMATS[path.suffix]}, a serving form: pass {WHERE_MODELS_ARE}, "
                             f"e.g. {path.parent}, whose checkpoint.pt this command reads")
    if not path.exists():
        raise ModelFileError(f"model {path} does not exist: pass {WHERE_MODELS_ARE}")
    if not path.is_file():
        raise ModelFileError(f"model {path} is not a file: pass {WHERE_MODELS_ARE}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "weights_only" in str(e):  # the weights-only unpickler's refusal
            what = str(e).split("Unsupported global:", 1)[-1].split(" was not ")[0].strip(" .:") \
                if "Unsupported global:" in str(e) else "a Python object"
            raise ModelFileError(f"{path} holds pickled code ({what[:120]}), which is never loaded: only tensors "
                                 "and plain data are read from a checkpoint. Use a checkpoint written by "
                                 "pneumonia-kfp train") from None
        raise _unreadable(path, e) from None
    except Exception as e:  # arbitrary bytes make the unpickler raise almost anything
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict):
        raise ModelFileError(f"{path} holds a {type(ckpt).__name__}, not a pneumonia-kfp checkpoint (a dict with "
                             f"{', '.join(CHECKPOINT_KEYS)}): pass the checkpoint.pt train wrote")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ModelFileError(f"{path} is a torch file but not a pneumonia-kfp checkpoint: it lacks "
                             f"{', '.join(missing)}. Pass the checkpoint.pt train wrote")
    return read_checkpoint_meta(ckpt, str(path), tuple(dict.fromkeys(CHECKPOINT_KEYS[1:] + tuple(required))))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0][:160] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _unreadable(path: Path, e: BaseException) -> ModelFileError:
    with open(path, "rb") as f:
        head = f.read(4)
    size = path.stat().st_size
    if head.startswith(b"PK"):  # a zip archive, as torch.save writes: cut short or damaged
        return ModelFileError(f"{path} ({size:,} bytes) is a damaged torch checkpoint, truncated perhaps "
                              f"({_first_line(e)}): copy it again from the training output")
    return ModelFileError(f"{path} ({size:,} bytes) is not a torch checkpoint ({_first_line(e)}): pass the "
                          "checkpoint.pt train wrote")


def _state_dict_problem(e: BaseException) -> str:
    """The first specific line of load_state_dict's error ("size mismatch for fc.weight: ...")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [""])[0]
    return detail[:140] or type(e).__name__


def load_checkpoint(path, device="cpu", required: tuple[str, ...] = ()):
    """(model, metadata) from a checkpoint written by train; one line names what is wrong
    (``required``: the metadata fields the caller reads, besides the model's)."""
    ckpt = read_checkpoint(path, required)
    try:
        model = create_backbone(ckpt["backbone"], num_classes=len(ckpt["classes"]))
    except BackboneError as e:
        raise ModelFileError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt.pop("state_dict"))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{path}: its weights do not fit a {ckpt['backbone']} with {len(ckpt['classes'])} "
                             f"classes ({_state_dict_problem(e)}): its backbone, classes or head were "
                             "changed after training; use the checkpoint.pt train wrote") from None
    return model.to(device), ckpt
