"""Decoding, augmentation and normalization: the standard recipes, as Grain transforms.

- "imagenet": train = RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip (torchvision's sampling
  algorithm); eval = resize the shorter side to image_size * 256 / 224, then center crop image_size.
- "cifar": train = pad 4 (zeros) + random crop image_size + horizontal flip; eval = the image as is.
- "none": train and eval = the image as is.
After the crop and flip, a `TrainRecipe` adds torchvision's recipe augmentations (`augment`): TrivialAugmentWide
or RandAugment on the uint8 crop (bilinear), then normalization, then random erasing of the normalized image to
0 (torchvision's RandomErasing(value=0): the normalization mean, which `augment.erasing_value(mean)` is in
uint8 space, up to its rounding). The ImageNet eval resizes to int(image_size / crop_fraction) before its
center crop (config.eval_crop_fraction, 224/256 by default); eval may run at its own size (FixRes).
Images whose size differs from image_size are resized (bilinear, antialiased, as torchvision's PIL path) for
"cifar" and "none". JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves the crop at
least image_size pixels wide: decoding dominates input cost on ImageNet-sized photos. The training crop decodes
only the region its resize reads where our libjpeg-turbo module is built, with simplejpeg where it is not and
with PIL's `Image.draft` without simplejpeg, to the same pixels (`jpeg`). The training crop's bilinear
resize runs in fast_image_resize's SIMD code where it is installed (`resize`: within a level of Pillow's).

A training record that cannot be decoded becomes None (logged with its path) and the training stream puts the
next decodable example in its place (`stream.TrainBatches`); in eval it becomes a zero row with mask 0.

`resize_and_center_crop`, `normalize`, `composite_alpha` and the ImageNet statistics are also what
`resnet_jax.predict` uses, so a prediction sees exactly the evaluation's pixels. Transparent pixels are
composited over ALPHA_BACKGROUND (white) everywhere, in training, evaluation and prediction alike.
"""

from __future__ import annotations

import copy
import dataclasses
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from resnet_jax.config import AUGMENTS
from resnet_jax.data import jpeg
from resnet_jax.data.augment import (  # the crops live with the other augmentations
    AUTO_AUGMENT_POLICIES,
    RAND_AUGMENT_MAGNITUDE,
    RAND_AUGMENT_NUM_OPS,
    RRC_RATIO,  # noqa: F401 (benchmarks read it here)
    RRC_SCALE,  # noqa: F401
    auto_augment,
    erasing_value,
    pad_and_random_crop,
    random_erasing,
    random_resized_crop_box,
)
from resnet_jax.data.jpeg import decode_image, draft_jpeg, drafted_crop_box
from resnet_jax.data.resize import resize_box

# What decoding a bad file raises (PIL: OSError incl. UnidentifiedImageError and truncated data, SyntaxError,
# DecompressionBombError; zlib/struct errors from damaged PNG chunks). A bug in our own preprocessing (a
# ValueError from a shape check, say) is not among them: it must stop the run, not silently drop every record.
UNDECODABLE_IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    zlib.error,
    struct.error,
)

# torchvision's ImageNet statistics (per channel, of pixel / 255): what converted torchvision weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ImageNet eval recipe's crop / resize ratio: a 224 crop of the image resized to 256.
EVAL_CROP_FRACTION = 224 / 256

# What shows through transparent pixels: white, as a viewer shows an image on a page.
ALPHA_BACKGROUND = (255, 255, 255)


def composite_alpha(
    image: Image.Image, background: Sequence[int] = ALPHA_BACKGROUND
) -> Image.Image:
    """The image as RGB over an opaque `background` if it has an alpha channel or a transparent palette
    entry or color key, else unchanged: `convert("RGB")` would show the hidden colors (often black)."""
    if not image.has_transparency_data:
        return image
    rgba = image.convert("RGBA")
    backdrop = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(backdrop, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, transparency composited over ALPHA_BACKGROUND: the one conversion of every path."""
    image = composite_alpha(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_source(
    raw: Any, image_size: int, rng: np.random.Generator, region: bool = True
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The record's image (decoded at a reduced DCT scale where the crop allows, or drafted and still lazy)
    and its random-resized crop's box in that image's pixels: what `resize` to image_size takes. `region`:
    a JPEG may have only the pixels that resize reads decoded (`jpeg.decode_for_crop`); pass False when the
    crop is resized to another size."""
    size = jpeg.simplejpeg_size(raw)
    if size is None:
        image = decode_image(raw)
        return image, drafted_crop_box(image, random_resized_crop_box(*image.size, rng), image_size)
    box = random_resized_crop_box(*size, rng)
    return jpeg.decode_for_crop(raw, size, box, image_size, region=region)


def train_crop_imagenet(raw: Any, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random-resized crop of a record's image, as uint8 (image_size, image_size, 3)."""
    image, box = random_resized_crop_source(raw, image_size, rng)
    return np.asarray(resize_box(to_rgb(image), box, image_size))


def eval_resize_size(
    width: int, height: int, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> tuple[int, int]:
    """The (width, height) torchvision's `Resize(int(image_size / crop_fraction))` gives a width x height image."""
    # int() as torchvision, with a tolerance: a fraction written 224 / 232 means 232, not 231.99999.
    resize_size = int(image_size / crop_fraction + 1e-6)
    # torchvision Resize(int): the shorter side becomes resize_size, the longer keeps the aspect ratio.
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def resize_and_center_crop(
    image: Image.Image,
    image_size: int,
    crop_fraction: float = EVAL_CROP_FRACTION,
    mode: str = "RGB",
    full_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """torchvision's eval transform `Resize(int(image_size / crop_fraction))` + `CenterCrop(image_size)`.

    Returns the crop as a uint8 array (image_size, image_size[, channels]) in PIL `mode` ("RGB" or "L").
    A JPEG not yet decoded is decoded at reduced size (`draft_jpeg`), slightly off torchvision's pixels;
    pass an already decoded image for torchvision's exact result. `full_size`: the image's size before it
    was decoded at a reduced scale (`jpeg.decode_scaled`), if it was.
    """
    new_width, new_height = eval_resize_size(*(full_size or image.size), image_size, crop_fraction)
    if full_size is None:
        draft_jpeg(image, new_width, new_height)
    image = composite_alpha(image)
    if image.mode != mode:
        image = image.convert(mode)
    image = image.resize((new_width, new_height), Image.BILINEAR)
    # torchvision CenterCrop's offsets.
    top = int(round((new_height - image_size) / 2.0))
    left = int(round((new_width - image_size) / 2.0))
    return np.asarray(image)[top : top + image_size, left : left + image_size]


def eval_crop_imagenet(
    raw: Any, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION
) -> np.ndarray:
    """The ImageNet eval crop of a record's image, as uint8 (image_size, image_size, 3)."""
    size = jpeg.simplejpeg_size(raw)
    if size is None:
        return resize_and_center_crop(decode_image(raw), image_size, crop_fraction)
    resized = eval_resize_size(*size, image_size, crop_fraction)
    image, _ = jpeg.decode_scaled(raw, size, *resized)
    return resize_and_center_crop(image, image_size, crop_fraction, full_size=size)


def whole_image(raw: Any, image_size: int) -> np.ndarray:
    """The image resized to image_size x image_size if it is not that size already."""
    if isinstance(raw, np.ndarray) and raw.shape[:2] == (image_size, image_size):
        if raw.ndim == 3 and raw.shape[-1] == 3:
            return raw
        if raw.ndim == 2 or raw.shape[-1] == 1:  # grey: an alpha channel goes through `to_rgb`
            return np.repeat(raw.reshape(image_size, image_size, 1), 3, axis=-1)
    image = decode_image(raw)
    if image.size != (image_size, image_size):
        draft_jpeg(image, image_size, image_size)
        image = to_rgb(image).resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(to_rgb(image))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image / 255 - mean) / std in float32, as one multiply-add pass over the converted image."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    offset = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    out = image.astype(np.float32)
    out *= scale
    out += offset
    return out


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """The augmentations after the crop and flip (torchvision's reference recipe); the defaults are off.

    `auto_augment` is one of AUTO_AUGMENT_POLICIES, run on the uint8 crop with bilinear interpolation (as
    torchvision's ClassificationPresetTrain); random erasing comes last, on the normalized image.
    `resize_later`: the size depends on the step (progressive resizing), see `TrainPreprocess`.
    """

    auto_augment: str = "none"
    rand_augment_num_ops: int = RAND_AUGMENT_NUM_OPS
    rand_augment_magnitude: int = RAND_AUGMENT_MAGNITUDE
    random_erasing_prob: float = 0.0
    resize_later: bool = False

    @classmethod
    def from_config(cls, config: Any) -> TrainRecipe:
        """The recipe keys of a config built on `resnet_jax.config.base_config()`."""
        return cls(
            auto_augment=config.auto_augment,
            rand_augment_num_ops=config.rand_augment_num_ops,
            rand_augment_magnitude=config.rand_augment_magnitude,
            random_erasing_prob=config.random_erasing_prob,
            resize_later=config.progressive_resize_min_size > 0,
        )

    def __post_init__(self):
        if self.auto_augment not in AUTO_AUGMENT_POLICIES:
            raise ValueError(
                f"auto_augment must be one of {AUTO_AUGMENT_POLICIES}, got {self.auto_augment!r}"
            )


def eval_options(config: Any) -> dict[str, Any]:
    """The eval transform's size and crop fraction from a config: eval_image_size (0: image_size) and
    eval_crop_fraction (FixRes: a model trained at one size is often best evaluated at a larger one)."""
    return dict(
        image_size=config.eval_image_size or config.image_size,
        crop_fraction=config.eval_crop_fraction,
    )


class _Preprocess:
    """What the train and eval transforms share: the recipe, the output size and the statistics."""

    def __init__(
        self,
        augment: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        host_normalize: bool = True,  # False: images stay uint8, normalized in the step
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"config.augment must be one of {AUGMENTS}, got {augment!r}")
        self.augment = augment
        self.image_size = image_size
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.crop_padding = crop_padding
        self.host_normalize = host_normalize

    def _normalize(self, image: np.ndarray, size: int | None = None) -> np.ndarray:
        size = size or self.image_size
        if image.shape != (size, size, 3):
            raise ValueError(
                f"preprocessed image has shape {image.shape}, expected {(size, size, 3)}"
            )
        return normalize(image, self.mean, self.std) if self.host_normalize else image


class TrainPreprocess(_Preprocess, grain.transforms.RandomMap):
    """Decode + training augmentation + normalization; None for an undecodable record.

    In two halves: `decode` (the record's image and, for "imagenet", the random-resized crop's box) and
    `finish` (resize to a size, crop/flip, the recipe's augmentations, normalization). With the recipe's
    `resize_later` (progressive resizing, where the size depends on the step the example lands in),
    `random_map` only decodes (in full, so that a bad file is still caught here and replaced by the
    stream) and hands the decoded image with a copy of its generator to `finish`, which
    `progressive.AtTrainResolution` calls with the size of the example's step. Either way every random
    draw comes from the example's own generator, in the same order.
    """

    def __init__(self, *args: Any, recipe: TrainRecipe = TrainRecipe(), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.resize_later = recipe.resize_later

    def decode(self, raw: Any, rng: np.random.Generator) -> tuple[Any, Any]:
        """(image, crop box or None): the size-independent first half (a random draw for "imagenet")."""
        if self.augment == "imagenet":
            # A size set per step (progressive resizing) reads other pixels: the whole image then.
            region = not self.resize_later
            image, box = random_resized_crop_source(raw, self.image_size, rng, region=region)
        else:
            image, box = raw, None
            if self.resize_later and not isinstance(raw, np.ndarray):
                image = decode_image(raw)
                draft_jpeg(image, self.image_size, self.image_size)
        if self.resize_later and not isinstance(image, np.ndarray):
            image = to_rgb(image)
            image.load()
        return image, box

    def finish(self, decoded: tuple[Any, Any], size: int, rng: np.random.Generator) -> np.ndarray:
        """(size, size, 3): the decoded image resized, cropped, flipped (by PIL for "imagenet": cheaper than
        numpy's strided copy), augmented, normalized (float32; uint8 without `host_normalize`)."""
        image, box = decoded
        if self.augment == "imagenet":
            pixels = resize_box(to_rgb(image), box, size)
        else:
            pixels = whole_image(image, size)
            if self.augment == "cifar":
                pixels = pad_and_random_crop(pixels, self.crop_padding, rng)
        if self.augment != "none" and rng.random() < 0.5:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            pixels = pixels.transpose(flip) if isinstance(pixels, Image.Image) else pixels[:, ::-1]
        pixels, recipe = np.asarray(pixels), self.recipe
        pixels = auto_augment(
            pixels,
            rng,
            recipe.auto_augment,
            num_ops=recipe.rand_augment_num_ops,
            magnitude=recipe.rand_augment_magnitude,
            interpolation="bilinear",
        )
        normalized = self._normalize(pixels, size)
        if recipe.random_erasing_prob > 0:
            # torchvision's RandomErasing(value=0) after Normalize: the mean colour (exactly, or in uint8
            # its nearest pixel: 0 after normalization up to that rounding, |x| <= 0.5 / 255 / std).
            value = 0.0 if self.host_normalize else erasing_value(self.mean)
            normalized = random_erasing(normalized, rng, recipe.random_erasing_prob, value=value)
        return normalized

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, Any] | None:
        try:
            decoded = self.decode(element["image"], rng)
            label = np.int32(element["label"])
            if self.resize_later:
                # The stream reuses `rng` for the next record once this returns: the second half gets a copy.
                return {"decoded": decoded, "rng": copy.deepcopy(rng), "label": label}
            return {"image": self.finish(decoded, self.image_size, rng), "label": label}
        except UNDECODABLE_IMAGE_ERRORS as e:
            logging.warning("Skipping undecodable image %s: %s", element.get("path"), e)
            return None


class EvalPreprocess(_Preprocess, grain.transforms.Map):
    """Decode + deterministic eval resize/crop + normalization of one whole eval batch.

    The record is the list of examples of one batch (see `pipeline.create_eval_batches`): batching before the
    worker processes keeps batches identical and in order for any number of workers. Rows past the end and
    undecodable images (logged by path) are zeros with mask 0.0, so the batch count never depends on the data.
    `image_size` is the eval size; "imagenet" resizes to int(image_size / crop_fraction) and center-crops it.
    """

    def __init__(
        self,
        *args: Any,
        batch_size: int,
        crop_fraction: float = EVAL_CROP_FRACTION,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self.crop_fraction = crop_fraction

    def preprocess(self, raw: Any) -> np.ndarray:
        """One image (ndarray or encoded bytes) as eval sees it: float32 (H, W, 3), uint8 if not host_normalize.

        Raises one of UNDECODABLE_IMAGE_ERRORS for a file that is not a readable image.
        """
        if self.augment == "imagenet":
            image = eval_crop_imagenet(raw, self.image_size, self.crop_fraction)
        else:
            image = whole_image(raw, self.image_size)
        return self._normalize(image)

    def map(self, elements: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        size, dtype = self.image_size, np.float32 if self.host_normalize else np.uint8
        batch = {
            "image": np.zeros((self.batch_size, size, size, 3), dtype),
            "label": np.zeros((self.batch_size,), np.int32),
            "mask": np.zeros((self.batch_size,), np.float32),
        }
        for row, element in enumerate(elements):
            try:
                batch["image"][row] = self.preprocess(element["image"])
            except UNDECODABLE_IMAGE_ERRORS as e:
                logging.warning("Skipping undecodable image %s: %s", element.get("path"), e)
                continue
            batch["label"][row] = element["label"]
            batch["mask"][row] = 1.0
        return batch
