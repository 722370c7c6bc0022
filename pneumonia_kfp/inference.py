"""Running a model on images: the probability of the positive class (optionally over test-time views)
and the per-image prediction block a result document carries. Training (validation) and evaluation
(test, external data) both build on it, so their predictions are made the same way.
"""
from __future__ import annotations

PREDICT_PIXELS = 256 * 224 * 224  # image pixels per inference batch: 256 images at 224 px, fewer larger ones


def device_layout(x, device):
    """A tensor or model in the memory layout ``device`` runs fastest: channels_last on CUDA (tensor
    cores), unchanged on the CPU. The one place that choice is made."""
    import torch

    return x.to(memory_format=torch.channels_last) if device.type == "cuda" else x


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
        x = device_layout(augmentation.normalize(x, mean, std), device)
        return torch.softmax(model(x).float(), 1)[:, 1]

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch].to(device)
            prob = sum(positive(chunk if v is None else augmentation.tta_view(chunk, v)) for v in views)
            out.append((prob / len(views)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def predictions_block(entries: list[dict], labels, prob) -> dict:
    """Per-image predictions of one split: file (path in the dataset), patient, label (the class index),
    probability."""
    return {"file": [e["path"] for e in entries], "patient": [e.get("patient") for e in entries],
            "label": [int(v) for v in labels], "prob": [float(p) for p in prob]}
