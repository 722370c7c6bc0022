"""What ingest accepts: every file decoded fully before it counts, and checks across splits.

A rejected file gets one reason a person can act on. Whole-dataset problems (a class left with no
valid image, the same image in two splits) are errors; the same patient in train and test is a
warning (the official Kermany split has a few).
"""
from collections import defaultdict
from pathlib import Path

import numpy as np

from pneumonia_kfp.data import DataError, ImageFile
from pneumonia_kfp.params import (
    MIN_IMAGE_SIZE as MIN_SIDE,  # a source image smaller than the smallest input is no X-ray
)


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (after following symlinks) stays inside the data root."""
    real_root = root.resolve()
    return path.resolve() == real_root or real_root in path.resolve().parents

def load_image(path: Path, size: int) -> np.ndarray:
    """Decode fully, convert to 8-bit grayscale and resize to size×size."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bit instead of clipping at 255
            a = np.asarray(im, dtype=np.float64)
            a = (a - a.min()) / max(a.max() - a.min(), 1) * 255
            im = Image.fromarray(a.astype(np.uint8))
        elif im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("L").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, dtype=np.uint8)


def check_file(f: ImageFile, root: Path, size: int, min_side: int = MIN_SIDE):
    """(uint8 size×size image, None) or (None, reason)."""
    from PIL import Image, UnidentifiedImageError

    if f.path.is_symlink() and not inside(f.path, root):
        return None, "symlink pointing outside the data root"
    try:
        if f.path.stat().st_size == 0:
            return None, "zero-byte file"
        with Image.open(f.path) as im:
            if min(im.size) < min_side:
                return None, f"too small: {im.size[0]}x{im.size[1]} px (minimum {min_side} px a side)"
        return load_image(f.path, size), None
    except UnidentifiedImageError:
        return None, "not an image (no decoder recognises its content)"
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation and corruption so
        return None, f"cannot be decoded: {e}"


def rejection_error(rejected: list[dict], total: int) -> DataError:
    shown = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    return DataError(
        f"{len(rejected)} of {total} files rejected: {shown}{more}. Fix or remove them, or pass "
        "--on-invalid skip to leave them out (the validation report lists every one)."
    )


def check_classes(files: list[ImageFile], classes: list[str], root: Path) -> None:
    for c in classes:
        if not any(f.label == c and f.split == "train" for f in files):
            raise DataError(f"{root}/train/{c} has no valid image left: a class needs at least one")


def check_leakage(files: list[ImageFile], splits: list[str], shas: list[str]) -> None:
    """The same image content in two splits is an error naming the pairs."""
    where = defaultdict(list)
    for f, s, h in zip(files, splits, shas, strict=True):
        where[h].append((s, f.relpath))
    pairs = [places for places in where.values() if len({s for s, _ in places}) > 1]
    if pairs:
        shown = "; ".join(" = ".join(p for _, p in places) for places in pairs[:5])
        raise DataError(f"the same image is in more than one split ({len(pairs)} cases: {shown}): "
                        "remove the duplicates so test images are never trained on")


def patients_in_both(entries: list[dict], a: str = "train", b: str = "test") -> list[str]:
    pa = {e["patient"] for e in entries if e["split"] == a and e["patient"]}
    pb = {e["patient"] for e in entries if e["split"] == b and e["patient"]}
    return sorted(pa & pb)
