"""Decoding a record's image, JPEGs at a reduced DCT scale: simplejpeg (libjpeg-turbo) where it is installed,
Pillow's `draft` where it is not, and Pillow for everything else.

Both JPEG paths pick the same scale by the same rule (Pillow's `draft`: the largest of 1/2, 1/4, 1/8 whose
decoded image is still at least the requested size) and run the same libjpeg-turbo code (accurate integer
IDCT, fancy chroma upsampling), so they give the same pixels and the same box mapping. simplejpeg's is the
cheaper path, with its output mapped into a PIL image without a copy (`rgb_view`); benchmarks/README.md ("Input
pipeline", third round) has the figures. Other n/8 scales are not used: libjpeg-turbo decodes them no faster
here, and their pixels are further from a full decode.

simplejpeg handles baseline and progressive JPEGs in YCbCr, grey (decoded to 3 equal channels, as Pillow's
L -> RGB conversion gives) or RGB. Pillow keeps everything else: CMYK/YCCK JPEGs (simplejpeg's conversion
to RGB differs from Pillow's: 1.0 level mean on a 500x375 test image), other formats, images past Pillow's
decompression-bomb limit (so the limit holds either way), and any JPEG simplejpeg refuses: Pillow then gives
today's verdict (an OSError for a truncated file; some damage libjpeg only warns about decodes). Neither
applies EXIF orientation: pixels come in stored order, as torchvision's PIL loader gives them.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # the Pillow path below is the tested fallback
    simplejpeg = None
# RESNET_JAX_JPEG_DECODER=pillow takes the fallback with simplejpeg installed (to compare the two; worker
# processes inherit it).
if os.environ.get("RESNET_JAX_JPEG_DECODER", "").lower() == "pillow":
    simplejpeg = None

JPEG_SIGNATURE = b"\xff\xd8\xff"
# Header colour spaces simplejpeg decodes to RGB exactly as Pillow does.
_SIMPLEJPEG_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})


def decode_image(image: Any) -> Image.Image:
    """A lazily decoded PIL image from a record's 'image' (ndarray, encoded bytes or a PIL image)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        # PIL has no mode for (H, W, 1): such a grey image is (H, W) to it.
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return Image.open(io.BytesIO(bytes(image)))


def draft_scale(width: int, height: int, requested_width: float, requested_height: float) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) Pillow's `draft` picks for a decode >= the requested size."""
    if requested_width >= width or requested_height >= height:
        return 1
    fit = min(width // math.ceil(requested_width), height // math.ceil(requested_height))
    return next(scale for scale in (8, 4, 2, 1) if fit >= scale)


def draft_jpeg(
    image: Image.Image, requested_width: float, requested_height: float
) -> tuple[float, float]:
    """Lets a not yet decoded JPEG decode at a reduced size >= the requested full-image size.

    Returns the (x, y) scale applied: the exact DCT scale (not decoded / full size: 188 / 375 would shift a
    box by up to a pixel); 1.0 for anything else (PNG, arrays, already decoded images)."""
    width, height = image.size
    if image.format == "JPEG" and requested_width < width and requested_height < height:
        drafted = image.draft("RGB", (math.ceil(requested_width), math.ceil(requested_height)))
        if drafted is not None:  # (mode, box): box is the full size times the exact DCT scale
            return drafted[1][2] / width, drafted[1][3] / height
    return image.size[0] / width, image.size[1] / height


def drafted_crop_box(
    image: Image.Image, box: tuple[int, int, int, int], image_size: int
) -> tuple[float, float, float, float]:
    """Drafts `image` (a lazy JPEG) to the smallest DCT scale leaving `box` (left, top, width, height in its
    full-size pixels) >= image_size wide, and returns the box as (left, top, right, bottom) in drafted pixels."""
    sx, sy = draft_jpeg(image, *requested_size(image.size, box, image_size))
    return scaled_box(box, sx, sy)


def requested_size(
    size: tuple[int, int], box: tuple[int, int, int, int], image_size: int
) -> tuple[float, float]:
    """The full-image (width, height) at which `box` (left, top, width, height) is `image_size` pixels wide and high."""
    (width, height), (_, _, crop_width, crop_height) = size, box
    return width * image_size / crop_width, height * image_size / crop_height


def scaled_box(
    box: tuple[int, int, int, int], sx: float, sy: float
) -> tuple[float, float, float, float]:
    """`box` (left, top, width, height in full-size pixels) as (left, top, right, bottom) in an image decoded at
    scale (sx, sy)."""
    left, top, crop_width, crop_height = box
    return (left * sx, top * sy, (left + crop_width) * sx, (top + crop_height) * sy)


def simplejpeg_size(raw: Any) -> tuple[int, int] | None:
    """(width, height) of a JPEG that `decode_scaled` decodes with simplejpeg; None for Pillow's path."""
    if simplejpeg is None or not isinstance(raw, bytes) or not raw.startswith(JPEG_SIGNATURE):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError:
        return None  # Pillow decodes it or says why not
    limit = Image.MAX_IMAGE_PIXELS
    if colorspace not in _SIMPLEJPEG_COLORSPACES or (limit and width * height > limit):
        return None
    if width < 8 and height < 8:
        return None  # there simplejpeg's choice among n/8 scales can differ from Pillow's at the same size
    return width, height


def decode_scaled(
    raw: bytes,
    size: tuple[int, int],
    requested_width: float,
    requested_height: float,
) -> tuple[Image.Image, float]:
    """A JPEG (`size` = `simplejpeg_size(raw)`) as an RGB image decoded at Pillow's draft scale for the
    requested full-image size, and that scale (1, 1/2, 1/4 or 1/8, exact). Pillow decodes it instead when
    simplejpeg refuses it, so a damaged file gets Pillow's verdict (raising one of its errors or not)."""
    width, height = size
    scale = draft_scale(width, height, requested_width, requested_height)
    shape = (-(-height // scale), -(-width // scale), 4)
    try:
        pixels = simplejpeg.decode_jpeg(
            raw,
            colorspace="RGBX",
            min_height=shape[0] if scale > 1 else 0,
            min_width=shape[1] if scale > 1 else 0,
        )
    except ValueError:
        image = Image.open(io.BytesIO(raw))
        scale_x, _ = draft_jpeg(image, requested_width, requested_height)
        image = image.convert("RGB")  # decodes: Pillow's error, if any, is raised here
        return image, scale_x
    return rgb_view(pixels), 1 / scale


def rgb_view(pixels: np.ndarray) -> Image.Image:
    """An RGB image over an (H, W, 4) RGBX uint8 array, without copying it.

    Pillow stores an RGB pixel in 4 bytes, so its core maps RGBX memory as RGB as it is. Its public
    `Image.frombuffer` maps it only as an RGBX image, whose resize costs a third more (4 channels), and
    `Image.fromarray` of RGB pixels copies them into that layout (~0.2 ms at 500x375): either loses most of
    what decoding with simplejpeg gains. The image keeps a reference to `pixels` and is read-only.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 4:
        raise ValueError(f"expected (H, W, 4) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    pixels = np.ascontiguousarray(pixels)
    height, width, _ = pixels.shape
    # What `Image.frombuffer` does for its mapped modes, with the image mode RGB.
    mapped = Image.core.map_buffer(pixels, (width, height), "raw", 0, ("RGB", 0, 1))
    image = Image.new("RGB", (0, 0))._new(mapped)
    image.readonly = 1
    return image


def _rgb_view_works() -> bool:
    """Whether this Pillow maps RGBX memory as RGB as `rgb_view` expects (a private core call)."""
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    try:
        return np.array_equal(np.asarray(rgb_view(pixels)), pixels[..., :3])
    except (AttributeError, TypeError, ValueError):
        return False


if simplejpeg is not None and not _rgb_view_works():
    simplejpeg = None  # a Pillow whose core changed: its own decoder, as without simplejpeg
