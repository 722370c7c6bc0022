"""The seed's training augmentation, batched on the training device.

Seed (per image, PIL): Resize -> RandomEqualize -> RandomRotation((-25, 20)) -> crop.
Here (per batch, one kernel each, independent random parameters per sample): images arrive
already resized by ingest; equalize with p=0.5; one affine warp that rotates by U(-25, 20)
degrees and crops a random window of 80-100 % of the side (resampled back to full size);
then normalisation. No PIL, no Python loop over images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

ROTATION_DEGREES = (-25.0, 20.0)
CROP_SCALE = (0.8, 1.0)
EQUALIZE_P = 0.5


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) * (hi - lo) + lo


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 B×1×H×W -> float B×1×H×W in [0, 1], augmented."""
    n, _, h, w = images.shape
    equalize = torch.rand(n, device=images.device, generator=generator) < EQUALIZE_P
    if equalize.any():  # equalize only the chosen samples: histograms are the costly part
        images = images.clone()
        images[equalize] = TF.equalize(images[equalize])
    x = images.float().div_(255)

    angle = _uniform(n, *ROTATION_DEGREES, x, generator) * (math.pi / 180)
    scale = _uniform(n, *CROP_SCALE, x, generator)
    # the crop window's centre moves at most as far as keeps it inside the image
    tx = (_uniform(n, -1, 1, x, generator) * (1 - scale))[:, None, None]
    ty = (_uniform(n, -1, 1, x, generator) * (1 - scale))[:, None, None]
    cos, sin = (torch.cos(angle) * scale)[:, None, None], (torch.sin(angle) * scale)[:, None, None]
    # the affine sampling grid by broadcasting (what F.affine_grid computes, without its batched matmul)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)[None, :, None]
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)[None, None, :]
    grid = torch.stack([cos * xs - sin * ys + tx, sin * xs + cos * ys + ty], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 or [0, 1] float -> normalised float."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - mean) / std
