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


def _xray(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 150 + 40 * rng.standard_normal((size, size))
    for cx in (0.3, 0.7):  # two dark lung fields
        lung = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
        img[lung] -= 90
        if pneumonia:
            for _ in range(rng.integers(2, 4)):
                ox, oy = cx + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.2, 0.2)
                blob = ((xx - ox) ** 2 + (yy - oy) ** 2) < rng.uniform(0.004, 0.01)
                img[blob] += 100
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic(root: str | Path, counts: dict[str, int] | None = None, size: int = 64, seed: int = 0) -> Path:
    """Write ``counts[split]`` images per class and split (default train 48, test 16; no val)."""
    from PIL import Image

    counts = counts or {"train": 48, "test": 16}
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
