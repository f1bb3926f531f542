"""The training crop's resize: Pillow's bilinear (triangle) filter over a box of the image, run by
fast_image_resize's SIMD convolution (the `cykooz-resizer` package) where it is installed, by Pillow where it
is not.

Both compute the same filter over the same box (a float box, with Pillow's support and antialiasing when
downscaling); fast_image_resize rounds its coefficients to 16-bit fixed point where Pillow keeps 22 bits, so
its pixels are within one level of Pillow's (about a fifth of them differ, with no bias: tests/test_resize.py).
It takes a 2.5-3x smaller share of the CPU per training crop (benchmarks/README.md, "Input pipeline", sixth
round), which at 500x375 is a third of everything a crop costs. Only the training crop uses it: the
evaluation resize stays Pillow's, so evaluation and `predict` give exactly torchvision's preprocessing.

cykooz-resizer ships wheels for x86-64 Linux, macOS and Windows but none for Linux on ARM, where Pillow's
resize is used. RESNET_JAX_RESIZER=pillow chooses Pillow's with it installed (to compare; worker processes
inherit it).
"""

from __future__ import annotations

import os
import threading

from PIL import Image

try:
    import cykooz_resizer
except ImportError:  # Pillow's resize below is the tested fallback
    cykooz_resizer = None
if os.environ.get("RESNET_JAX_RESIZER", "").lower() == "pillow":
    cykooz_resizer = None

_BILINEAR = (
    None
    if cykooz_resizer is None
    else cykooz_resizer.ResizeAlg.convolution(cykooz_resizer.FilterType.bilinear)
)
# A resizer per thread: decoding threads share the module, and a resizer is a mutable Rust object.
_local = threading.local()


def resizer_description() -> str:
    """Which resize the training crop uses, for benchmark records."""
    if cykooz_resizer is None:
        return "pillow"
    return f"fast_image_resize (cykooz-resizer, {_resizer().cpu_extensions.name})"


def _resizer() -> cykooz_resizer.Resizer:
    if not hasattr(_local, "resizer"):
        _local.resizer = cykooz_resizer.Resizer()
    return _local.resizer


def resize_box(
    image: Image.Image, box: tuple[float, float, float, float], size: int
) -> Image.Image:
    """The `box` (left, top, right, bottom, in pixels, fractional allowed) of an RGB `image` resized to
    size x size with Pillow's bilinear filter: what `image.resize((size, size), Image.BILINEAR, box=box)`
    gives, within one level per pixel where fast_image_resize runs it."""
    left, top, right, bottom = box
    width, height = image.size
    inside = 0 <= left < right <= width and 0 <= top < bottom <= height
    if cykooz_resizer is None or image.mode != "RGB" or not inside:
        return image.resize((size, size), Image.BILINEAR, box=box)
    crop = cykooz_resizer.CropBox(left, top, right - left, bottom - top)
    resized = Image.new("RGB", (size, size))
    options = cykooz_resizer.ResizeOptions(resize_alg=_BILINEAR, crop_box=crop)
    _resizer().resize_pil(image, resized, options)
    return resized
