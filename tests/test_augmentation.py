import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from pneumonia_kfp.augmentation import (
    DEFAULT_POLICY,
    GEOMETRIC_ONLY,
    SEED_POLICY,
    TTA_VIEWS,
    Policy,
    apply,
    augment,
    draw,
    normalize,
    photometric,
    tta_view,
)

NEUTRAL = Policy(rotation=(0.0, 0.0), scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=(1.0, 1.0),
                 gamma=(1.0, 1.0), sharpen=(0.0, 0.0))


def _batch(n=16, size=32):
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 1, size, size), generator=g, dtype=torch.uint8)
    return one.repeat(n, 1, 1, 1)


@pytest.fixture(params=["opencv", "batched"])
def cpu_kernel(request, monkeypatch):
    """Each CPU implementation in turn: OpenCV image by image (large images), batched torch (small ones)."""
    from pneumonia_kfp import augmentation

    monkeypatch.setattr(augmentation, "CPU_OPENCV_MIN_PIXELS", 0 if request.param == "opencv" else 10 ** 12)
    return request.param


@pytest.mark.usefixtures("cpu_kernel")
def test_shapes_range_and_seeded_determinism():
    x = _batch()
    for policy in (DEFAULT_POLICY, GEOMETRIC_ONLY, SEED_POLICY):
        a = augment(x, torch.Generator().manual_seed(1), policy)
        b = augment(x, torch.Generator().manual_seed(1), policy)
        assert a.shape == x.shape and a.dtype == torch.float32
        assert 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, b)
        assert not torch.equal(a, augment(x, torch.Generator().manual_seed(2), policy))


def test_each_sample_gets_its_own_random_transform():
    out = augment(_batch(32), torch.Generator().manual_seed(3))
    distinct = {tuple(torch.round(r * 1000).int().tolist()) for r in out.flatten(1)}
    assert len(distinct) == 32  # identical inputs, 32 different augmentations


def test_a_neutral_policy_changes_nothing():
    x = _batch(4)
    out = augment(x, torch.Generator().manual_seed(0), NEUTRAL)
    assert torch.allclose(out, x.float() / 255, atol=1e-5)
    assert torch.equal(augment(x, None, None), x.float() / 255)
    assert augment(x[:0], torch.Generator().manual_seed(0)).shape == (0, 1, 32, 32)  # an empty batch too


def test_geometric_moves_pixels_but_keeps_content():
    x = _batch(64)
    out = augment(x, torch.Generator().manual_seed(4), GEOMETRIC_ONLY)
    changed = (out - x.float() / 255).abs().flatten(1).mean(1)
    assert (changed > 0.01).all()  # every sample was warped
    # ±10°, zoom 0.85-1.15 and ±8 % shifts keep most of the image inside the frame
    assert ((out > 0).float().flatten(1).mean(1) > 0.6).all()


def test_photometric_changes_brightness_contrast_and_sharpness_per_sample():
    # a smooth ramp with a sharp edge: contrast/brightness move the mean and spread, blur/sharpen the edge
    ramp = torch.linspace(0.3, 0.7, 32).repeat(32, 1)
    ramp[:, 16:] += 0.1
    x = ramp[None, None].repeat(256, 1, 1, 1)
    out = photometric(x, DEFAULT_POLICY, torch.Generator().manual_seed(5))
    means, stds = out.mean(dim=(1, 2, 3)), out.std(dim=(1, 2, 3))
    edge = (out[..., 16] - out[..., 15]).mean(dim=(1, 2))
    base_edge = float(x[0, 0, 0, 16] - x[0, 0, 0, 15])
    assert means.std() > 0.03 and stds.std() > 0.01
    assert (edge < 0.8 * base_edge).any() and (edge > 1.2 * base_edge).any()  # some blurred, some sharpened
    assert 0 <= out.min() and out.max() <= 1


def test_blur_and_sharpen_are_the_two_ends_of_one_unsharp_mask():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    blur_only = Policy(brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0), sharpen=(-1.0, -1.0))
    blurred = _reference_blur(x)
    assert torch.allclose(photometric(x, blur_only), blurred.clamp(0, 1), atol=1e-6)
    assert blurred.std() < x.std()  # a blur smooths
    flat = torch.full((1, 1, 5, 5), 0.4)  # and keeps flat areas, edges included
    assert torch.allclose(photometric(flat, blur_only), flat, atol=1e-6)


def _reference_blur(x):
    """The 3x3 binomial blur with replicated edges, as one convolution (independent of the shifted adds)."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def test_gamma_is_log_uniform_around_one():
    x = torch.full((2000, 1, 4, 4), 0.5)
    gamma_only = Policy(brightness=0.0, contrast=(1.0, 1.0), sharpen=(0.0, 0.0), gamma=(0.5, 2.0))
    out = photometric(x, gamma_only, torch.Generator().manual_seed(7))[:, 0, 0, 0]
    gamma = torch.log(out) / math.log(0.5)
    assert 0.5 - 1e-4 <= gamma.min() and gamma.max() <= 2.0 + 1e-4
    assert abs(float((gamma < 1).float().mean()) - 0.5) < 0.05  # as many darker as lighter


def test_seed_policy_equalizes_about_half():
    # a low-contrast image (values 10..25); equalize stretches it over 0..255
    dark = (torch.arange(32 * 32) % 16 + 10).to(torch.uint8).reshape(1, 1, 32, 32).repeat(200, 1, 1, 1)
    out = augment(dark, torch.Generator().manual_seed(5), SEED_POLICY)
    stretched = (out.flatten(1).max(1).values > 0.5).float().mean()
    assert 0.35 < stretched < 0.65
    assert (augment(dark, torch.Generator().manual_seed(5), GEOMETRIC_ONLY).max() < 0.2)  # no equalize there


def test_normalize():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(normalize(x, 0.5, 0.25), torch.tensor([[[[-2.0, 2.0]]]]))
    assert x.tolist() == [[[[0, 255]]]]  # uint8 left as it was
    fresh = torch.tensor([[[[0.0, 1.0]]]])
    assert normalize(fresh, 0.5, 0.25) is fresh and fresh.tolist() == [[[[-2.0, 2.0]]]]  # a float batch, in place


@pytest.mark.usefixtures("cpu_kernel")
def test_sampling_grid_is_the_affine_grid():
    """augment's warp equals F.affine_grid + grid_sample for the same per-sample rotation, zoom and shift."""
    policy = GEOMETRIC_ONLY
    x = (torch.linspace(0, 1, 7 * 9).reshape(1, 1, 7, 9).repeat(3, 1, 1, 1) * 255).to(torch.uint8)
    out = augment(x, torch.Generator().manual_seed(7), policy)
    g = torch.Generator().manual_seed(7)  # replay augment's draws: angle, zoom, tx, ty
    lo, hi = policy.rotation
    angle = (torch.rand(3, generator=g) * (hi - lo) + lo) * math.pi / 180
    zoom = torch.rand(3, generator=g) * (policy.scale[1] - policy.scale[0]) + policy.scale[0]
    room = (1 - 1 / zoom).clamp(min=0) + 2 * policy.translate
    tx = (torch.rand(3, generator=g) * 2 - 1) * room
    ty = (torch.rand(3, generator=g) * 2 - 1) * room
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    expected = F.grid_sample(x.float() / 255, F.affine_grid(theta, [3, 1, 7, 9], align_corners=False),
                             align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)


def test_tta_views_are_the_image_and_mild_shifts():
    x = _batch(2)
    views = [tta_view(x, v) for v in TTA_VIEWS]
    assert torch.equal(views[0], x.float() / 255)  # the first view is the image itself
    for v in views[1:]:
        diff = (v - views[0]).abs().mean()
        assert 0.01 < diff < 0.5 and v.shape == x.shape
    # a shift of 0.08 (half-width units) moves the content by 4 % of the side: 32 px -> 1.28 px
    ramp = (torch.arange(32).float() * 8).repeat(32, 1)[None, None].to(torch.uint8)
    shifted = tta_view(ramp, (1.0, 0.08, 0.0))
    assert torch.allclose(shifted[0, 0, 5, 10] * 255, ramp[0, 0, 5, 10].float() + 8 * 1.28, atol=0.5)


# --- The fused, sliced path is the recipe it replaced: checked against independent per-image code ---


def _xray_like(n=4, size=40, seed=11):
    """Ramps of random contrast plus noise: structure for the warp, an edge for blur/sharpen."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, size).repeat(size, 1)
    noise = torch.rand(n, 1, size, size, generator=g) * 30
    return (ramp[None, None] * torch.rand(n, 1, 1, 1, generator=g) + noise).clamp(0, 255).to(torch.uint8)


def _torchvision_warp(image, angle, zoom, tx, ty):
    """torchvision's affine for one image: ``warp`` samples the input at R(angle) p / zoom + t (unit
    coordinates, y down); so the content turns by -angle, grows by zoom and moves by -zoom R(-angle) t,
    in pixels: torchvision's affine with those numbers."""
    size = image.shape[-1]
    c, s = math.cos(angle), math.sin(angle)
    shift = [-zoom * (c * tx + s * ty) * size / 2, -zoom * (c * ty - s * tx) * size / 2]
    return TF.affine(image.float() / 255, angle=-math.degrees(angle), translate=shift, scale=zoom, shear=[0.0, 0.0],
                     interpolation=TF.InterpolationMode.BILINEAR)


def _numpy_photometric(x, sharpen, contrast, brightness, gamma):
    """The photometric steps written out for one image in numpy, in the recipe's order."""
    padded = np.pad(x, 1, mode="edge")
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16
    h, w = x.shape
    blurred = sum(kernel[i, j] * padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
    y = x + sharpen * (x - blurred)
    y = (y - y.mean()) * contrast + y.mean() + brightness
    return np.clip(y, 0, 1) ** gamma


@pytest.mark.usefixtures("cpu_kernel")
def test_the_geometric_warp_is_torchvisions_affine_per_image():
    images = _xray_like()
    p = draw(GEOMETRIC_ONLY, len(images), images, torch.Generator().manual_seed(12))
    out = apply(images, p)
    for i in range(len(images)):
        expected = _torchvision_warp(images[i], *(float(v[i]) for v in (p.angle, p.zoom, p.tx, p.ty)))
        assert torch.allclose(out[i], expected, atol=1e-5)


@pytest.mark.usefixtures("cpu_kernel")
def test_the_default_recipe_is_torchvisions_warp_then_the_photometric_steps_per_image():
    images = _xray_like(6)
    p = draw(DEFAULT_POLICY, len(images), images, torch.Generator().manual_seed(13))
    out = apply(images, p)
    assert p.sharpen.min() < 0 < p.sharpen.max()  # both a blur and a sharpen among the six
    for i in range(len(images)):
        warped = _torchvision_warp(images[i], *(float(v[i]) for v in (p.angle, p.zoom, p.tx, p.ty)))
        expected = _numpy_photometric(warped[0].double().numpy(), *(float(v[i]) for v in (
            p.sharpen, p.contrast, p.brightness, p.gamma)))
        assert np.allclose(out[i, 0].numpy(), expected, atol=2e-5)


def test_the_parameters_keep_the_policys_distributions():
    n = 4000
    p = draw(SEED_POLICY, n, torch.empty(0), torch.Generator().manual_seed(14))
    assert abs(float(p.equalize.float().mean()) - 0.5) < 0.03
    degrees = p.angle * 180 / math.pi
    assert -25 <= degrees.min() < -24 and 19 < degrees.max() <= 20
    # the seed's crop: a zoom in [1, 1.25) whose window stays inside the image
    assert 1 <= p.zoom.min() and p.zoom.max() < 1.25 and ((p.tx.abs() <= 1 - 1 / p.zoom + 1e-6).all())
    d = draw(DEFAULT_POLICY, n, torch.empty(0), torch.Generator().manual_seed(15))
    for values, (lo, hi) in ((d.sharpen, DEFAULT_POLICY.sharpen), (d.contrast, DEFAULT_POLICY.contrast),
                             (d.brightness, (-DEFAULT_POLICY.brightness, DEFAULT_POLICY.brightness))):
        assert lo <= values.min() < lo + 0.02 * (hi - lo) and hi - 0.02 * (hi - lo) < values.max() <= hi
        assert abs(float(values.mean()) - (lo + hi) / 2) < 0.03 * (hi - lo)  # uniform
    log_gamma = d.gamma.log()
    lo, hi = math.log(DEFAULT_POLICY.gamma[0]), math.log(DEFAULT_POLICY.gamma[1])
    assert abs(float(log_gamma.mean()) - (lo + hi) / 2) < 0.03 * (hi - lo)  # log-uniform
    assert d.equalize is None and draw(GEOMETRIC_ONLY, 3, torch.empty(0)).gamma is None  # off is off


def _augment_on(threads: int, images, policy):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = augment(images, torch.Generator().manual_seed(16), policy)
        assert torch.get_num_threads() == threads  # the slices' single-threaded pool gives the count back
        return out
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("cpu_kernel")
def test_cpu_slices_on_threads_give_the_whole_batchs_result(monkeypatch):
    from pneumonia_kfp import augmentation

    images = _xray_like(7, 24)
    for policy in (DEFAULT_POLICY, SEED_POLICY):
        monkeypatch.setattr(augmentation, "CPU_SLICE_PIXELS", 10 ** 9)
        whole = _augment_on(1, images, policy)  # one slice, one thread
        monkeypatch.setattr(augmentation, "CPU_SLICE_PIXELS", 2 * 24 * 24)
        sliced = _augment_on(3, images, policy)  # slices of 2, 2, 2 and 1 images on 3 threads
        assert torch.allclose(whole, sliced, atol=1e-6)
        with torch.inference_mode():  # the pool's threads work in the caller's mode
            assert torch.equal(_augment_on(3, images, policy), sliced)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("policy", [DEFAULT_POLICY, None])
def test_rows_augments_those_rows_as_indexing_first_would(monkeypatch, policy):
    from pneumonia_kfp import augmentation

    monkeypatch.setattr(augmentation, "CPU_SLICE_PIXELS", 2 * 24 * 24)  # each slice gathers its own rows
    images = _xray_like(7, 24)
    rows = torch.tensor([6, 0, 3, 3, 5])
    indexed = _augment_on(2, images[rows], policy)
    gathered = augment(images, torch.Generator().manual_seed(16), policy, rows=rows)
    assert torch.equal(gathered, indexed)
    if policy is not None:
        assert not torch.equal(gathered[2], gathered[3])  # one image twice: two augmentations of it


ONE_AT_A_TIME = {"rotation": (-10.0, 10.0), "scale": (0.85, 1.15), "translate": 0.08, "equalize_p": 1.0,
                 "brightness": 0.1, "contrast": (0.75, 1.33), "gamma": (0.7, 1.4), "sharpen": (-1.0, 1.0)}


@pytest.mark.parametrize("field", sorted(ONE_AT_A_TIME))
@pytest.mark.usefixtures("cpu_kernel")
def test_each_augmentation_changes_images_when_on_and_nothing_when_off(field):
    images = _xray_like(16, 32)
    alone = dataclasses.replace(NEUTRAL, **{field: ONE_AT_A_TIME[field]})
    out = augment(images, torch.Generator().manual_seed(17), alone)
    change = (out - images.float() / 255).abs().flatten(1).mean(1)
    assert (change > 1e-3).float().mean() >= 0.75, field  # nearly every sample visibly changed
    assert torch.allclose(augment(images, torch.Generator().manual_seed(17), NEUTRAL), images.float() / 255,
                          atol=1e-5)


@pytest.mark.parametrize("policy", [DEFAULT_POLICY, GEOMETRIC_ONLY, None])
@pytest.mark.usefixtures("cpu_kernel")
def test_normalize_to_is_normalize_after_augment(policy):
    images = _xray_like(12, 32)
    separate = normalize(augment(images, torch.Generator().manual_seed(18), policy), 0.45, 0.23)
    fused = augment(images, torch.Generator().manual_seed(18), policy, normalize_to=(0.45, 0.23))
    assert torch.allclose(fused, separate, atol=1e-6) and fused.min() < -1  # normalised, not [0, 1]


# --- A CPU runs OpenCV's warp, log and exp; every other device torch's: the two agree, checked here on the CPU ---


@pytest.mark.parametrize("size", [(40, 40), (24, 36)])
def test_opencvs_warp_is_grid_samples(size):
    from pneumonia_kfp.augmentation import _warp_opencv, _warp_torch

    images = _xray_like(6, max(size))[..., :size[0], :size[1]].float()
    p = draw(SEED_POLICY, len(images), images, torch.Generator().manual_seed(19))  # the widest rotations
    torch_out = _warp_torch(images, p.angle, p.zoom, p.tx, p.ty)
    assert torch.allclose(_warp_opencv(images, p.angle, p.zoom, p.tx, p.ty), torch_out, atol=1e-3)  # of 255
    assert (torch_out - images).abs().mean() > 5  # every sample moved: the check is not of near-identities


@pytest.mark.parametrize("policy", [DEFAULT_POLICY, GEOMETRIC_ONLY, SEED_POLICY])
@pytest.mark.parametrize("normalize_to", [None, (0.45, 0.23)])
def test_the_cpus_opencv_recipe_is_the_batched_torch_recipe_a_gpu_runs(policy, normalize_to):
    from pneumonia_kfp.augmentation import _apply_batched, _apply_opencv

    images = _xray_like(9, 32)
    p = draw(policy, len(images), images, torch.Generator().manual_seed(21))
    opencv, batched = torch.empty(images.shape), torch.empty(images.shape)
    _apply_opencv(images, p, opencv, normalize_to)
    _apply_batched(images, p, batched, normalize_to)
    assert torch.allclose(opencv, batched, atol=1e-4)
    assert (batched - normalize(images.float() / 255, *(normalize_to or (0, 1)))).abs().mean() > 0.01  # augmented


def test_a_cpu_batch_never_goes_through_grid_sample(monkeypatch):
    """grid_sample is 2.5x OpenCV's warp on a CPU (benchmarks/data_path.py): training and TTA both keep off it."""
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: pytest.fail("grid_sample on a CPU"))
    images = _xray_like(3, 32)
    assert augment(images, torch.Generator().manual_seed(22), DEFAULT_POLICY).shape == images.shape
    assert tta_view(images, TTA_VIEWS[1]).shape == images.shape


def test_a_cpu_takes_opencv_image_by_image_from_its_size_and_batched_kernels_below(monkeypatch):
    """OpenCV's ~15 calls an image cost more than they save on small images (benchmarks/data_path.py)."""
    from pneumonia_kfp import augmentation

    taken = []
    for name in ("_apply_opencv", "_apply_batched"):
        kernel = getattr(augmentation, name)
        monkeypatch.setattr(augmentation, name, lambda *a, kernel=kernel, name=name: taken.append(name) or kernel(*a))
    monkeypatch.setattr(augmentation, "CPU_OPENCV_MIN_PIXELS", 20 * 24)
    augment(_xray_like(2, 24)[..., :20, :], torch.Generator())
    assert set(taken) == {"_apply_opencv"}
    taken.clear()
    augment(_xray_like(2, 24)[..., :19, :], torch.Generator())
    assert set(taken) == {"_apply_batched"}


@pytest.mark.parametrize("rows", [None, torch.tensor([3, 0, 3])])
def test_another_device_runs_the_batched_kernels_there_rows_included(rows):
    """On the meta device (shapes only: a GPU's path without a GPU) the whole batch stays on the device."""
    images = torch.zeros(5, 1, 32, 32, dtype=torch.uint8, device="meta")
    out = augment(images, None, DEFAULT_POLICY, normalize_to=(0.45, 0.23), rows=rows)
    assert out.device.type == "meta" and out.dtype == torch.float32
    assert out.shape == (5 if rows is None else 3, 1, 32, 32)
    assert augment(images, None, SEED_POLICY, rows=rows).shape == out.shape  # equalize too
