"""export: a trained checkpoint as a self-contained TorchScript module for serving.

The exported module takes what ingest stores — uint8 images, N×1×S×S, S = the training image
size — and returns the probability of the positive class (normalisation and softmax inside), so
a consumer needs only ``torch.jit.load``: no timm, no project code. ``metadata.json`` inside the
file (``torch.jit.load(path, _extra_files=...)``) carries the classes, the validation-chosen
threshold, the image size and the backbone.

TorchScript rather than ONNX: it needs nothing beyond torch (ONNX export would add onnx,
onnxscript and, to check it, onnxruntime). ``torch.jit.trace`` is deprecated upstream in favour
of ``torch.export``, but it still loads everywhere torch does, which is what a serving artifact needs.
"""
from __future__ import annotations

import json
import warnings

FORMAT = "torchscript"
METADATA_FILE = "metadata.json"


def _deployable(model, mean: float, std: float):
    import torch

    from pneumonia_kfp.augmentation import normalize

    class Deployable(torch.nn.Module):
        """uint8 N×1×S×S -> P(positive class), N."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            return torch.softmax(self.model(normalize(images, mean, std)).float(), 1)[:, 1]

    return Deployable().eval()


def export_torchscript(checkpoint_path: str, path: str) -> dict:
    """Trace the checkpoint's model (on CPU) to ``path``; returns the metadata stored with it."""
    import torch

    from pneumonia_kfp.backbones import load_checkpoint

    model, meta = load_checkpoint(checkpoint_path, "cpu")
    size = int(meta["image_size"])
    info = {
        "format": FORMAT, "backbone": meta["backbone"], "classes": list(meta["classes"]),
        "positive_class": meta["classes"][1], "threshold": float(meta["threshold"]), "image_size": size,
        "input": f"uint8 N×1×{size}×{size}", "output": f"P({meta['classes'][1]}), N",
        "best_epoch": int(meta["best_epoch"]),
    }
    example = torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated"
        traced = torch.jit.trace(_deployable(model, meta["mean"], meta["std"]), example)
        torch.jit.save(traced, path, _extra_files={METADATA_FILE: json.dumps(info)})
    return info


def load_exported(path: str, device="cpu"):
    """(module, metadata) of a file written by ``export_torchscript``."""
    import torch

    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(path, map_location=device, _extra_files=extra)
    return module.eval(), json.loads(extra[METADATA_FILE])
