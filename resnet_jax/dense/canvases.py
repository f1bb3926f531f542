"""An offline segmentation dataset from real data: scikit-learn's handwritten digits placed on canvases.

Each canvas is `canvas_size` x `canvas_size` grey (replicated to RGB, uint8) with 2-4 digits, each upsampled
bilinearly from 8x8 to 12-24 px and placed at a random position without overlapping another, over faint noise.
Its label map is 0 (background) or digit + 1 (1..10) where the upsampled digit's intensity exceeds
`INK_THRESHOLD`; the noise stays below it, so a pixel is labelled a digit exactly where the canvas is brighter
than the threshold.

Splits never share a digit image: test canvases draw from the digits' fixed test split (`DigitsSource("test")`,
never seen by a classifier trained on digits), train and validation canvases from disjoint parts of the digits'
train split (a fixed, stratified tenth of it for validation). A canvas is a pure function of (seed, split,
index), generated on access: the source is random-access, picklable and small.

The trainer reads them as the dataset "digit_canvases" (`resnet_jax.data.pipeline`) through its own
pipeline (order, sharding, resume, eval masks), with `CanvasTrainPreprocess` and `CanvasEvalPreprocess` in
place of the classification transforms: no augmentation, and the label is a map.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from resnet_jax.data.sources import DataError, DigitsSource, Source
from resnet_jax.data.transforms import normalize

DATASET = "digit_canvases"  # the trainer's config.dataset name for these canvases
SPLITS = ("train", "validation", "test")
NUM_CLASSES = 11  # background + the ten digits
CLASS_NAMES = ("background",) + tuple(str(d) for d in range(10))
INK_THRESHOLD = 0.5  # of the digit's intensity range: above it a pixel belongs to the digit
NOISE_LEVEL = 0.15  # the background noise's maximum, as a fraction of white; below INK_THRESHOLD
VALIDATION_FRACTION = 0.1  # of each class of the digits' train split
_SPLIT_IDS = {split: number for number, split in enumerate(SPLITS)}
# Fixes which train digits are validation digits, independent of the canvases' `seed`.
_VALIDATION_SEED = 20_261_130


@functools.cache
def split_digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, np.ndarray]]:
    """(grey images float32 (N, 8, 8) in [0, 1], labels (N,), (digits split, indices in it)) of a canvas split.

    The last element names the source images: indices into `DigitsSource(digits_split)`.
    """
    if split not in SPLITS:
        raise DataError(f"digit canvases have splits {SPLITS}, not {split!r}")
    digits_split = "test" if split == "test" else "train"
    source = DigitsSource(digits_split)
    images = np.stack([source[i]["image"][..., 0] for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))], np.int32)
    indices = np.arange(len(source))
    if split != "test":
        rng = np.random.default_rng(_VALIDATION_SEED)
        validation = np.zeros(len(source), bool)
        for label in range(10):
            members = rng.permutation(np.flatnonzero(labels == label))
            validation[members[: round(len(members) * VALIDATION_FRACTION)]] = True
        indices = np.flatnonzero(validation if split == "validation" else ~validation)
    return images[indices].astype(np.float32) / 255.0, labels[indices], (digits_split, indices)


def upsample_digit(image: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 float image in [0, 1] bilinearly resized to `size` x `size`, in [0, 1]."""
    resized = Image.fromarray(image.astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _place(
    rng: np.random.Generator, boxes: list[tuple[int, int, int]], size: int, canvas_size: int
) -> tuple[int, int] | None:
    """A top-left corner for a `size` box that overlaps none of `boxes` (y, x, size), or None after 50 tries."""
    for _ in range(50):
        y, x = rng.integers(0, canvas_size - size + 1, size=2)
        if all(
            y + size <= by or by + bs <= y or x + size <= bx or bx + bs <= x for by, bx, bs in boxes
        ):
            return int(y), int(x)
    return None


class DigitCanvases(Source):
    """Random-access canvases of one split: records `{'image': uint8 (S, S, 3), 'label': uint8 (S, S), 'path'}`.

    `label` is the per-pixel class map (0 background, 1..10 digit + 1), the dense counterpart of a
    classification record's label.
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        split: str,
        num_examples: int,
        *,
        seed: int = 0,  # the trainer's canvases are seed 0: its config.seed shuffles, never redraws
        canvas_size: int = 64,
        digits_per_canvas: tuple[int, int] = (2, 4),
        digit_sizes: tuple[int, int] = (12, 24),
    ):
        if digit_sizes[1] > canvas_size:
            raise ValueError(f"digit_sizes {digit_sizes} do not fit a {canvas_size}px canvas")
        self._images, self._labels, _ = split_digits(split)
        self.split, self.num_examples, self.seed = split, num_examples, seed
        self.canvas_size = canvas_size
        self.digits_per_canvas, self.digit_sizes = tuple(digits_per_canvas), tuple(digit_sizes)

    def __repr__(self) -> str:
        return (
            f"DigitCanvases(split={self.split!r}, num_examples={self.num_examples}, seed={self.seed}, "
            f"canvas_size={self.canvas_size}, digits_per_canvas={self.digits_per_canvas}, "
            f"digit_sizes={self.digit_sizes})"
        )

    def __len__(self) -> int:
        return self.num_examples

    def layout(self, index: int) -> list[tuple[int, int, int, int]]:
        """The canvas's digits as (index into this split's digits, y, x, size), a function of (seed, split, index)."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"canvas {index} of {self.num_examples}")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        count = int(rng.integers(self.digits_per_canvas[0], self.digits_per_canvas[1] + 1))
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            digit = int(rng.integers(len(self._labels)))
            size = int(rng.integers(self.digit_sizes[0], self.digit_sizes[1] + 1))
            corner = _place(rng, [(y, x, s) for _, y, x, s in placed], size, self.canvas_size)
            if corner is not None:
                placed.append((digit, *corner, size))
        return placed

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        layout = self.layout(index)
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index, 1])
        side = self.canvas_size
        intensity = rng.uniform(0.0, NOISE_LEVEL, size=(side, side)).astype(np.float32)
        label = np.zeros((side, side), np.uint8)
        for digit, y, x, size in layout:
            ink = upsample_digit(self._images[digit], size)
            window = (slice(y, y + size), slice(x, x + size))
            intensity[window] = np.maximum(intensity[window], ink)
            label[window] = np.where(ink > INK_THRESHOLD, self._labels[digit] + 1, label[window])
        image = np.round(intensity * 255.0).astype(np.uint8)
        return {
            "image": np.repeat(image[..., None], 3, axis=-1),
            "label": label,
            "path": f"digit_canvases/{self.split}/{index}",
        }

    def source_digits(self, index: int) -> list[int]:
        """Indices into `DigitsSource(split_digits(split)[2][0])` of the digit images on canvas `index`."""
        _, _, (_, indices) = split_digits(self.split)
        return [int(indices[digit]) for digit, *_ in self.layout(index)]

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The digits' train statistics, not the canvases': a backbone pretrained on the digits (the default
        run) expects its inputs normalized as they were in its training."""
        return DigitsSource("train").stats()


class CanvasTrainPreprocess(grain.transforms.RandomMap):
    """A training canvas as the model sees it: `{'image': float32 normalized (S, S, 3), 'label': int32 (S, S)}`.

    No augmentation: a flip or a crop changes what a digit is (or cuts it), and the canvases are already
    randomly laid out. A RandomMap only because the training stream (`data.stream`) applies one.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        del rng
        return {
            "image": normalize(element["image"], self.mean, self.std),
            "label": np.asarray(element["label"], np.int32),
        }


class CanvasEvalPreprocess(grain.transforms.Map):
    """One eval batch of canvas records -> `{'image', 'label' int32 (B, S, S), 'mask' (B,)}`.

    As `data.transforms.EvalPreprocess` does for classification: rows past the records are zeros with mask 0,
    so `map([])` is a whole padding batch and every process yields full batches.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], batch_size: int, canvas_size: int
    ):
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.canvas_size = batch_size, canvas_size

    def map(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        if len(elements) > self.batch_size:
            raise ValueError(f"{len(elements)} records for an eval batch of {self.batch_size}")
        side = self.canvas_size
        batch = {
            "image": np.zeros((self.batch_size, side, side, 3), np.float32),
            "label": np.zeros((self.batch_size, side, side), np.int32),
            "mask": np.zeros((self.batch_size,), np.float32),
        }
        for row, element in enumerate(elements):
            batch["image"][row] = normalize(element["image"], self.mean, self.std)
            batch["label"][row] = element["label"]
            batch["mask"][row] = 1.0
        return batch
