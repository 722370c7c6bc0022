"""Backbones by timm name, with a real 2-class head and 1-channel (grayscale) input."""
from __future__ import annotations

import difflib
from pathlib import Path

from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.params import MIN_IMAGE_SIZE
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
    """Reject an image size the backbone cannot take (fixed-size models such as ViTs, or < 32 px)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and size != cfg.input_size[-1]:
        raise BackboneError(f"{name} takes only {cfg.input_size[-1]} px images, not --image-size {size}")
    if size < MIN_IMAGE_SIZE:
        raise BackboneError(f"--image-size {size} is too small for {name}: use at least {MIN_IMAGE_SIZE} px")


def create_backbone(name: str, num_classes: int = 2, pretrained: bool = False, weights: str = ""):
    """A timm model with ``num_classes`` outputs and ``in_chans=1``.

    ``pretrained`` loads ImageNet weights: from ``weights`` (a local file or a store URI, for
    air-gapped clusters) when given, otherwise from timm's hub. timm sums the first conv over RGB
    for the single grayscale channel and drops the 1000-class classifier.
    """
    import timm

    check_backbone(name)
    kwargs = dict(num_classes=num_classes, in_chans=1)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if not weights:
        return _checked_pretrained(name, "timm's hub weights", **kwargs)
    with scratch_dir("weights-") as tmp:
        path = _local_weights(weights, Path(tmp))
        return _checked_pretrained(name, weights, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


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
    if not path.is_file():
        raise BackboneError(f"pretrained weights file {weights} does not exist")
    return path


def grayscale_normalization(model) -> tuple[float, float]:
    """The model's RGB mean/std averaged to one channel (what its pretraining expects)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


PREDICT_PIXELS = 256 * 224 * 224  # image pixels per inference batch: 256 images at 224 px, fewer larger ones


def predict(model, images, mean: float, std: float, tta: bool = False):
    """Probability of the positive class for uint8 images (N×1×S×S, numpy or tensor); with ``tta`` the
    mean over augmentation.TTA_VIEWS, made batch by batch on the model's device.

    In fp32, without autocast: the thresholds train picks on validation and the test figures evaluate
    computes (perhaps on another device) come from predictions made the same way.
    """
    import numpy as np
    import torch

    from pneumonia_kfp import augmentation

    device = next(model.parameters()).device
    images = torch.as_tensor(images)
    batch = max(1, PREDICT_PIXELS // (images.shape[-1] * images.shape[-2]))
    views = augmentation.TTA_VIEWS if tta else (None,)

    def positive(x):
        x = augmentation.normalize(x, mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(model(x).float(), 1)[:, 1]

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch].to(device)
            prob = sum(positive(chunk if v is None else augmentation.tta_view(chunk, v)) for v in views)
            out.append((prob / len(views)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def save_checkpoint(path, model, **meta) -> None:
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, **meta}, path)


def load_checkpoint(path, device="cpu"):
    """(model, metadata) from a checkpoint written by train."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = create_backbone(ckpt["backbone"], num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.to(device), ckpt
