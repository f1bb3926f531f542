"""Region decoding of the training crop (resnet_jax/data/_jpeg_region.c): the same pixels as a whole decode."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from resnet_jax.data import jpeg, transforms
from resnet_jax.data.augment import random_resized_crop_box

try:
    from resnet_jax.data import _jpeg_region
except ImportError:  # test_the_region_decoder_is_built says why and how to build it
    _jpeg_region = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field with grain: compresses like a photo, and every region differs."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    return Image.fromarray(np.clip(field + rng.normal(0, 10, field.shape), 0, 255).astype(np.uint8))


def _encode(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


# Every chroma layout libjpeg upsamples differently, progressive scans, grey, RGB, and sizes that are not a whole
# number of 16-pixel MCUs (where libjpeg's crop grid and the last partial block meet).
FILES = {
    "4:2:0": _encode(_photo(500, 375, 0)),
    "4:2:2": _encode(_photo(500, 375, 0), subsampling=1),
    "4:4:4": _encode(_photo(500, 375, 0), subsampling=0),
    "progressive": _encode(_photo(375, 500, 1), progressive=True),
    "grey": _encode(_photo(500, 375, 2).convert("L")),
    "rgb (Adobe, no YCbCr)": _encode(_photo(200, 150, 6), keep_rgb=True, subsampling=0),
    "odd size": _encode(_photo(333, 251, 3)),
    "large": _encode(_photo(1600, 1200, 4)),
    "tiny": _encode(_photo(9, 13, 5)),
}


def _whole(raw: bytes, scale: int) -> np.ndarray:
    """The whole image decoded at 1/scale by simplejpeg (the path region decoding replaces)."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(raw)
    minimum = (
        {} if scale == 1 else {"min_height": -(-height // scale), "min_width": -(-width // scale)}
    )
    return simplejpeg.decode_jpeg(raw, colorspace="RGBX", **minimum)


def test_the_region_decoder_is_built():
    # Without it the pipeline still works (whole-image decoding), but slower and with this module untested.
    assert jpeg._jpeg_region is not None, (
        "resnet_jax/data/_jpeg_region.c was not built: install libjpeg-turbo's headers (Debian/Ubuntu: "
        "apt install libjpeg-dev) and a C compiler, then `pip install -e .` again"
    )


@pytest.mark.parametrize("kind", list(FILES))
def test_a_region_has_the_whole_decodes_pixels_and_nothing_else_is_written(kind):
    raw = FILES[kind]
    rng = np.random.default_rng(0)
    for scale in (1, 2, 4, 8):
        whole = _whole(raw, scale)
        height, width, _ = whole.shape
        regions = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, width, height)]
        for _ in range(40):
            left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
            right, bottom = (
                int(rng.integers(left + 1, width + 1)),
                int(rng.integers(top + 1, height + 1)),
            )
            regions.append((left, top, right, bottom))
        for left, top, right, bottom in regions:
            out = np.full((height, width, 4), 7, np.uint8)
            _jpeg_region.decode_region(raw, scale, left, top, right - left, bottom - top, out)
            inside = out[top:bottom, left:right, :3]
            np.testing.assert_array_equal(inside, whole[top:bottom, left:right, :3])
            untouched = np.full_like(out, True, dtype=bool)
            untouched[top:bottom, left:right] = False
            assert (out[untouched] == 7).all(), (kind, scale, left, top, right, bottom)


@pytest.mark.parametrize("kind", list(FILES))
def test_the_training_crop_is_bit_identical_with_and_without_region_decoding(kind):
    raw = FILES[kind]
    size = jpeg.simplejpeg_size(raw)
    if size is None:
        pytest.skip("too small for simplejpeg: Pillow's path, no region decoding")
    for image_size in (224, 64):
        for seed in range(25):
            box = random_resized_crop_box(*size, np.random.default_rng(seed))
            image, scaled = jpeg.decode_for_crop(raw, size, box, image_size)
            whole, whole_box = jpeg.decode_for_crop(raw, size, box, image_size, region=False)
            assert image.size == whole.size and scaled == whole_box
            crop = image.resize((image_size, image_size), Image.BILINEAR, box=scaled)
            expected = whole.resize((image_size, image_size), Image.BILINEAR, box=whole_box)
            np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))


def test_the_region_skips_pixels_the_resize_does_not_read():
    raw = FILES["large"]
    box = (1000, 700, 300, 300)  # full-size pixels, decoded at 1/1 for a 224 crop
    image, scaled = jpeg.decode_for_crop(raw, (1600, 1200), box, 224)
    pixels = np.asarray(image)
    assert scaled == (1000, 700, 1300, 1000)
    assert not pixels[:690].any() and not pixels[1010:].any()
    assert not pixels[:, :990].any() and not pixels[:, 1310:].any()
    assert (
        pixels[700:1000, 1000:1300].all(axis=-1).mean() > 0.9
    )  # decoded (a photo has few black pixels)


def test_a_truncated_file_takes_the_whole_image_path_and_is_reported():
    raw = FILES["4:2:0"]
    truncated = raw[: len(raw) // 2]
    box = (0, 0, 100, 100)  # the top-left corner, whose rows are all in the first half of the file
    out = np.zeros((375, 500, 4), np.uint8)
    _jpeg_region.decode_region(truncated, 1, 0, 0, 100, 100, out)  # the region alone decodes
    with pytest.raises(
        transforms.UNDECODABLE_IMAGE_ERRORS
    ):  # but the crop does not: Pillow's verdict
        image, _ = jpeg.decode_for_crop(truncated, (500, 375), box, 224)
        image.load()


def test_damage_inside_the_region_falls_back_to_the_whole_image_path():
    raw = bytearray(FILES["4:2:0"])
    scan = raw.rindex(b"\xff\xda")  # start of scan: entropy-coded data follows
    raw[scan + 400 : scan + 420] = (
        b"\xff\xd0" * 10
    )  # stray restart markers: libjpeg warns, decodes on
    raw = bytes(raw)
    out = np.zeros((375, 500, 4), np.uint8)
    with pytest.raises(ValueError, match="JPEG decode failed"):
        _jpeg_region.decode_region(raw, 1, 0, 0, 500, 375, out)
    box = (0, 0, 500, 375)
    region_result = jpeg.decode_for_crop(raw, (500, 375), box, 224)
    whole_result = jpeg.decode_for_crop(raw, (500, 375), box, 224, region=False)
    assert region_result[1] == whole_result[1]
    np.testing.assert_array_equal(np.asarray(region_result[0]), np.asarray(whole_result[0]))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((1, 0, 0, 501, 10), "outside the image"),
        ((2, 0, 180, 10, 10), "outside the image"),
        ((3, 0, 0, 10, 10), "scale_denom must be 1, 2, 4 or 8"),
        ((1, 0, 0, 0, 10), "empty"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(arguments, message):
    out = np.zeros((375, 500, 4), np.uint8)
    if arguments[0] == 2:
        out = np.zeros((188, 250, 4), np.uint8)
    with pytest.raises(ValueError, match=message):
        _jpeg_region.decode_region(FILES["4:2:0"], *arguments, out)
    with pytest.raises(ValueError, match=r"out is not \(height, width, 4\)"):
        _jpeg_region.decode_region(
            FILES["4:2:0"], 2, 0, 0, 10, 10, np.zeros((375, 500, 4), np.uint8)
        )
    with pytest.raises(ValueError, match="colour space"):
        cmyk = _encode(_photo(64, 48, 6).convert("CMYK"))
        _jpeg_region.decode_region(cmyk, 1, 0, 0, 8, 8, np.zeros((48, 64, 4), np.uint8))


def test_the_environment_variable_selects_whole_image_simplejpeg():
    code = "from resnet_jax.data import jpeg; print(jpeg._jpeg_region is None, jpeg.simplejpeg is None)"
    env = {**os.environ, "RESNET_JAX_JPEG_DECODER": "simplejpeg"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert result.stdout.split() == ["True", "False"], result.stderr
