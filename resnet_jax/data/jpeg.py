"""Decoding a record's image, JPEGs at a reduced DCT scale: simplejpeg (libjpeg-turbo) where it is installed,
Pillow's `draft` where it is not, and Pillow for everything else. The training crop decodes only its own region
where our native module is built (`_jpeg_region.c`, below).

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

Region decoding (`decode_for_crop`) is what tf.image.decode_and_crop_jpeg does in the Flax and TPU reference
pipelines: libjpeg-turbo's partial decompression (jpeg_crop_scanline, jpeg_skip_scanlines) through a small C
module built against the system's libjpeg-turbo at install (`pip install` with its headers, Debian's
libjpeg-dev; without them the module is not built and the whole image is decoded as above). It fills only the
pixels the crop's resize reads into an otherwise zero image of the full scaled size, so the image size, the box
and every pixel the resize reads are the whole-image path's, and so is the crop, bit for bit. It skips the IDCT
outside the region and stops after its last row: 1.1x less CPU per training crop at 500x375, 1.3x at
1600x1200 (benchmarks/README.md, "Input pipeline", fifth round). Damage below the region goes unseen there, so
a file not ending in the JPEG end-of-image marker (truncated) takes the whole-image path, which reports it.
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
try:  # built by `pip install` where libjpeg-turbo's headers are
    from resnet_jax.data import _jpeg_region
except ImportError:  # the whole-image paths above and below are the tested fallbacks
    _jpeg_region = None
# RESNET_JAX_JPEG_DECODER=pillow takes the Pillow fallback with simplejpeg installed, =simplejpeg the whole-image
# simplejpeg path with the region decoder built (to compare them; worker processes inherit it).
_DECODER_CHOICE = os.environ.get("RESNET_JAX_JPEG_DECODER", "").lower()
if _DECODER_CHOICE == "pillow":
    simplejpeg = None
if _DECODER_CHOICE in ("pillow", "simplejpeg"):
    _jpeg_region = None

JPEG_SIGNATURE = b"\xff\xd8\xff"
JPEG_END_OF_IMAGE = b"\xff\xd9"
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


def rgbx_shape(size: tuple[int, int], scale: int) -> tuple[int, int, int]:
    """(height, width, 4): a (width, height) JPEG decoded at DCT scale 1/scale as RGBX (libjpeg rounds up)."""
    width, height = size
    return -(-height // scale), -(-width // scale), 4


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
    shape = rgbx_shape(size, scale)
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


def decoder_description() -> str:
    """Which JPEG decoders this process uses for the training crop, for benchmark records and logs."""
    whole = f"simplejpeg {simplejpeg.__version__}" if simplejpeg is not None else "Pillow's draft"
    if _jpeg_region is None:
        return f"whole images: {whole} (no region decoding)"
    # The libjpeg-turbo headers it was built against, e.g. 2001005 for 2.1.5.
    version = _jpeg_region.LIBJPEG_TURBO_VERSION_NUMBER
    turbo = f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"
    return f"regions: libjpeg-turbo {turbo} (_jpeg_region); damaged or unusual files: {whole}"


def decode_for_crop(
    raw: bytes,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    image_size: int,
    region: bool = True,
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A JPEG (`size` = `simplejpeg_size(raw)`) decoded for a bilinear resize of `box` (left, top, width, height
    in full-size pixels) to image_size x image_size, and the box in the decoded image's pixels: the image at
    Pillow's draft scale for it, with only the pixels that resize reads decoded where the region decoder is
    built and `region` is set (the others 0), else all of them."""
    requested = requested_size(size, box, image_size)
    if region and _jpeg_region is not None and raw.endswith(JPEG_END_OF_IMAGE):
        scale = draft_scale(*size, *requested)
        scaled = scaled_box(box, 1 / scale, 1 / scale)
        shape = rgbx_shape(size, scale)
        left, top, right, bottom = bilinear_read_window(scaled, image_size, shape[1], shape[0])
        pixels = np.zeros(shape, np.uint8)  # calloc: pages outside the region are not even touched
        try:
            _jpeg_region.decode_region(raw, scale, left, top, right - left, bottom - top, pixels)
            return rgb_view(pixels), scaled
        except ValueError:
            pass  # damaged or unusual: the whole-image path decodes it or gives Pillow's verdict
    image, scale = decode_scaled(raw, size, *requested)
    return image, scaled_box(box, scale, scale)


def bilinear_read_window(
    box: tuple[float, float, float, float], output_size: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """The pixels (left, top, right, bottom) of a width x height image that Pillow's bilinear resize of `box`
    (left, top, right, bottom) to output_size x output_size reads, with a pixel to spare each side.

    Pillow's filter spans one output pixel (max(1, input/output) input pixels) either side of each output
    pixel's centre; the outermost centres lie half an output pixel inside the box."""
    left, top, right, bottom = box
    reach_x = max(1.0, (right - left) / output_size) + 1
    reach_y = max(1.0, (bottom - top) / output_size) + 1
    return (
        max(0, math.floor(left - reach_x)),
        max(0, math.floor(top - reach_y)),
        min(width, math.ceil(right + reach_x)),
        min(height, math.ceil(bottom + reach_y)),
    )


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
    _jpeg_region = None
