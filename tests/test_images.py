"""Image decoding with real transparency and real 16-bit ranges: the pixel values the documentation
promises (transparent pixels composited on black; 16 bit scaled min..max to 0..255), computed here."""
import numpy as np
import pytest
from PIL import Image

from pneumonia_kfp.data import DataError
from pneumonia_kfp.params import DEFAULT_MAX_PIXELS
from pneumonia_kfp.sources import ImageFile, scan_image_folder
from pneumonia_kfp.validation import check_image, check_leakage, load_image, patients_in_both


def _alpha_over_black(value: float, alpha: int) -> float:
    return value * alpha / 255


def test_rgba_with_real_transparency_is_composited_on_black(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = 200
    a[:, :4, 3] = 255  # left half opaque
    a[:, 4:, 3] = 64  # right half mostly transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    px = load_image(tmp_path / "rgba.png", 8).astype(float)
    assert px[:, :4] == pytest.approx(np.full((8, 4), 200), abs=1)
    assert px[:, 4:] == pytest.approx(np.full((8, 4), _alpha_over_black(200, 64)), abs=1)  # 50, not 241 on white


def test_fully_transparent_pixels_are_black(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = 255  # white colour, but invisible
    Image.fromarray(a, "RGBA").save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", 8).max() == 0


def test_gray_with_alpha_la(tmp_path):
    a = np.zeros((8, 8, 2), np.uint8)
    a[..., 0] = 180
    a[..., 1] = 128
    Image.fromarray(a, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert load_image(tmp_path / "la.png", 8).astype(float) == pytest.approx(
        np.full((8, 8), _alpha_over_black(180, 128)), abs=1)


def test_palette_with_a_transparent_entry(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 240, 240, 240, 120, 120, 120] + [0] * (253 * 3))
    for x in range(4):
        for y in range(8):
            p.putpixel((x, y), 2)
    p.save(tmp_path / "p.png", transparency=1)  # palette entry 1 (the light grey) fully transparent
    assert Image.open(tmp_path / "p.png").mode == "P"
    px = load_image(tmp_path / "p.png", 8)
    assert (px[:, :4] == 120).all() and (px[:, 4:] == 0).all()  # transparent: black, not 240


def test_palette_with_alpha_pa(tmp_path):
    pa = Image.new("PA", (8, 8))
    pa.putpalette([0, 0, 0, 200, 200, 200] + [0] * (254 * 3))
    pa.putdata([(1, 255)] * 32 + [(1, 0)] * 32)  # top half opaque light grey, bottom half transparent
    pa.save(tmp_path / "pa.tif")  # TIFF keeps PA (PNG cannot store it)
    assert Image.open(tmp_path / "pa.tif").mode == "PA"
    px = load_image(tmp_path / "pa.tif", 8)
    assert (px[:4] == 200).all() and (px[4:] == 0).all()


def test_16_bit_is_scaled_from_its_own_range(tmp_path):
    values = np.array([[1000, 1000 + 25 * 40], [1000 + 50 * 40, 1000 + 255 * 40]], np.uint16)  # min 1000
    img = np.kron(values, np.ones((4, 4), np.uint16))  # 8x8 of 4x4 blocks
    Image.fromarray(img).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    px = load_image(tmp_path / "g16.png", 8)
    expected = ((img.astype(float) - 1000) / (255 * 40) * 255).astype(np.uint8)  # 0, 25, 50, 255
    assert (px == expected).all()
    assert sorted(set(px.ravel().tolist())) == [0, 25, 50, 255]


def test_big_endian_16_bit_is_scaled_too(tmp_path):
    values = np.array([[1000, 2028], [3000, 11200]], dtype=">u2")  # a TIFF keeps big-endian: mode I;16B
    Image.fromarray(np.kron(values, np.ones((4, 4), np.uint16)).astype(">u2")).save(tmp_path / "be.tif")
    assert Image.open(tmp_path / "be.tif").mode == "I;16B"
    px = load_image(tmp_path / "be.tif", 8)
    expected = ((values.astype(float) - 1000) / 10200 * 255).astype(np.uint8)  # 0, 25 (25.7 cut), 49, 255
    assert (px[::4, ::4] == expected).all()


def test_a_16_bit_range_of_one_still_spans_black_to_white(tmp_path):
    Image.fromarray(np.array([[500, 501]] * 2, np.uint16)).save(tmp_path / "one.png")
    px = load_image(tmp_path / "one.png", 2)
    assert (px[:, 0] == 0).all() and (px[:, 1] == 255).all()


def test_flat_16_bit_image_does_not_divide_by_zero(tmp_path):
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "flat.png")
    assert (load_image(tmp_path / "flat.png", 8) == 0).all()


def test_32_bit_integer_images_are_scaled_not_clipped(tmp_path):
    a = np.zeros((8, 8), np.int32)
    a[:, 4:] = 100  # scaled from its own range: 100 is the maximum, white (clipping would leave 100)
    Image.fromarray(a, "I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    px = load_image(tmp_path / "i32.tif", 8)
    assert (px[:, :4] == 0).all() and (px[:, 4:] == 255).all()


def test_resize_is_bilinear_to_the_requested_square(tmp_path):
    a = np.zeros((20, 40), np.uint8)
    a[:, 20:] = 200
    Image.fromarray(a).save(tmp_path / "wide.png")
    px = load_image(tmp_path / "wide.png", 10)
    assert px.shape == (10, 10) and px.dtype == np.uint8
    assert (px[:, :4] == 0).all() and (px[:, 6:] == 200).all()


def _file(root, rel):
    return ImageFile(rel.split("/")[0], rel.split("/")[1], root / rel, rel)


def test_check_image_reasons_and_the_minimum_side(tmp_path):
    Image.new("L", (32, 40), 9).save(tmp_path / "ok.png")
    Image.new("L", (31, 40), 9).save(tmp_path / "narrow.png")
    ok, narrow = (tmp_path / "ok.png").read_bytes(), (tmp_path / "narrow.png").read_bytes()
    image, why = check_image(ok, 16, DEFAULT_MAX_PIXELS)
    assert why is None and image.shape == (16, 16) and (image == 9).all()
    assert check_image(narrow, 16, DEFAULT_MAX_PIXELS) == (None, "too small: 31x40 px (minimum 32 px a side)")
    assert check_image(narrow, 16, DEFAULT_MAX_PIXELS, min_side=31)[1] is None


def test_load_image_takes_any_side_unless_told_a_minimum(tmp_path):
    Image.new("L", (1, 5), 200).save(tmp_path / "line.png")
    assert (load_image(tmp_path / "line.png", 4) == 200).all()
    with pytest.raises(ValueError, match="too small: 1x5 px"):
        load_image(tmp_path / "line.png", 4, min_side=2)


def test_the_pixel_limit_is_checked_on_the_header_and_inclusive(tmp_path):
    Image.new("L", (1000, 1000), 9).save(tmp_path / "mp.png")  # exactly one megapixel
    data = (tmp_path / "mp.png").read_bytes()
    assert check_image(data, 16, 1_000_000)[1] is None  # at the limit: accepted
    assert check_image(data, 16, 999_999) == (None, "too large: 1000x1000 px = 1 MP, over the pixel limit of "
                                                    "0.999999 MP (PNEUMONIA_KFP_MAX_PIXELS)")
    assert check_image(data, 16, 500_000)[1] == ("too large: 1000x1000 px = 1 MP, over the pixel limit of 0.5 MP "
                                                 "(PNEUMONIA_KFP_MAX_PIXELS)")


def test_symlinks_inside_the_root_are_fine_outside_are_not(tmp_path):
    root = tmp_path / "root"
    for c in ("A", "B"):
        (root / "train" / c).mkdir(parents=True)
        Image.new("L", (40, 40), 50).save(root / "train" / c / "real.png")
    (root / "train/A/link.png").symlink_to(root / "train/A/real.png")
    Image.new("L", (40, 40), 50).save(tmp_path / "outside.png")
    (root / "train/A/out.png").symlink_to(tmp_path / "outside.png")
    _, files = scan_image_folder(root)
    problems = {f.relpath: f.problem for f in files}
    assert problems["train/A/link.png"] is None and problems["train/A/real.png"] is None
    assert problems["train/A/out.png"] == "symlink pointing outside the data root"


def test_leakage_names_every_pair_and_ignores_duplicates_within_a_split(tmp_path):
    files = [_file(tmp_path, r) for r in ("train/A/1.png", "train/A/2.png", "test/A/3.png", "val/B/4.png")]
    check_leakage(files[:2], ["train", "train"], ["same", "same"])  # the same split: not leakage
    with pytest.raises(Exception, match=r"\(1 cases: train/A/1.png = test/A/3.png\)"):
        check_leakage([files[0], files[2]], ["train", "test"], ["h", "h"])
    with pytest.raises(DataError) as e:
        check_leakage(files, ["train", "train", "test", "val"], ["h1", "h2", "h1", "h2"])
    assert str(e.value) == ("the same image is in more than one split (2 cases: train/A/1.png = test/A/3.png; "
                            "train/A/2.png = val/B/4.png): remove the duplicates so test images are never trained on")


def test_leakage_message_shows_five_cases(tmp_path):
    files = [_file(tmp_path, f"{split}/A/{i}.png") for i in range(7) for split in ("train", "test")]
    with pytest.raises(DataError) as e:
        check_leakage(files, [f.split for f in files], [f.path.stem for f in files])
    assert "(7 cases: " in str(e.value) and str(e.value).count(" = ") == 5 and "train/A/5.png" not in str(e.value)


def test_patients_in_both_train_and_test():
    entries = [{"split": "train", "patient": "p1"}, {"split": "test", "patient": "p1"},
               {"split": "train", "patient": "p2"}, {"split": "val", "patient": "p2"},
               {"split": "test", "patient": None}, {"split": "train", "patient": None},
               {"split": "test", "patient": "p0"}, {"split": "train", "patient": "p0"}]
    assert patients_in_both(entries) == ["p0", "p1"]
    assert patients_in_both(entries, "train", "val") == ["p2"]
