"""The training crop's resize (resnet_jax/data/resize.py): fast_image_resize's within one level of Pillow's
bilinear resize of the same float box, without bias; Pillow's own wherever fast_image_resize does not apply."""

import platform
import threading

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import resize


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: both the flat and the busy regions a photo has."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _pillow(image: Image.Image, box, size: int) -> np.ndarray:
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box), np.int64)


def test_fast_image_resize_is_installed_where_it_has_wheels():
    # A missing package would silently cost a third of every training crop's CPU at 500x375.
    if platform.machine().lower() in ("x86_64", "amd64") or platform.system() == "Darwin":
        assert resize.cykooz_resizer is not None, (
            "cykooz-resizer is not importable: `pip install -e .` installs it (pyproject.toml)"
        )
        assert resize.resizer_description().startswith("fast_image_resize")
    else:
        assert resize.resizer_description() == "pillow"


@pytest.mark.parametrize("size", [24, 224, 331])
def test_within_one_level_of_pillow_on_float_boxes_without_bias(size):
    image = _photo(317, 229, seed=size)
    rng = np.random.default_rng(size)
    differences = []
    for trial in range(30):
        # Downscales and upscales, boxes at the image's edges, fractional corners.
        width, height = rng.uniform(3, 317), rng.uniform(3, 229)
        left, top = rng.uniform(0, 317 - width), rng.uniform(0, 229 - height)
        if trial % 3 == 0:
            left, top = 0.0, 229 - height
        box = (left, top, left + width, top + height)
        ours = np.asarray(resize.resize_box(image, box, size), np.int64)
        assert ours.shape == (size, size, 3)
        differences.append((ours - _pillow(image, box, size)).ravel())
    differences = np.concatenate(differences)
    assert np.abs(differences).max() <= 1
    assert abs(differences.mean()) < 0.01  # rounding, not a shift
    if resize.cykooz_resizer is not None:
        assert (differences != 0).any()  # fast_image_resize did run (16-bit coefficients)


def test_boxes_outside_the_image_and_other_modes_are_pillows_exactly():
    image = _photo(40, 30, seed=1)
    with pytest.raises(ValueError, match="negative"):  # Pillow's verdicts
        resize.resize_box(image, (-2.0, 0.0, 20.0, 20.0), 8)
    with pytest.raises(ValueError, match="exceed"):
        resize.resize_box(image, (10.0, 5.0, 41.5, 30.0), 8)
    empty = (3.0, 3.0, 3.0, 9.0)
    expected = image.resize((8, 8), Image.BILINEAR, box=empty)
    np.testing.assert_array_equal(np.asarray(resize.resize_box(image, empty, 8)), expected)
    grey = image.convert("L")
    np.testing.assert_array_equal(
        np.asarray(resize.resize_box(grey, (1.5, 2.0, 30.0, 25.0), 9)),
        np.asarray(grey.resize((9, 9), Image.BILINEAR, box=(1.5, 2.0, 30.0, 25.0))),
    )


def test_without_fast_image_resize_it_is_pillows_exactly(monkeypatch):
    monkeypatch.setattr(resize, "cykooz_resizer", None)
    image = _photo(120, 90, seed=2)
    box = (10.25, 4.5, 101.0, 88.75)
    np.testing.assert_array_equal(
        np.asarray(resize.resize_box(image, box, 64)), _pillow(image, box, 64)
    )
    assert resize.resizer_description() == "pillow"


def test_decoding_threads_resize_concurrently_to_the_same_pixels():
    image = _photo(300, 200, seed=3)
    boxes = [(i, i / 2, 150 + 3 * i, 100 + i) for i in range(12)]
    expected = [np.asarray(resize.resize_box(image, box, 56)) for box in boxes]
    failures = []

    def work():
        for _ in range(5):
            for box, want in zip(boxes, expected, strict=True):
                if not np.array_equal(np.asarray(resize.resize_box(image, box, 56)), want):
                    failures.append(box)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
