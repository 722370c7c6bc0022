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
    tx = _uniform(n, -1, 1, x, generator) * (1 - scale)
    ty = _uniform(n, -1, 1, x, generator) * (1 - scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # B×2×3
    # The sampling grid, as F.affine_grid would make it: each coordinate is (a row term) + (a
    # column term), added straight into the grid -- one pass over it instead of a batched matmul.
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)
    grid = torch.empty(n, h, w, 2, device=x.device)
    for k in range(2):
        torch.add((theta[:, k, 0:1] * xs + theta[:, k, 2:3])[:, None, :], (theta[:, k, 1:2] * ys)[:, :, None],
                  out=grid[..., k])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 or [0, 1] float -> normalised float (one new tensor, then in place)."""
    if x.dtype == torch.uint8:
        return x.float().mul_(1 / (255 * std)).sub_(mean / std)
    return x.mul(1 / std).sub_(mean / std)
