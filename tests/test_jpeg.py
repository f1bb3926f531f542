"""JPEG decoding: simplejpeg and the Pillow fallback give the same crops (same boxes and scales, same pixels)."""

import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import jpeg, transforms

# Measured on the files below (2026-12-01, simplejpeg 1.9.0, Pillow 13.0): mean and max |difference| 0. Both
# run libjpeg-turbo's accurate IDCT and fancy upsampling at the same scale; the tolerance leaves room for
# the two wheels bundling different libjpeg-turbo releases, not for a different scale or box.
MEAN_ABS_DIFF_TOLERANCE = 0.1

requires_simplejpeg = pytest.mark.skipif(
    jpeg.simplejpeg is None, reason="simplejpeg not installed or RESNET_JAX_JPEG_DECODER=pillow"
)


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour field with some grain: JPEG-compressible like a photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    return np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


def _files() -> dict[str, bytes]:
    photo = Image.fromarray(_photo(500, 375))
    exif = Image.Exif()
    exif[0x0112] = (
        6  # "rotate 90 CW to view": neither path applies it, as torchvision's loader does not
    )
    return {
        "baseline 4:2:0": _encode(photo),
        "baseline 4:4:4": _encode(photo, subsampling=0),
        "progressive": _encode(photo, progressive=True),
        "grey": _encode(photo.convert("L")),
        "portrait": _encode(Image.fromarray(_photo(375, 500, seed=1))),
        "large, decoded at 1/2 to 1/8": _encode(Image.fromarray(_photo(1600, 1200, seed=2))),
        "small": _encode(Image.fromarray(_photo(40, 30, seed=3))),
        "exif orientation": _encode(photo, exif=exif),
        "cmyk (Pillow's in both)": _encode(photo.convert("CMYK")),
    }


def _preprocess(image_size: int = 224) -> transforms.TrainPreprocess:
    return transforms.TrainPreprocess(
        augment="imagenet",
        image_size=image_size,
        mean=transforms.IMAGENET_MEAN,
        std=transforms.IMAGENET_STD,
        host_normalize=False,
    )


def _with_pillow_only(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setattr(jpeg, "simplejpeg", None)
        return fn()


@requires_simplejpeg
@pytest.mark.parametrize("kind", list(_files()))
def test_simplejpeg_and_pillow_fallback_give_the_same_training_crops(kind, monkeypatch):
    raw = _files()[kind]
    preprocess = _preprocess()
    for seed in range(12):

        def crop(seed=seed):
            source = transforms.random_resized_crop_source(raw, 224, np.random.default_rng(seed))
            element = preprocess.random_map({"image": raw, "label": 0}, np.random.default_rng(seed))
            return source, element["image"]

        (image, box), pixels = crop()
        (fallback_image, fallback_box), fallback_pixels = _with_pillow_only(monkeypatch, crop)
        # The same scale and box: the crop covers the same part of the photo on either path.
        assert image.size == fallback_image.size and box == fallback_box
        assert pixels.shape == fallback_pixels.shape == (224, 224, 3)
        diff = np.abs(pixels.astype(int) - fallback_pixels.astype(int))
        assert diff.mean() <= MEAN_ABS_DIFF_TOLERANCE, (kind, seed, diff.mean())


@requires_simplejpeg
@pytest.mark.parametrize("kind", list(_files()))
def test_simplejpeg_and_pillow_fallback_give_the_same_eval_crops(kind, monkeypatch):
    raw = _files()[kind]
    for image_size, crop_fraction in [(224, 224 / 256), (64, 0.875), (160, 1.0)]:

        def crop(image_size=image_size, crop_fraction=crop_fraction):
            return transforms.eval_crop_imagenet(raw, image_size, crop_fraction)

        pixels, fallback_pixels = crop(), _with_pillow_only(monkeypatch, crop)
        assert pixels.shape == fallback_pixels.shape == (image_size, image_size, 3)
        diff = np.abs(pixels.astype(int) - fallback_pixels.astype(int))
        assert diff.mean() <= MEAN_ABS_DIFF_TOLERANCE, (kind, image_size, diff.mean())


@requires_simplejpeg
def test_which_files_simplejpeg_decodes():
    files = _files()
    assert jpeg.simplejpeg_size(files["baseline 4:2:0"]) == (500, 375)
    assert jpeg.simplejpeg_size(files["progressive"]) == (500, 375)
    assert jpeg.simplejpeg_size(files["grey"]) == (500, 375)
    assert (
        jpeg.simplejpeg_size(files["cmyk (Pillow's in both)"]) is None
    )  # simplejpeg: slow, no Adobe
    png = io.BytesIO()
    Image.fromarray(_photo(50, 40)).save(png, format="PNG")
    assert jpeg.simplejpeg_size(png.getvalue()) is None
    assert jpeg.simplejpeg_size(np.zeros((8, 8, 3), np.uint8)) is None
    assert (
        jpeg.simplejpeg_size(_encode(Image.fromarray(_photo(7, 5)))) is None
    )  # see simplejpeg_size


@requires_simplejpeg
def test_a_large_jpeg_is_decoded_at_the_scale_pillows_draft_picks():
    raw = _files()["large, decoded at 1/2 to 1/8"]
    for requested, scale in [(1600, 1.0), (700, 0.5), (300, 0.25), (224, 0.25), (200, 0.125)]:
        image, got = jpeg.decode_scaled(raw, (1600, 1200), requested, requested * 0.75)
        pillow = Image.open(io.BytesIO(raw))
        assert jpeg.draft_jpeg(pillow, requested, requested * 0.75) == (scale, scale)
        assert got == scale and image.size == pillow.size and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(pillow.convert("RGB")))


def test_draft_scale_is_pillows_rule():
    raw = _encode(Image.fromarray(_photo(1600, 1200)))
    for requested_width, requested_height in [
        (1600, 10),
        (799, 10),
        (800, 599),
        (401, 300),
        (200, 149),
    ]:
        image = Image.open(io.BytesIO(raw))
        drafted_x, _ = jpeg.draft_jpeg(image, requested_width, requested_height)
        scale = jpeg.draft_scale(1600, 1200, requested_width, requested_height)
        assert drafted_x == 1 / scale, (requested_width, requested_height)


@requires_simplejpeg
def test_rgb_view_maps_rgbx_pixels_as_an_rgb_image_without_a_copy():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    image = jpeg.rgb_view(pixels)
    assert image.mode == "RGB" and image.size == (7, 5) and image.readonly
    np.testing.assert_array_equal(np.asarray(image), pixels[..., :3])
    pixels[0, 0, 0] ^= 0xFF  # the image is a view: it sees the change
    assert image.getpixel((0, 0))[0] == pixels[0, 0, 0]
    resized = image.resize((3, 2), Image.BILINEAR)
    expected = Image.fromarray(np.ascontiguousarray(pixels[..., :3])).resize((3, 2), Image.BILINEAR)
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(expected))


@pytest.mark.parametrize("simplejpeg_installed", [True, False])
def test_a_truncated_jpeg_is_reported_by_path_on_either_path(
    simplejpeg_installed, monkeypatch, caplog
):
    if simplejpeg_installed and jpeg.simplejpeg is None:
        pytest.skip("simplejpeg not installed or RESNET_JAX_JPEG_DECODER=pillow")
    if not simplejpeg_installed:
        monkeypatch.setattr(jpeg, "simplejpeg", None)
    raw = _files()["baseline 4:2:0"]
    truncated = raw[: len(raw) // 2]
    with pytest.raises(transforms.UNDECODABLE_IMAGE_ERRORS):
        image, _ = transforms.random_resized_crop_source(truncated, 224, np.random.default_rng(0))
        image.load()
    with caplog.at_level(logging.WARNING):
        element = {"image": truncated, "label": 0, "path": "/data/cat/truncated.jpg"}
        assert _preprocess().random_map(element, np.random.default_rng(0)) is None
    assert "Skipping undecodable image /data/cat/truncated.jpg" in caplog.text


def test_an_environment_variable_selects_the_pillow_fallback():
    code = "from resnet_jax.data import jpeg; print(jpeg.simplejpeg is None)"
    env = {**os.environ, "RESNET_JAX_JPEG_DECODER": "pillow"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True
    )
    assert result.stdout.strip() == "True", result.stderr


def test_a_pillow_without_the_rgb_mapping_falls_back_to_its_own_decoder(monkeypatch):
    def changed_signature(*args):
        raise TypeError("map_buffer() takes other arguments")

    assert jpeg._rgb_view_works()
    monkeypatch.setattr(Image.core, "map_buffer", changed_signature)
    assert not jpeg._rgb_view_works()  # and then the module sets simplejpeg = None at import
