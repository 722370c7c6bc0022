"""A small synthetic chest-X-ray-like ImageFolder, for tests and for `run-local` without --data.

PNEUMONIA images carry bright patchy opacities inside the lung fields, NORMAL ones do not, so a
model can learn the task; file names follow Kermany's patient-id patterns. Results on it mean
nothing about real X-rays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("NORMAL", "PNEUMONIA")
# a file at the dataset root (outside the split folders): ingest records it and the report warns
MARKER = "SYNTHETIC_DATA.txt"
# images per class and split for run-local's demo: enough for a small CNN to learn the task in 2 epochs
# at 64 px, few enough to ingest and train in about a minute on 2 cores; val >= 100 images is used as is
DEMO_COUNTS = {"train": 400, "val": 60, "test": 100}


def _blob(xx, yy, cx, cy, rx, ry, flat: int = 1) -> np.ndarray:
    """A soft elliptical bump, 1 at its centre; ``flat`` > 1 gives a flat top with soft edges."""
    return np.exp(-((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) ** flat))


def _xray(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    """A frontal chest film: bright body, two dark lung fields, spine and ribs; PNEUMONIA adds patchy
    opacities inside a lung. Position, scale, exposure, contrast and noise vary per image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    dx, dy, scale = rng.uniform(-0.06, 0.06), rng.uniform(-0.05, 0.05), rng.uniform(0.9, 1.1)
    xx, yy = (xx - 0.5 - dx) / scale + 0.5, (yy - 0.5 - dy) / scale + 0.5
    body = _blob(xx, yy, 0.5, 0.55, 0.45, 0.6, flat=3)
    lungs = sum(_blob(xx, yy, cx, 0.47, 0.15, 0.3, flat=3) for cx in (0.31, 0.69))
    ribs = 0.04 * np.sin(yy * 2 * np.pi * 8 + rng.uniform(0, 2 * np.pi)) * lungs
    img = 0.15 + 0.6 * body - 0.45 * lungs + ribs + 0.3 * _blob(xx, yy, 0.5, 0.5, 0.05, 0.6, flat=2)
    if pneumonia:  # consolidations: a few soft patches of different size within one or both lungs
        for _ in range(rng.integers(3, 7)):
            cx = rng.choice((0.31, 0.69)) + rng.uniform(-0.07, 0.07)
            cy = 0.48 + rng.uniform(-0.18, 0.2)
            r = rng.uniform(0.05, 0.1)
            img += rng.uniform(0.35, 0.6) * _blob(xx, yy, cx, cy, r, r * rng.uniform(0.7, 1.4)) * lungs
    img = rng.uniform(0.75, 1.25) * (img - img.mean()) + img.mean() + rng.uniform(-0.08, 0.08)  # contrast, exposure
    img += rng.normal(0, rng.uniform(0.03, 0.08), img.shape)  # quantum noise
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_synthetic(root: str | Path, counts: dict[str, int] | None = None, size: int = 64, seed: int = 0) -> Path:
    """Write ``counts[split]`` images per class and split (default: DEMO_COUNTS)."""
    from PIL import Image

    counts = counts or DEMO_COUNTS
    root, rng = Path(root), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("Synthetic images made by pneumonia-kfp: results on them mean nothing.\n")
    patient = 0
    for split, n in counts.items():
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if i % 2 == 0:  # two images per patient
                    patient += 1
                name = (f"person{patient}_bacteria_{i}.jpeg" if label == "PNEUMONIA"
                        else f"IM-{patient:04d}-{i:04d}.jpeg")
                Image.fromarray(_xray(rng, size, label == "PNEUMONIA")).save(folder / name, quality=90)
    return root
