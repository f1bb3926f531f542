"""TrivialAugment (wide), RandAugment and random erasing: per-example ops on uint8 (H, W, 3) numpy images;
also the random-resized crop's box and CIFAR's pad-and-crop, which `transforms` runs before them.

Each is torchvision's transform (`TrivialAugmentWide`, `RandAugment`, `RandomErasing`) with the same op list
and order, magnitude bins and sampling steps, and the same pixel operations (its PIL path: PIL's affine
transform, rotate, ImageEnhance and ImageOps, which is what torchvision's reference recipe runs), so the
output of an op for a given magnitude equals torchvision's pixel for pixel. Only the random numbers differ:
every draw comes from the `np.random.Generator` the caller passes, so an example's augmentation is a function
of that generator's seed, e.g. Grain's per-example (seed, epoch, example index) generator.

Sampling (`sample_trivial_augment`, `sample_rand_augment`) is separate from applying (`apply_op`), so what
was drawn can be tested and logged.

Where they go (torchvision's `ClassificationPresetTrain`): random-resized crop, flip, then TrivialAugment or
RandAugment on the uint8 crop, then normalization, then random erasing. Erasing to torchvision's default
value 0 after normalization is erasing to the normalization mean before it: `erasing_value(mean)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# name -> (magnitude bins, whether the sign is drawn); a 0-d array: the op takes no magnitude.
OpTable = dict[str, tuple[np.ndarray, bool]]

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}
NUM_MAGNITUDE_BINS = 31  # torchvision's default for both policies
RAND_AUGMENT_NUM_OPS = 2
RAND_AUGMENT_MAGNITUDE = 9
ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height): torchvision's RandomResizedCrop.get_params, with a numpy rng."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    # Fallback: the central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def pad_and_random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pads `padding` pixels on each side, then crops the original size at a random offset."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, 2 * padding + 1))
    left = int(rng.integers(0, 2 * padding + 1))
    return padded[top : top + height, left : left + width]


def _bins(low: float, high: float, num_bins: int) -> np.ndarray:
    # float32, as torch.linspace: the magnitudes torchvision passes to its ops.
    return np.linspace(low, high, num_bins).astype(np.float32)


def _posterize_bins(num_bins: int, max_bits_removed: int) -> np.ndarray:
    return 8 - np.round(np.arange(num_bins) / ((num_bins - 1) / max_bits_removed)).astype(np.int32)


def _with_identity_and_autos(ops: OpTable) -> OpTable:
    """torchvision's order: Identity first, the magnitude ops, then AutoContrast and Equalize."""
    no_magnitude = np.array(0.0, np.float32)
    return {
        "Identity": (no_magnitude, False),
        **ops,
        "AutoContrast": (no_magnitude, False),
        "Equalize": (no_magnitude, False),
    }


def trivial_augment_wide_ops(num_bins: int = NUM_MAGNITUDE_BINS) -> OpTable:
    """torchvision TrivialAugmentWide's augmentation space (its order: the op index draws into it)."""
    return _with_identity_and_autos(
        {
            "ShearX": (_bins(0.0, 0.99, num_bins), True),
            "ShearY": (_bins(0.0, 0.99, num_bins), True),
            "TranslateX": (_bins(0.0, 32.0, num_bins), True),
            "TranslateY": (_bins(0.0, 32.0, num_bins), True),
            "Rotate": (_bins(0.0, 135.0, num_bins), True),
            "Brightness": (_bins(0.0, 0.99, num_bins), True),
            "Color": (_bins(0.0, 0.99, num_bins), True),
            "Contrast": (_bins(0.0, 0.99, num_bins), True),
            "Sharpness": (_bins(0.0, 0.99, num_bins), True),
            "Posterize": (_posterize_bins(num_bins, 6), False),
            "Solarize": (_bins(255.0, 0.0, num_bins), False),
        }
    )


def rand_augment_ops(height: int, width: int, num_bins: int = NUM_MAGNITUDE_BINS) -> OpTable:
    """torchvision RandAugment's augmentation space for (height, width) images (translation scales with them)."""
    return _with_identity_and_autos(
        {
            "ShearX": (_bins(0.0, 0.3, num_bins), True),
            "ShearY": (_bins(0.0, 0.3, num_bins), True),
            "TranslateX": (_bins(0.0, 150.0 / 331.0 * width, num_bins), True),
            "TranslateY": (_bins(0.0, 150.0 / 331.0 * height, num_bins), True),
            "Rotate": (_bins(0.0, 30.0, num_bins), True),
            "Brightness": (_bins(0.0, 0.9, num_bins), True),
            "Color": (_bins(0.0, 0.9, num_bins), True),
            "Contrast": (_bins(0.0, 0.9, num_bins), True),
            "Sharpness": (_bins(0.0, 0.9, num_bins), True),
            "Posterize": (_posterize_bins(num_bins, 4), False),
            "Solarize": (_bins(255.0, 0.0, num_bins), False),
        }
    )


def _signed(magnitude: float, signed: bool, rng: np.random.Generator) -> float:
    return -magnitude if signed and rng.integers(2) else magnitude


def sample_trivial_augment(
    rng: np.random.Generator, num_bins: int = NUM_MAGNITUDE_BINS
) -> tuple[str, float]:
    """(op, magnitude): a uniform op, a uniform bin of its magnitudes, a random sign where the op is signed."""
    ops = trivial_augment_wide_ops(num_bins)
    name = list(ops)[int(rng.integers(len(ops)))]
    magnitudes, signed = ops[name]
    magnitude = float(magnitudes[int(rng.integers(len(magnitudes)))]) if magnitudes.ndim else 0.0
    return name, _signed(magnitude, signed, rng)


def sample_rand_augment(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_ops: int = RAND_AUGMENT_NUM_OPS,
    magnitude: int = RAND_AUGMENT_MAGNITUDE,
    num_bins: int = NUM_MAGNITUDE_BINS,
) -> list[tuple[str, float]]:
    """[(op, magnitude)] * num_ops: uniform ops (with repetition), each at bin `magnitude`, random signs."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"RandAugment magnitude {magnitude} is not a bin of {num_bins}")
    ops = rand_augment_ops(height, width, num_bins)
    drawn = []
    for _ in range(num_ops):
        name = list(ops)[int(rng.integers(len(ops)))]
        magnitudes, signed = ops[name]
        value = float(magnitudes[magnitude]) if magnitudes.ndim else 0.0
        drawn.append((name, _signed(value, signed, rng)))
    return drawn


def _inverse_affine(
    center: Sequence[float], translate: Sequence[float], shear: Sequence[float]
) -> list[float]:
    """torchvision's `_get_inverse_affine_matrix` at angle 0, scale 1: the output -> input pixel map PIL takes."""
    rot, sx, sy = 0.0, math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def _geometric(
    image: Image.Image, name: str, magnitude: float, resample: int, fill: tuple
) -> Image.Image:
    if name == "Rotate":
        return image.rotate(magnitude, resample, expand=False, center=None, fillcolor=fill)
    # Shears pivot on the top-left corner (torchvision passes center=[0, 0]), translations on the centre.
    shear_degrees = math.degrees(math.atan(magnitude))
    center, translate, shear = {
        "ShearX": ((0, 0), (0, 0), (shear_degrees, 0.0)),
        "ShearY": ((0, 0), (0, 0), (0.0, shear_degrees)),
        "TranslateX": ((image.width * 0.5, image.height * 0.5), (int(magnitude), 0), (0.0, 0.0)),
        "TranslateY": ((image.width * 0.5, image.height * 0.5), (0, int(magnitude)), (0.0, 0.0)),
    }[name]
    matrix = _inverse_affine(center, translate, shear)
    return image.transform(image.size, Image.AFFINE, matrix, resample, fillcolor=fill)


_ENHANCERS = {
    "Brightness": ImageEnhance.Brightness,
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Sharpness": ImageEnhance.Sharpness,
}
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def apply_op(
    image: np.ndarray, name: str, magnitude: float, interpolation: str = "nearest", fill: int = 0
) -> np.ndarray:
    """torchvision's `_apply_op` on a uint8 (H, W, 3) image: one named op at one (signed) magnitude.

    Shear magnitudes are the tangent of the shear angle; translations are in pixels (truncated to int);
    rotations in degrees, counter-clockwise; colour ops enhance by factor 1 + magnitude; Posterize keeps
    int(magnitude) bits; Solarize inverts pixels >= magnitude. Pixels moved in from outside are `fill`.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image)
    if name == "Identity":
        return image
    if name in _GEOMETRIC:
        out = _geometric(pil, name, magnitude, INTERPOLATIONS[interpolation], (fill,) * 3)
    elif name in _ENHANCERS:
        out = _ENHANCERS[name](pil).enhance(1.0 + magnitude)
    elif name == "Posterize":
        out = ImageOps.posterize(pil, int(magnitude))
    elif name == "Solarize":
        out = ImageOps.solarize(pil, magnitude)
    elif name == "AutoContrast":
        out = ImageOps.autocontrast(pil)
    elif name == "Equalize":
        out = ImageOps.equalize(pil)
    else:
        raise ValueError(f"unknown augmentation op {name!r}")
    return np.asarray(out)


def trivial_augment_wide(
    image: np.ndarray,
    rng: np.random.Generator,
    num_bins: int = NUM_MAGNITUDE_BINS,
    interpolation: str = "nearest",
) -> np.ndarray:
    """torchvision `TrivialAugmentWide()(image)`: one op, one magnitude, drawn from `rng`."""
    name, magnitude = sample_trivial_augment(rng, num_bins)
    return apply_op(image, name, magnitude, interpolation)


def rand_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    num_ops: int = RAND_AUGMENT_NUM_OPS,
    magnitude: int = RAND_AUGMENT_MAGNITUDE,
    num_bins: int = NUM_MAGNITUDE_BINS,
    interpolation: str = "nearest",
) -> np.ndarray:
    """torchvision `RandAugment(num_ops, magnitude)(image)`: `num_ops` ops in turn, drawn from `rng`."""
    height, width = image.shape[:2]
    for name, value in sample_rand_augment(rng, height, width, num_ops, magnitude, num_bins):
        image = apply_op(image, name, value, interpolation)
    return image


AUTO_AUGMENT_POLICIES = ("none", "trivial_augment", "rand_augment")


def auto_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    policy: str,
    *,
    num_ops: int = RAND_AUGMENT_NUM_OPS,
    magnitude: int = RAND_AUGMENT_MAGNITUDE,
    interpolation: str = "nearest",
) -> np.ndarray:
    """The named policy of AUTO_AUGMENT_POLICIES on one uint8 crop ("none": the crop, no draw from `rng`);
    num_ops and magnitude are RandAugment's. torchvision's reference recipe passes interpolation="bilinear"."""
    if policy == "none":
        return image
    if policy == "trivial_augment":
        return trivial_augment_wide(image, rng, interpolation=interpolation)
    if policy == "rand_augment":
        return rand_augment(image, rng, num_ops, magnitude, interpolation=interpolation)
    raise ValueError(
        f"unknown auto_augment policy {policy!r}; expected one of {AUTO_AUGMENT_POLICIES}"
    )


def erasing_value(mean: Sequence[float]) -> tuple[int, ...]:
    """The uint8 pixel closest to the normalization `mean` (of pixel / 255): erasing to it before
    normalization is torchvision's RandomErasing(value=0) after it, up to that rounding."""
    return tuple(int(round(255.0 * m)) for m in mean)


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    p: float = 0.5,
    scale: tuple[float, float] = ERASING_SCALE,
    ratio: tuple[float, float] = ERASING_RATIO,
    value: int | Sequence[int] = 0,
) -> np.ndarray:
    """torchvision `RandomErasing(p, scale, ratio, value)` on an (H, W, C) image of any dtype.

    torchvision erases the normalized float image to 0; here that is `value=0` on a normalized image, or
    `value=erasing_value(mean)` on the uint8 image before normalization (equal up to the rounding of the mean).

    With probability p, a rectangle of area fraction ~ U(scale) and aspect ratio (height / width)
    log-uniform in `ratio` (sides rounded to pixels) at a uniform position is set to `value` (a pixel value,
    or one per channel). torchvision's 10 tries: if no drawn box fits strictly inside, the image is unchanged.
    Returns a new array; `image` is not modified.
    """
    if rng.random() >= p:
        return image
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        erase_height = int(round(math.sqrt(erase_area * aspect_ratio)))
        erase_width = int(round(math.sqrt(erase_area / aspect_ratio)))
        if not (erase_height < height and erase_width < width):
            continue
        top = int(rng.integers(0, height - erase_height + 1))
        left = int(rng.integers(0, width - erase_width + 1))
        out = image.copy()
        out[top : top + erase_height, left : left + erase_width] = np.asarray(value, image.dtype)
        return out
    return image
