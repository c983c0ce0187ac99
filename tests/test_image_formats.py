"""Every image format PIL opens gives the image a viewer shows; arrays/tensors of every pixel range.

Each case builds an image with known pixel values and compares against the 8-bit RGB values a viewer
displays (computed here by hand from the definition of the format)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitlens.errors import InputError
from vitlens.models.preprocess import image_size, load_image, preprocess_images

GREY16 = np.array([[0, 257 * 128, 65535, 257, 257 * 254], [257 * 10, 257 * 200, 257 * 77, 257 * 2, 257 * 99]],
                  dtype=np.uint16)  # (2, 5): no side of length 1, 3 or 4, so the channel layout is unambiguous
GREY8 = (GREY16 // 257).astype(np.uint8)  # exact: every value is a multiple of 257


def rgb(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def grey3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a.astype(int)[..., None], 3, -1)


# ----------------------------------------------------------------------------- 16-bit, 32-bit, float
def test_16bit_png_file_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "grey16.png"
    Image.fromarray(GREY16).save(p)  # a 16-bit greyscale PNG
    with Image.open(p) as im:
        assert im.mode in ("I;16", "I")  # what PIL opens it as (the issue: convert("RGB") gave all white)
    np.testing.assert_array_equal(rgb(load_image(p)), grey3(GREY8))


def test_16bit_big_endian_and_int32_modes():
    big = Image.frombytes("I;16B", (5, 2), GREY16.astype(">u2").tobytes())
    assert big.mode == "I;16B"
    np.testing.assert_array_equal(rgb(load_image(big)), grey3(GREY8))
    i32 = Image.fromarray(GREY16.astype(np.int32), mode="I")
    np.testing.assert_array_equal(rgb(load_image(i32)), grey3(GREY8))


def test_float_mode_in_unit_and_255_range():
    f = GREY8.astype(np.float32)
    np.testing.assert_array_equal(rgb(load_image(Image.fromarray(f / 255, mode="F"))), grey3(GREY8))
    np.testing.assert_array_equal(rgb(load_image(Image.fromarray(f, mode="F"))), grey3(GREY8))


# ----------------------------------------------------------------------------- transparency
def _rgba():
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 200, 100, 0
    a[..., 3] = [[255, 0], [128, 51]]
    return a


def _over(a, bg):
    alpha = a[..., 3:].astype(float) / 255
    return np.round(a[..., :3] * alpha + np.array(bg) * (1 - alpha)).astype(int)


@pytest.mark.parametrize("background,bg", [("white", (255, 255, 255)), ("black", (0, 0, 0))])
def test_rgba_and_la_composite_on_background(background, bg):
    a = _rgba()
    got = rgb(load_image(Image.fromarray(a, mode="RGBA"), background=background))
    assert np.abs(got - _over(a, bg)).max() <= 1  # PIL's alpha_composite rounds its own way
    la = np.stack([np.full((2, 2), 90, np.uint8), a[..., 3]], -1)
    got = rgb(load_image(Image.fromarray(la, mode="LA"), background=background))
    want = _over(np.concatenate([np.repeat(la[..., :1], 3, -1), la[..., 1:]], -1), bg)
    assert np.abs(got - want).max() <= 1


def test_default_background_is_white_and_bad_background_is_clear():
    a = _rgba()
    assert rgb(load_image(Image.fromarray(a, mode="RGBA")))[0, 1].tolist() == [255, 255, 255]
    with pytest.raises(InputError, match="background='grey'"):
        load_image(Image.fromarray(a, mode="RGBA"), background="grey")


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    for src in (im, p):
        assert rgb(load_image(src)).tolist() == [[[255, 255, 255], [250, 0, 0]]]
        assert rgb(load_image(src, background="black")).tolist() == [[[0, 0, 0], [250, 0, 0]]]
    opaque = im.copy()
    opaque.info.pop("transparency")
    assert rgb(load_image(opaque)).tolist() == [[[10, 20, 30], [250, 0, 0]]]


# ----------------------------------------------------------------------------- CMYK, EXIF, animation
def test_cmyk_tiff(tmp_path):
    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)  # red, black, white
    p = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, mode="CMYK").save(p)
    assert rgb(load_image(p)).tolist() == [[[255, 0, 0], [0, 0, 0], [255, 255, 255]]]


def _quadrants():
    a = np.zeros((32, 48, 3), np.uint8)  # 32 rows x 48 columns: top-left red, top-right green, bottom blue
    a[:16, :24] = (255, 0, 0)
    a[:16, 24:] = (0, 255, 0)
    a[16:] = (0, 0, 255)
    return a


@pytest.mark.parametrize("orientation,fn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                            (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, fn):
    a = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(a).save(p, quality=95, exif=exif)
    got = rgb(load_image(p))
    want = fn(a).astype(int)
    assert got.shape == want.shape  # rotated by 90 degrees: width and height swap
    assert image_size(p) == (want.shape[1], want.shape[0])
    assert np.abs(got - want).mean() < 8  # JPEG is lossy at the colour edges; a wrong rotation is off by ~100


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as im:
        assert im.n_frames == 3
        im.seek(2)
        assert rgb(load_image(im))[0, 0].tolist() == [0, 255, 0]  # a PIL image: the frame the caller chose
    assert rgb(load_image(p))[0, 0].tolist() == [255, 0, 0]


# ----------------------------------------------------------------------------- arrays and tensors
def test_arrays_of_every_pixel_range():
    want = grey3(GREY8)
    cases = {
        "uint8 HW": GREY8,
        "uint8 HWC": np.repeat(GREY8[..., None], 3, -1),
        "uint16": GREY16,
        "float [0,1]": GREY8 / 255.0,
        "float [0,255]": GREY8.astype(np.float32),
        "float CHW": np.repeat(GREY8[None], 3, 0) / 255.0,
    }
    for name, arr in cases.items():
        np.testing.assert_array_equal(rgb(load_image(arr)), want, err_msg=name)
    t = torch.from_numpy(np.repeat(GREY8[None], 3, 0)).float() / 255  # torch layout (3, H, W)
    np.testing.assert_array_equal(rgb(load_image(t)), want)
    np.testing.assert_array_equal(rgb(load_image(torch.from_numpy(GREY8))), want)
    rgba = _rgba()
    assert np.abs(rgb(load_image(rgba)) - _over(rgba, (255, 255, 255))).max() <= 1


@pytest.mark.parametrize("arr,match", [
    (np.array([[-0.5, 0.2]]), "looks normalised"),
    (np.array([[0.0, 300.0]]), "up to 300"),
    (np.array([[0, 7]], dtype=np.int64), "ambiguous"),
    (np.array([[np.nan, 0.2]]), "NaN"),
    (np.zeros((2, 2, 5)), "shape"),
    (np.zeros((0, 3)), "empty|shape"),
])
def test_ambiguous_or_bad_arrays_raise(arr, match):
    with pytest.raises(InputError, match=match):
        load_image(arr)


def test_preprocess_batch_and_16bit_equals_8bit(tmp_path):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    p16, p8 = tmp_path / "a16.png", tmp_path / "a8.png"
    big16 = np.kron(GREY16, np.ones((16, 16), np.uint16))
    Image.fromarray(big16).save(p16)
    Image.fromarray((big16 // 257).astype(np.uint8)).save(p8)
    x16 = preprocess_images([p16], (32, 32), mean, std, crop_pct=1.0)
    x8 = preprocess_images(p8, (32, 32), mean, std, crop_pct=1.0)
    torch.testing.assert_close(x16, x8, rtol=0, atol=0)  # the same 8-bit image, the same transform
    batch = torch.from_numpy(np.stack([big16 // 257] * 2)).to(torch.uint8)[:, None].expand(-1, 3, -1, -1)
    xb = preprocess_images(batch, (32, 32), mean, std, crop_pct=1.0)  # a (B, C, H, W) uint8 batch
    assert xb.shape == (2, 3, 32, 32)
    torch.testing.assert_close(xb[1:], x8, rtol=0, atol=0)
