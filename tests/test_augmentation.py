import torch

from pneumonia_kfp.augmentation import augment, normalize


def _batch(n=16, size=32):
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 1, size, size), generator=g, dtype=torch.uint8)
    return one.repeat(n, 1, 1, 1)


def test_shapes_range_and_seeded_determinism():
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(2)))


def test_each_sample_gets_its_own_random_transform():
    out = augment(_batch(32), torch.Generator().manual_seed(3))
    flat = out.flatten(1)
    distinct = {tuple(torch.round(r * 1000).int().tolist()) for r in flat}
    assert len(distinct) == 32  # identical inputs, 32 different augmentations


def test_rotation_and_crop_move_pixels_but_keep_content():
    x = _batch(64)
    out = augment(x, torch.Generator().manual_seed(4))
    plain = x.float() / 255
    changed = (out - plain).abs().flatten(1).mean(1)
    assert (changed > 0.01).all()  # every sample was rotated/cropped
    # rotation by at most 25° with an 80-100 % crop keeps most of the image inside the frame
    assert ((out > 0).float().flatten(1).mean(1) > 0.6).all()


def test_equalize_is_applied_to_about_half():
    # a low-contrast image (values 10..25); equalize stretches it over 0..255
    dark = (torch.arange(32 * 32) % 16 + 10).to(torch.uint8).reshape(1, 1, 32, 32).repeat(200, 1, 1, 1)
    out = augment(dark, torch.Generator().manual_seed(5))
    stretched = (out.flatten(1).max(1).values > 0.5).float().mean()
    assert 0.35 < stretched < 0.65


def test_normalize():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(normalize(x, 0.5, 0.25), torch.tensor([[[[-2.0, 2.0]]]]))


def test_sampling_grid_is_the_affine_grid(monkeypatch):
    """augment's warp equals F.affine_grid + grid_sample for the same per-sample rotation and crop."""
    import math

    import torch.nn.functional as F

    import pneumonia_kfp.augmentation as aug

    monkeypatch.setattr(aug, "EQUALIZE_P", 0.0)  # the warp alone
    x = (torch.linspace(0, 1, 7 * 9).reshape(1, 1, 7, 9).repeat(3, 1, 1, 1) * 255).to(torch.uint8)
    out = augment(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay augment's draws: equalize, angle, scale, tx, ty
    torch.rand(3, generator=g)
    angle = (torch.rand(3, generator=g) * 45 - 25) * math.pi / 180
    scale = torch.rand(3, generator=g) * 0.2 + 0.8
    tx = (torch.rand(3, generator=g) * 2 - 1) * (1 - scale)
    ty = (torch.rand(3, generator=g) * 2 - 1) * (1 - scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    expected = F.grid_sample(x.float() / 255, F.affine_grid(theta, [3, 1, 7, 9], align_corners=False),
                             align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
