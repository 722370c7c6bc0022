"""Training augmentation and test-time views, batched on the training device.

Chest X-ray practice for robustness to other scanners and hospitals: photometric changes
(brightness, contrast, gamma, blur/sharpen) and geometric ones (scale, translate, a little
rotation). Here every sample of a batch gets its own random parameters, and each change is a
batched kernel over many images at once: no PIL, no Python loop over images.

- ``geometric``: one affine warp (rotation, scale, translation) resampled bilinearly;
- ``photometric``: brightness, contrast, gamma and an unsharp mask whose amount runs from a
  blur (negative) to a sharpen (positive);
- ``augment`` applies a ``Policy``: ``draw`` takes every sample's parameters, ``apply`` makes the
  images from them; ``SEED_POLICY`` is the AIMI seed's (equalize p=0.5, rotation U(-25, 20)
  degrees, random crop of 80-100 % of the side), kept for the ablation table.

Cost: on a CPU the batch goes through in slices of at most ``CPU_SLICE_PIXELS``, one per thread at
a time, so that the intermediates stay in a core's cache (a whole 224 px batch of 64 is 13 MB a
pass, and passes through memory cost more than the arithmetic); on a GPU the batch is one slice.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

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

CPU_SLICE_PIXELS = 2 ** 18  # 1 MiB of float (5 images at 224 px)


@dataclass(frozen=True)
class Params:
    """Every sample's random parameters, one B-long tensor each (None: that change is off)."""
    angle: torch.Tensor  # radians
    zoom: torch.Tensor  # magnification
    tx: torch.Tensor  # the sampled window's centre shift, [-1, 1] image units
    ty: torch.Tensor
    equalize: torch.Tensor | None = None  # bool
    sharpen: torch.Tensor | None = None  # unsharp-mask amount, -1 = the 3x3 blur itself
    contrast: torch.Tensor | None = None  # factor around the image's mean
    brightness: torch.Tensor | None = None  # added, [0, 1] units
    gamma: torch.Tensor | None = None  # exponent

    def __getitem__(self, rows: slice | torch.Tensor) -> Params:
        return Params(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                         for f in fields(self)})


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(n, device=like.device, generator=generator) * (hi - lo) + lo


def _geometric_params(n: int, policy: Policy, like: torch.Tensor, generator) -> dict:
    angle = _uniform(n, *policy.rotation, like, generator) * (math.pi / 180)
    zoom = _uniform(n, *policy.scale, like, generator)
    # a zoom-in's window may move as far as keeps it inside the image; plus the policy's translation
    room = (1 - 1 / zoom).clamp(min=0) + 2 * policy.translate
    tx = _uniform(n, -1, 1, like, generator) * room
    ty = _uniform(n, -1, 1, like, generator) * room
    return {"angle": angle, "zoom": zoom, "tx": tx, "ty": ty}


def _photometric_params(n: int, policy: Policy, like: torch.Tensor, generator) -> dict:
    sharpen = _uniform(n, *policy.sharpen, like, generator)
    contrast = _uniform(n, *policy.contrast, like, generator)
    brightness = _uniform(n, -policy.brightness, policy.brightness, like, generator)
    gamma = _uniform(n, math.log(policy.gamma[0]), math.log(policy.gamma[1]), like, generator).exp()  # log-uniform
    return {"sharpen": sharpen, "contrast": contrast, "brightness": brightness, "gamma": gamma}


def draw(policy: Policy, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> Params:
    """``n`` samples' parameters on ``like``'s device, in a fixed order (equalize, geometric, photometric),
    so one seed gives one augmentation."""
    equalize = None
    if policy.equalize_p:
        equalize = torch.rand(n, device=like.device, generator=generator) < policy.equalize_p
    params = _geometric_params(n, policy, like, generator)
    if policy.photometric:
        params.update(_photometric_params(n, policy, like, generator))
    return Params(equalize=equalize, **params)


def _grid(angle, zoom, tx, ty, h: int, w: int) -> torch.Tensor:
    """The B×H×W×2 sampling grid F.affine_grid makes for theta = [[cos, -sin, tx], [sin, cos, ty]] / zoom
    (align_corners False), as one multiply-add over rows of 2W interleaved (x, y): row i is the column
    term plus y_i times the (-sin, cos) pattern. affine_grid's batched matmul over a 3-long inner
    dimension, or any add into the grid's 2-long last dimension, costs 6-40 times as much on a CPU."""
    n = len(angle)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=angle.device)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=angle.device)
    column = torch.stack([cos[:, None] * xs + tx[:, None], sin[:, None] * xs + ty[:, None]], -1).view(n, 1, 2 * w)
    pattern = torch.stack([-sin, cos], -1).repeat(1, w).view(n, 1, 2 * w)
    return torch.addcmul(column, ys[None, :, None], pattern).view(n, h, w, 2)


def warp(x: torch.Tensor, angle, zoom, tx, ty) -> torch.Tensor:
    """Affine warp of float B×1×H×W, per sample: rotate by ``angle`` (radians), magnify by ``zoom``,
    shift the sampled window's centre by (tx, ty) in [-1, 1] image units; outside the image is black."""
    return F.grid_sample(x, _grid(angle, zoom, tx, ty, *x.shape[-2:]), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def geometric(x: torch.Tensor, policy: Policy, generator=None) -> torch.Tensor:
    return warp(x, **_geometric_params(len(x), policy, x, generator))


def _blur16(x: torch.Tensor) -> torch.Tensor:
    """16 × the 3x3 binomial blur, edges replicated: two separable passes of shifted adds (a 1-channel
    conv2d costs 20-80 times as much on a CPU)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h = torch.add(p[..., :, :-2], p[..., :, 2:]).add_(p[..., :, 1:-1], alpha=2)
    return torch.add(h[..., :-2, :], h[..., 2:, :]).add_(h[..., 1:-1, :], alpha=2)


def _photometric(x: torch.Tensor, p: Params, unit: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unsharp mask, contrast, brightness, clamp, gamma on float x in [0, ``unit``]; result in [0, 1]
    (``unit`` 255 folds the uint8 scaling into the contrast step)."""
    def column(t):
        return t[:, None, None, None]

    amount, scale = column(p.sharpen), column(p.contrast) / unit
    blurred = _blur16(x)
    # sharpened = x + amount * (x - blurred / 16) is never made: its mean comes from the two means
    # (linear), and the contrast step (sharpened - mean) * scale + mean / unit + brightness expands
    # into two multiply-adds over blurred and x
    mean = ((1 + amount) * x.mean(dim=(1, 2, 3), keepdim=True)
            - amount / 16 * blurred.mean(dim=(1, 2, 3), keepdim=True))
    y = torch.addcmul(mean * (1 / unit - scale) + column(p.brightness), blurred, scale * amount / -16, out=blurred)
    y.addcmul_(x, scale * (1 + amount))
    # y ** gamma as exp(gamma log y), 5-10 % faster than pow on a CPU; y floored at 1e-20 rather than 0,
    # where torch's vectorised log takes a 4x slower path (1e-20 ** gamma < 1e-13: black all the same)
    return torch.exp(y.clamp_(1e-20, 1).log_().mul_(column(p.gamma)), out=out)


def photometric(x: torch.Tensor, policy: Policy, generator=None) -> torch.Tensor:
    """Brightness, contrast, gamma and blur/sharpen, per sample; float [0, 1] in and out."""
    return _photometric(x, Params(None, None, None, None, **_photometric_params(len(x), policy, x, generator)), 1.0)


def _apply_slice(images: torch.Tensor, p: Params, out: torch.Tensor, normalize_to) -> None:
    if p.equalize is not None:
        # every sample equalized, the chosen ones kept: picking them first would read the choice back
        images = torch.where(p.equalize[:, None, None, None], TF.equalize(images), images)
    x = warp(images.float(), p.angle, p.zoom, p.tx, p.ty)  # 0..255 until the last step
    if p.gamma is None:
        torch.mul(x, 1 / 255, out=out)
    else:
        _photometric(x, p, 255.0, out=out)
    if normalize_to is not None:
        normalize(out, *normalize_to)  # while the slice is in the cache


def apply(images: torch.Tensor, params: Params, normalize_to: tuple[float, float] | None = None) -> torch.Tensor:
    """uint8 B×1×H×W -> float B×1×H×W in [0, 1], augmented with ``params`` (see ``draw``); with
    ``normalize_to`` (mean, std), normalised too: ``normalize`` on each slice, one pass less through memory."""
    out = torch.empty(images.shape, device=images.device)
    if images.device.type != "cpu":
        _apply_slice(images, params, out, normalize_to)
        return out
    threads = torch.get_num_threads()
    step = max(1, min(CPU_SLICE_PIXELS // max(1, math.prod(images.shape[1:])), -(-len(images) // threads)))
    slices = [slice(start, start + step) for start in range(0, len(images), step)]

    inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads take the caller's

    def one(rows):
        with torch.inference_mode(inference):
            _apply_slice(images[rows], params[rows], out[rows], normalize_to)

    if threads == 1 or len(slices) <= 1:
        for rows in slices:
            one(rows)
        return out
    # One slice per thread at a time, each op single-threaded (torch releases the GIL in its kernels),
    # instead of every op split over torch's threads: no barrier after each op, where a thread that
    # the OS has paused (a shared or CPU-limited machine) held the whole batch up, 10x slower.
    torch.set_num_threads(1)  # the pool's threads start with this count
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, slices))
    finally:
        torch.set_num_threads(threads)
    return out


def augment(images: torch.Tensor, generator: torch.Generator | None = None,
            policy: Policy | None = DEFAULT_POLICY, normalize_to: tuple[float, float] | None = None) -> torch.Tensor:
    """uint8 B×1×H×W -> float B×1×H×W in [0, 1], augmented (``policy`` None: only converted); with
    ``normalize_to`` (mean, std) the same as ``normalize(augment(...), mean, std)``, faster on a CPU."""
    if policy is None:
        x = images.float().div_(255)
        return x if normalize_to is None else normalize(x, *normalize_to)
    return apply(images, draw(policy, len(images), images, generator), normalize_to)


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
    """uint8 -> a new normalised float tensor; [0, 1] float -> normalised in place, and returned (every
    caller hands over a batch it has just made: a copy would cost a pass through memory)."""
    if x.dtype == torch.uint8:
        return x.float().mul_(1 / (255 * std)).sub_(mean / std)
    return x.mul_(1 / std).sub_(mean / std)
