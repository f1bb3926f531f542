"""Decoding, augmentation and normalization: the standard recipes, as Grain transforms.

- "imagenet": train = RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip (torchvision's sampling
  algorithm); eval = resize the shorter side to image_size * 256 / 224, then center crop image_size.
- "cifar": train = pad 4 (zeros) + random crop image_size + horizontal flip; eval = the image as is.
- "none": train and eval = the image as is.
Images whose size differs from image_size are resized (bilinear, antialiased, as torchvision's PIL path) for
"cifar" and "none". JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves the crop at
least image_size pixels wide (PIL `Image.draft`): decoding dominates input cost on ImageNet-sized photos.

A training record that cannot be decoded becomes None (logged with its path) and the training stream puts the
next decodable example in its place (`stream.ReplaceUndecodable`); in eval it becomes a zero row with mask 0.

`resize_and_center_crop`, `normalize` and the ImageNet statistics are also what `resnet_jax.predict` uses, so a
prediction sees exactly the evaluation's pixels.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from PIL import Image

from resnet_jax.config import AUGMENTS

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

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode_image(image: Any) -> Image.Image:
    """A lazily decoded PIL image from a record's 'image' (ndarray or encoded bytes)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return Image.open(io.BytesIO(bytes(image)))


def draft_jpeg(
    image: Image.Image, requested_width: float, requested_height: float
) -> tuple[float, float]:
    """Lets a not yet decoded JPEG decode at a reduced size >= the requested full-image size.

    Returns the (x, y) scale applied (1.0 for anything else: PNG, arrays, already decoded images).
    """
    width, height = image.size
    if image.format == "JPEG" and requested_width < width and requested_height < height:
        image.draft("RGB", (math.ceil(requested_width), math.ceil(requested_height)))
    return image.size[0] / width, image.size[1] / height


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


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


def train_crop_imagenet(raw: Any, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random-resized crop of a record's image, as uint8 (image_size, image_size, 3)."""
    image = decode_image(raw)
    width, height = image.size
    left, top, crop_width, crop_height = random_resized_crop_box(width, height, rng)
    # Decode at the smallest size at which the crop still has >= image_size pixels per side.
    scale_x, scale_y = draft_jpeg(
        image, width * image_size / crop_width, height * image_size / crop_height
    )
    box = (
        left * scale_x,
        top * scale_y,
        (left + crop_width) * scale_x,
        (top + crop_height) * scale_y,
    )
    image = _rgb(image).resize((image_size, image_size), Image.BILINEAR, box=box)
    return np.asarray(image)


def resize_and_center_crop(
    image: Image.Image,
    image_size: int,
    crop_fraction: float = EVAL_CROP_FRACTION,
    mode: str = "RGB",
) -> np.ndarray:
    """torchvision's eval transform `Resize(int(image_size / crop_fraction))` + `CenterCrop(image_size)`.

    Returns the crop as a uint8 array (image_size, image_size[, channels]) in PIL `mode` ("RGB" or "L").
    A JPEG not yet decoded is decoded at reduced size (`draft_jpeg`), slightly off torchvision's pixels;
    pass an already decoded image for torchvision's exact result.
    """
    width, height = image.size
    resize_size = int(image_size / crop_fraction)
    # torchvision Resize(int): the shorter side becomes resize_size, the longer keeps the aspect ratio.
    if width <= height:
        new_width, new_height = resize_size, int(resize_size * height / width)
    else:
        new_width, new_height = int(resize_size * width / height), resize_size
    draft_jpeg(image, new_width, new_height)
    if image.mode != mode:
        image = image.convert(mode)
    image = image.resize((new_width, new_height), Image.BILINEAR)
    # torchvision CenterCrop's offsets.
    top = int(round((new_height - image_size) / 2.0))
    left = int(round((new_width - image_size) / 2.0))
    return np.asarray(image)[top : top + image_size, left : left + image_size]


def eval_crop_imagenet(raw: Any, image_size: int) -> np.ndarray:
    """The ImageNet eval crop of a record's image, as uint8 (image_size, image_size, 3)."""
    return resize_and_center_crop(decode_image(raw), image_size)


def whole_image(raw: Any, image_size: int) -> np.ndarray:
    """The image resized to image_size x image_size if it is not that size already."""
    if isinstance(raw, np.ndarray) and raw.shape[:2] == (image_size, image_size):
        return raw if raw.shape[-1] == 3 else np.repeat(raw[..., :1], 3, axis=-1)
    image = decode_image(raw)
    if image.size != (image_size, image_size):
        draft_jpeg(image, image_size, image_size)
        image = _rgb(image).resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(_rgb(image))


def pad_and_random_crop(image: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pads `padding` pixels on each side, then crops the original size at a random offset."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, 2 * padding + 1))
    left = int(rng.integers(0, 2 * padding + 1))
    return padded[top : top + height, left : left + width]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image / 255 - mean) / std in float32, as one multiply-add pass over the converted image."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    offset = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    out = image.astype(np.float32)
    out *= scale
    out += offset
    return out


class _Preprocess:
    """What the train and eval transforms share: the recipe, the output size and the statistics."""

    def __init__(
        self,
        augment: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
    ):
        if augment not in AUGMENTS:
            raise ValueError(f"config.augment must be one of {AUGMENTS}, got {augment!r}")
        self.augment = augment
        self.image_size = image_size
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.crop_padding = crop_padding

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        if image.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"preprocessed image has shape {image.shape}")
        return normalize(image, self.mean, self.std)


class TrainPreprocess(_Preprocess, grain.transforms.RandomMap):
    """Decode + training augmentation + normalization; None for an undecodable record."""

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray] | None:
        try:
            if self.augment == "imagenet":
                image = train_crop_imagenet(element["image"], self.image_size, rng)
            else:
                image = whole_image(element["image"], self.image_size)
                if self.augment == "cifar":
                    image = pad_and_random_crop(image, self.crop_padding, rng)
            if self.augment != "none" and rng.random() < 0.5:
                image = image[:, ::-1]
            return {"image": self._normalize(image), "label": np.int32(element["label"])}
        except UNDECODABLE_IMAGE_ERRORS as e:
            logging.warning("Skipping undecodable image %s: %s", element.get("path"), e)
            return None


class EvalPreprocess(_Preprocess, grain.transforms.Map):
    """Decode + deterministic eval resize/crop + normalization of one whole eval batch.

    The record is the list of examples of one batch (see `pipeline.create_eval_batches`): batching before the
    worker processes keeps batches identical and in order for any number of workers. Rows past the end and
    undecodable images (logged by path) are zeros with mask 0.0, so the batch count never depends on the data.
    """

    def __init__(self, *args: Any, batch_size: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size

    def preprocess(self, raw: Any) -> np.ndarray:
        """One image (ndarray or encoded bytes) as the model sees it in eval: float32 (H, W, 3).

        Raises one of UNDECODABLE_IMAGE_ERRORS for a file that is not a readable image.
        """
        if self.augment == "imagenet":
            image = eval_crop_imagenet(raw, self.image_size)
        else:
            image = whole_image(raw, self.image_size)
        return self._normalize(image)

    def map(self, elements: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        size = self.image_size
        batch = {
            "image": np.zeros((self.batch_size, size, size, 3), np.float32),
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
