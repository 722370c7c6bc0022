"""Training augmentation and test-time views, batched on the training device.

Chest X-ray practice for robustness to other scanners and hospitals: photometric changes
(brightness, contrast, gamma, blur/sharpen) and geometric ones (scale, translate, a little
rotation). Here every sample of a batch gets its own random parameters, and each change is one
batched kernel over the whole batch: no PIL, no Python loop over images.

- ``geometric``: one affine warp (rotation, scale, translation) resampled bilinearly;
- ``photometric``: brightness, contrast, gamma and an unsharp mask whose amount runs from a
  blur (negative) to a sharpen (positive);
- ``augment`` applies a ``Policy``; ``SEED_POLICY`` is the AIMI seed's (equalize p=0.5, rotation
  U(-25, 20) degrees, random crop of 80-100 % of the side), kept for the ablation table.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Policy:
    rotation: tuple[float, float] = (-10.0, 10.0)  # degrees
    scale: tuple[float, float] = (0.85, 1.15)  # > 1 zooms in (a crop), < 1 zooms out (black border)
    translate: float = 0.08  # of the image side, each axis; a crop's window also stays inside the image
    equalize_p: float = 0.0
    brightness: float = 0.1  # added, in [0, 1] units
    contrast: tuple[float, float] = (0.75, 1.33)  # factor around each image's mean
    gamma: tuple[float, float] = (0.7, 1.4)  # log-uniform exponent
    sharpen: tuple[float, float] = (-1.0, 1.0)  # unsharp-mask amount: -1 a 3x3 Gaussian blur, +1 sharpened

    @property
    def photometric(self) -> bool:
        return bool(self.brightness or self.contrast != (1.0, 1.0) or self.gamma != (1.0, 1.0)
                    or self.sharpen != (0.0, 0.0))


DEFAULT_POLICY = Policy()
GEOMETRIC_ONLY = Policy(brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0), sharpen=(0.0, 0.0))
# the seed's crop takes 80-100 % of the side: a zoom-in of 1-1.25x, centre kept inside the image
SEED_POLICY = Policy(rotation=(-25.0, 20.0), scale=(1.0, 1.25), translate=0.0, equalize_p=0.5, brightness=0.0,
                     contrast=(1.0, 1.0), gamma=(1.0, 1.0), sharpen=(0.0, 0.0))
POLICIES = {"default": DEFAULT_POLICY, "geometric": GEOMETRIC_ONLY, "seed": SEED_POLICY, "none": None}


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) * (hi - lo) + lo


def warp(x: torch.Tensor, angle, zoom, tx, ty) -> torch.Tensor:
    """Affine warp of float B×1×H×W, per sample: rotate by ``angle`` (radians), magnify by ``zoom``,
    shift the sampled window's centre by (tx, ty) in [-1, 1] image units; outside the image is black."""
    n, _, h, w = x.shape
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
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


def geometric(x: torch.Tensor, policy: Policy, generator=None) -> torch.Tensor:
    n = len(x)
    angle = _uniform(n, *policy.rotation, x, generator) * (math.pi / 180)
    zoom = _uniform(n, *policy.scale, x, generator)
    # a zoom-in's window may move as far as keeps it inside the image; plus the policy's translation
    room = (1 - 1 / zoom).clamp(min=0) + 2 * policy.translate
    tx = _uniform(n, -1, 1, x, generator) * room
    ty = _uniform(n, -1, 1, x, generator) * room
    return warp(x, angle, zoom, tx, ty)


@functools.cache
def blur_kernel(device: torch.device) -> torch.Tensor:
    """The 3x3 binomial kernel, copied to ``device`` once: a copy per batch would make the host wait for the GPU."""
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    return (k[:, None] * k[None, :])[None, None].to(device)


def blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur (binomial kernel), edges replicated."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur_kernel(x.device))


def photometric(x: torch.Tensor, policy: Policy, generator=None) -> torch.Tensor:
    """Brightness, contrast, gamma and blur/sharpen, per sample; float [0, 1] in and out."""
    n = len(x)

    def per_sample(lo, hi):
        return _uniform(n, lo, hi, x, generator)[:, None, None, None]

    amount = per_sample(*policy.sharpen)
    x = x + amount * (x - blur3(x))  # unsharp mask: amount -1 is the blur itself
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * per_sample(*policy.contrast) + mean + per_sample(-policy.brightness, policy.brightness)
    log_gamma = per_sample(math.log(policy.gamma[0]), math.log(policy.gamma[1]))
    return x.clamp_(0, 1).pow_(log_gamma.exp())


def augment(images: torch.Tensor, generator: torch.Generator | None = None,
            policy: Policy | None = DEFAULT_POLICY) -> torch.Tensor:
    """uint8 B×1×H×W -> float B×1×H×W in [0, 1], augmented (``policy`` None: only converted)."""
    if policy is not None and policy.equalize_p:
        equalize = torch.rand(len(images), device=images.device, generator=generator) < policy.equalize_p
        # every sample equalized, the chosen ones kept: picking them first would read the choice back
        images = torch.where(equalize[:, None, None, None], TF.equalize(images), images)
    x = images.float().div_(255)
    if policy is None:
        return x
    x = geometric(x, policy, generator)
    return photometric(x, policy, generator) if policy.photometric else x


# Test-time augmentation: the image itself plus mild geometric variants within the training
# policy's range (zoom 1.1, shifts of 4 % of the side); no flips, which training never showed.
TTA_VIEWS = ((1.0, 0.0, 0.0), (1.1, 0.0, 0.0), (1.0, 0.08, 0.0), (1.0, -0.08, 0.0), (1.0, 0.0, 0.08))


def tta_view(images: torch.Tensor, view: tuple[float, float, float]) -> torch.Tensor:
    """uint8 B×1×H×W -> float [0, 1], warped by one of TTA_VIEWS (zoom, tx, ty)."""
    x = images.float().div_(255)
    zoom, tx, ty = view
    if view == (1.0, 0.0, 0.0):
        return x
    n = len(x)
    full = torch.ones(n, device=x.device)
    return warp(x, full * 0, full * zoom, full * tx, full * ty)


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 or [0, 1] float -> normalised float (one new tensor, then in place)."""
    if x.dtype == torch.uint8:
        return x.float().mul_(1 / (255 * std)).sub_(mean / std)
    return x.mul(1 / std).sub_(mean / std)
