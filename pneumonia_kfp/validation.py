"""What ingest accepts: every file decoded fully before it counts, and checks across splits.

A rejected file gets one reason a person can act on; no file, however hostile, gets a traceback or a
hang. Whole-dataset problems (a split left with no valid image of a class, the same image in two
splits) are errors; the same patient in train and test is a
warning (the official Kermany split has a few).
"""
import io
from collections import defaultdict

import numpy as np

from pneumonia_kfp.errors import DataError
from pneumonia_kfp.params import MAX_PIXELS_ENV
from pneumonia_kfp.params import (
    MIN_IMAGE_SIZE as MIN_SIDE,  # a source image smaller than the smallest input is no X-ray
)
from pneumonia_kfp.sources import ImageFile, check_every_class


def load_image(source, size: int, max_pixels: int | None = None, min_side: int = 1) -> np.ndarray:
    """Decode fully, convert to 8-bit grayscale and resize to size×size (``source``: a path or a
    binary file object). An image declaring more than ``max_pixels`` pixels, or a side under
    ``min_side``, is refused before it is decoded (ValueError)."""
    from PIL import Image

    with Image.open(source) as im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"too large: {w}x{h} px = {w * h / 1e6:.0f} MP, over the pixel limit of "
                             f"{max_pixels / 1e6:g} MP ({MAX_PIXELS_ENV})")
        if min(w, h) < min_side:
            raise ValueError(f"too small: {w}x{h} px (minimum {min_side} px a side)")
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bit instead of clipping at 255
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            a -= lo
            a *= 255 / max(hi - lo, 1)
            im = Image.fromarray(a.astype(np.uint8))
        elif im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("L").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, dtype=np.uint8)


def check_image(data: bytes, size: int, max_pixels: int, min_side: int = MIN_SIDE):
    """(uint8 size×size image, None) or (None, reason) for a file's bytes, already read."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return None, "zero-byte file"
    # our limit is checked on the header, before anything is decoded; PIL's own (a warning, then an
    # error at twice its limit) would only say the same less clearly
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return load_image(io.BytesIO(data), size, max_pixels, min_side), None
    except UnidentifiedImageError:
        return None, "not an image (no decoder recognises its content)"
    except ValueError as e:
        if str(e).startswith(("too large", "too small")):
            return None, str(e)
        return None, f"cannot be decoded: {e}"
    except Exception as e:  # hostile bytes: whatever the decoder raises, the file is rejected, never a traceback
        return None, f"cannot be decoded: {e or type(e).__name__}"
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


SKIP_REMEDY = ("Fix or remove them, or pass --on-invalid skip to leave them out (the validation report lists "
               "every one).")


def rejection_error(rejected: list[dict], total: int, remedy: str = SKIP_REMEDY) -> DataError:
    """The one-line error for rejected files (the first five named); ``remedy`` says what to do, offering
    only the flags of the command that raises it. The error's ``rejected`` holds every one."""
    shown = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    error = DataError(f"{len(rejected)} of {total} files rejected: {shown}{more}. {remedy}")
    error.rejected = rejected
    return error


def check_classes(files: list[ImageFile], splits: list[str], classes: list[str], where: str) -> None:
    """Every split needs at least one valid image of every class (``splits``: each file's split)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for f, s in zip(files, splits, strict=True):
        counts[s][f.label] += 1
    check_every_class(where, counts, classes, "has no valid image left")


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
