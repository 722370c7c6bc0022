import math

import torch
import torch.nn.functional as F

from pneumonia_kfp.augmentation import (
    DEFAULT_POLICY,
    GEOMETRIC_ONLY,
    SEED_POLICY,
    TTA_VIEWS,
    Policy,
    augment,
    blur3,
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
    assert torch.allclose(photometric(x, blur_only), blur3(x).clamp(0, 1), atol=1e-6)
    assert blur3(x).std() < x.std()  # a blur smooths
    assert torch.allclose(blur3(torch.full((1, 1, 5, 5), 0.4)), torch.full((1, 1, 5, 5), 0.4))  # and keeps flat areas


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
