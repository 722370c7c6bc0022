"""Training augmentation and test-time views, made on the training device.

Chest X-ray practice for robustness to other scanners and hospitals: photometric changes
(brightness, contrast, gamma, blur/sharpen) and geometric ones (scale, translate, a little
rotation). Every sample of a batch gets its own random parameters: ``draw`` takes them all, ``apply``
makes the images from them; ``augment`` does both for a ``Policy``. ``SEED_POLICY`` is the AIMI seed's
(equalize p=0.5, rotation U(-25, 20) degrees, random crop of 80-100 % of the side), kept for the
ablation table.

- geometric: one affine warp (rotation, scale, translation) resampled bilinearly;
- photometric: an unsharp mask whose amount runs from a blur (negative) to a sharpen (positive),
  contrast, brightness, then gamma.

One recipe, two implementations, checked against each other by the tests: batched torch kernels
(``_apply_batched``: a GPU's whole batch, and on a CPU slices of small images, warped by OpenCV there)
and OpenCV image by image (``_apply_opencv``: a CPU's images from 128 px). On a CPU the slices go
to a pool of threads, each gathering and augmenting its own rows.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import cv2
import numpy as np
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
CPU_OPENCV_MIN_PIXELS = 128 * 128  # image by image from here (the two CPU paths cross at 96-128 px)
cv2.setNumThreads(1)  # the CPU path's own threads each take a slice of the batch


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


def _warp_torch(x: torch.Tensor, angle, zoom, tx, ty) -> torch.Tensor:
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pixel_map(angle: float, zoom: float, tx: float, ty: float, h: int, w: int) -> np.ndarray:
    """The warp as OpenCV's 2×3 inverse map, output pixel -> input pixel: unit coordinates are
    (2 pixel + 1) / side - 1 (align_corners False), so the unit-coordinate affine becomes D⁻¹ A D.
    Plain floats: a sample's few numbers cost less so than in numpy's or torch's per-call dispatch."""
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    ox, oy = 1 / w - 1, 1 / h - 1  # unit coordinates of pixel (0, 0)
    return np.array([[cos, -sin * w / h, w / 2 * (cos * ox - sin * oy + tx + 1) - 0.5],
                     [sin * h / w, cos, h / 2 * (sin * ox + cos * oy + ty + 1) - 0.5]])


def _geometry(angle, zoom, tx, ty) -> list[tuple[float, float, float, float]]:
    """Each sample's (angle, zoom, tx, ty) as plain floats, ``_pixel_map``'s arguments."""
    return list(zip(angle.tolist(), zoom.tolist(), tx.tolist(), ty.tolist(), strict=True))


def _warp_into(source: np.ndarray, pixel_map: np.ndarray, target: np.ndarray) -> None:
    """OpenCV's bilinear warpAffine of one float H×W image: grid_sample's sampling at 3x its speed on a CPU
    (grid_sample reads a sampling grid twice the image's size and gathers its four taps per pixel)."""
    h, w = target.shape
    cv2.warpAffine(source, pixel_map, (w, h), dst=target, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _warp_opencv(x: torch.Tensor, angle, zoom, tx, ty) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    geometry = _geometry(angle, zoom, tx, ty)
    for source, target, sample in zip(x[:, 0].numpy(), out[:, 0].numpy(), geometry, strict=True):
        _warp_into(source, _pixel_map(*sample, *x.shape[-2:]), target)
    return out


def warp(x: torch.Tensor, angle, zoom, tx, ty) -> torch.Tensor:
    """Affine warp of float B×1×H×W, per sample: rotate by ``angle`` (radians), magnify by ``zoom``,
    shift the sampled window's centre by (tx, ty) in [-1, 1] image units; outside the image is black.
    Bilinear, the same sampling on every device: OpenCV on a CPU, grid_sample elsewhere."""
    return (_warp_opencv if x.device.type == "cpu" else _warp_torch)(x, angle, zoom, tx, ty)


def _mix(amount, contrast, brightness, mean, mean_blurred, unit: float):
    """The unsharp mask, contrast and brightness steps as one weighted sum y = wx x + wb blurred + c, for
    one sample (floats) or a column of samples (tensors); x in [0, ``unit``], y in [0, 1] before the clamp.
    sharpened = x + amount (x - blurred) is never made: its mean comes from the two means (linear), and the
    contrast step (sharpened - mean) scale + mean / unit + brightness expands into the sum."""
    scale = contrast / unit
    mean = (1 + amount) * mean - amount * mean_blurred
    return scale * (1 + amount), -scale * amount, mean * (1 / unit - scale) + brightness


def _blur16(x: torch.Tensor) -> torch.Tensor:
    """16 × the 3x3 binomial blur, edges replicated: two separable passes of shifted adds (no kernel to
    copy to the device; a 1-channel conv2d costs 20-80 times as much on a CPU)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h = torch.add(p[..., :, :-2], p[..., :, 2:]).add_(p[..., :, 1:-1], alpha=2)
    return torch.add(h[..., :-2, :], h[..., 2:, :]).add_(h[..., 1:-1, :], alpha=2)


def _photometric_torch(x: torch.Tensor, p: Params, unit: float, out: torch.Tensor) -> torch.Tensor:
    """Unsharp mask, contrast, brightness, clamp, gamma on float x in [0, ``unit``], batched; result in
    [0, 1] (``unit`` 255 folds the uint8 scaling into the contrast step)."""
    def column(t):
        return t[:, None, None, None]

    blurred = _blur16(x)
    wx, wb, c = _mix(column(p.sharpen), column(p.contrast), column(p.brightness),
                     x.mean(dim=(1, 2, 3), keepdim=True), blurred.mean(dim=(1, 2, 3), keepdim=True) / 16, unit)
    y = blurred.mul_(wb / 16).add_(c).addcmul_(x, wx)
    # y ** gamma as exp(gamma log y), 5-10 % faster than pow; y floored at 1e-20 rather than 0, where
    # log is -inf (1e-20 ** gamma < 1e-13: black all the same)
    return torch.exp(y.clamp_(1e-20, 1).log_().mul_(column(p.gamma)), out=out)


def photometric(x: torch.Tensor, policy: Policy, generator=None) -> torch.Tensor:
    """Brightness, contrast, gamma and blur/sharpen, per sample; float [0, 1] in and out (batched torch)."""
    p = Params(None, None, None, None, **_photometric_params(len(x), policy, x, generator))
    return _photometric_torch(x, p, 1.0, torch.empty_like(x))


def _equalized(images: torch.Tensor, p: Params) -> torch.Tensor:
    if p.equalize is None:
        return images
    # every sample equalized, the chosen ones kept: picking them first would read the choice back
    return torch.where(p.equalize[:, None, None, None], TF.equalize(images), images)


def _apply_batched(images: torch.Tensor, p: Params, out: torch.Tensor, normalize_to) -> None:
    """The recipe as batched torch kernels (the warp OpenCV's on a CPU): a GPU's whole batch, or a CPU's
    slice of small images."""
    x = warp(_equalized(images, p).float(), p.angle, p.zoom, p.tx, p.ty)  # 0..255 until the last step
    if p.gamma is None:
        torch.mul(x, 1 / 255, out=out)
    else:
        _photometric_torch(x, p, 255.0, out)
    if normalize_to is not None:
        normalize(out, *normalize_to)


def _apply_opencv(images: torch.Tensor, p: Params, out: torch.Tensor, normalize_to) -> None:
    """The same recipe on a CPU, image by image with OpenCV's kernels: an image's three buffers stay in the
    core's cache, and OpenCV's log and exp are 5x torch's there. A dozen calls an image, each a few µs of
    Python holding the GIL: for images of ``CPU_OPENCV_MIN_PIXELS`` and more (at 224 px 1.5-1.6x the
    batched kernels, at 64 px 0.6-0.8x: benchmarks/data_path.py)."""
    h, w = images.shape[-2:]
    geometry = _geometry(p.angle, p.zoom, p.tx, p.ty)
    mean, std = normalize_to or (0.0, 1.0)
    photometric = p.gamma is not None
    if photometric:
        amounts, contrasts, brightnesses, gammas = (t.tolist() for t in (p.sharpen, p.contrast, p.brightness, p.gamma))
    source, x, blurred = (np.empty((h, w), np.float32) for _ in range(3))
    for i, (image, target) in enumerate(zip(_equalized(images, p)[:, 0].numpy(), out[:, 0].numpy(), strict=True)):
        np.copyto(source, image)  # uint8 -> float, 0..255 until the last step
        _warp_into(source, _pixel_map(*geometry[i], h, w), x)
        if not photometric:
            cv2.addWeighted(x, 1 / (255 * std), x, 0.0, -mean / std, dst=target)  # scaled to [0, 1], normalised
            continue
        cv2.GaussianBlur(x, (3, 3), 0, dst=blurred, borderType=cv2.BORDER_REPLICATE)  # the 3x3 binomial
        wx, wb, c = _mix(amounts[i], contrasts[i], brightnesses[i], cv2.mean(x)[0], cv2.mean(blurred)[0], 255.0)
        cv2.addWeighted(x, wx, blurred, wb, c, dst=target)
        cv2.min(cv2.max(target, 1e-20, dst=target), 1.0, dst=target)  # floored as in _photometric_torch
        cv2.log(target, target)
        cv2.exp(cv2.multiply(target, gammas[i], dst=target), target)
        if normalize_to is not None:
            cv2.addWeighted(target, 1 / std, target, 0.0, -mean / std, dst=target)  # normalize's (x - mean) / std


def apply(images: torch.Tensor, params: Params, normalize_to: tuple[float, float] | None = None,
          rows: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B×1×H×W -> float B×1×H×W in [0, 1], augmented with ``params`` (see ``draw``); with
    ``normalize_to`` (mean, std), normalised too, one pass less through memory than ``normalize`` after.
    ``rows``: augment ``images[rows]``, on a CPU gathered chunk by chunk by the threads that augment them."""
    n = len(images) if rows is None else len(rows)
    out = torch.empty((n, *images.shape[1:]), device=images.device)
    if images.device.type != "cpu":
        _apply_batched(images if rows is None else images[rows], params, out, normalize_to)
        return out
    threads = torch.get_num_threads()
    # slices of at most CPU_SLICE_PIXELS (the batched kernels' intermediates stay in a core's cache), at
    # least one per thread
    step = max(1, min(CPU_SLICE_PIXELS // max(1, math.prod(images.shape[1:])), -(-n // threads)))
    chunks = [slice(start, start + step) for start in range(0, n, step)]
    kernel = _apply_opencv if math.prod(images.shape[-2:]) >= CPU_OPENCV_MIN_PIXELS else _apply_batched

    inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads take the caller's

    def one(chunk):
        with torch.inference_mode(inference):
            chunk_images = images[chunk] if rows is None else images[rows[chunk]]
            kernel(chunk_images, params[chunk], out[chunk], normalize_to)

    if threads == 1 or len(chunks) <= 1:
        for chunk in chunks:
            one(chunk)
        return out
    # Chunks on a pool of threads, each op single-threaded (OpenCV and torch release the GIL in their
    # kernels), instead of every op split over torch's threads: no barrier after each op, where a thread
    # that the OS has paused (a shared or CPU-limited machine) held the whole batch up, 10x slower. The
    # rows are gathered here, not by the caller: a gather on torch's threads leaves them spinning for ~10 ms
    # after it (OpenMP's wait), on the cores the pool needs (a batch 1.4x slower).
    torch.set_num_threads(1)  # the pool's threads start with this count
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, chunks))
    finally:
        torch.set_num_threads(threads)
    return out


def augment(images: torch.Tensor, generator: torch.Generator | None = None,
            policy: Policy | None = DEFAULT_POLICY, normalize_to: tuple[float, float] | None = None,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B×1×H×W -> float B×1×H×W in [0, 1], augmented (``policy`` None: only converted); with
    ``normalize_to`` (mean, std) the same as ``normalize(augment(...), mean, std)``, faster on a CPU;
    ``rows``: augment ``images[rows]`` (see ``apply``)."""
    if policy is None:
        x = (images if rows is None else images[rows]).float().div_(255)
        return x if normalize_to is None else normalize(x, *normalize_to)
    n = len(images) if rows is None else len(rows)
    return apply(images, draw(policy, n, images, generator), normalize_to, rows)


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
