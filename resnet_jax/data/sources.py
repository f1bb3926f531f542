"""Random-access dataset sources: scikit-learn's digits and TFDS (ArrayRecord); image folders are in `folder`.

Every source is a Grain `RandomAccessDataSource` (`__len__` and `__getitem__`) whose records are plain dicts

    {'image': <uint8 HWC ndarray | encoded image bytes>, 'label': np.int32, 'path': str}

so one Grain pipeline (`resnet_jax.data.pipeline`) decodes, augments and batches all of them. Encoded bytes are
decoded in the pipeline, not here, so JPEGs can be decoded at reduced size once the crop is known (PIL `draft`).
Sources are picklable: Grain worker processes receive them. Every repr is stable across runs and machines.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import os
from typing import Any

import numpy as np

from resnet_jax.data.jpeg import decode_image
from resnet_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_rgb

# Per-channel mean/std (of pixel/255 over the train split) of TFDS datasets whose statistics are standard;
# any other dataset has them estimated from a sample of its train split.
KNOWN_STATS = {
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet2012_subset": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenette": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenet_v2": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

PREPARE_HINT = "run `python -m resnet_jax.data.prepare {name} --data_dir {data_dir}` (needs `pip install .[prepare]`)"


class DataError(ValueError):
    """A dataset cannot be used as configured; the message says how to fix it."""


class Source:
    """A random-access source with the metadata the pipeline needs."""

    class_names: tuple[str, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError


def estimate_stats(
    source: Source, num_samples: int = 256
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of pixel/255 over an evenly spread sample of the source, decoded at ~64 px."""
    indices = np.unique(np.linspace(0, len(source) - 1, min(num_samples, len(source))).astype(int))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for index in indices:
        try:
            image = decode_image(source[int(index)]["image"])
            image.draft("RGB", (64, 64))
            # `to_rgb`, as training sees the image: transparency over ALPHA_BACKGROUND, not hidden colours.
            pixels = np.asarray(to_rgb(image), np.float64).reshape(-1, 3) / 255.0
        except Exception:  # an unreadable sample is left out of the estimate
            continue
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    if count == 0:
        raise DataError("Could not decode any image to estimate the dataset's mean/std.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------------------------------------------
# Held-out shares: decided per example by a hash, so adding or removing examples never moves another one.


def hash_fraction(key: str) -> float:
    """A fixed number in [0, 1) for `key`, uniform over keys: an example is held out when it is below the share.

    SHA-256 rather than a CRC: CRCs of names that differ in one digit (img001, img002, ...) are correlated.
    """
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def index_hash_fractions(num_examples: int) -> np.ndarray:
    """`hash_fraction`'s counterpart for records known only by their index (splitmix64 of the index)."""
    z = np.arange(num_examples, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


class Subset(Source):
    """The records `indices` of another source, in that order (a held-out share, or what remains of it)."""

    def __init__(self, source: Source, indices: np.ndarray, name: str):
        self.class_names = source.class_names
        self._source, self._indices, self._name = source, np.asarray(indices, np.int64), name

    def __repr__(self) -> str:
        return f"{self._source!r}.{self._name}(num_examples={len(self)})"

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits: the bundled offline dataset.

DIGITS_NUM_TEST = 360  # 20% of 1,797, stratified
# 10% of the other 1,437, stratified: model selection never looks at the test digits.
DIGITS_NUM_VALIDATION = 144
DIGITS_SPLITS = ("train", "validation", "test")


def _stratified_take(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of `count` examples, each class's share of them by largest remainder (they add up to `count`)."""
    class_sizes = np.bincount(labels, minlength=10)
    quotas = class_sizes * count / len(labels)
    taken = np.floor(quotas).astype(int)
    taken[np.argsort(-(quotas - taken), kind="stable")[: count - taken.sum()]] += 1
    mask = np.zeros(len(labels), bool)
    for label in range(10):
        members = np.flatnonzero(labels == label)
        mask[rng.permutation(members)[: taken[label]]] = True
    return mask


def load_digits_file() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as `sklearn.datasets.load_digits()` gives them: (images float64 (1797, 8, 8) of
    0..16, target int (1797,)), read from the file scikit-learn ships without importing scikit-learn.

    Importing `sklearn.datasets` imports scipy.stats and most of scikit-learn, a large share of a training
    process's start-up for one 1,797-row CSV; this reads the same file the same way (gzip text, `np.loadtxt`
    with a comma delimiter, the last column the target).
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn")
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz"
    )
    if not os.path.exists(path):
        # A scikit-learn that keeps the file elsewhere: its own loader, slower to import.
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


@functools.cache
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, 8, 8, 3), labels int32 (N,))} for train, validation and test."""
    digit_images, digit_target = load_digits_file()
    # Pixel values are integers 0..16; spreading them over 0..255 keeps the 17 levels distinct and makes the
    # digits an ordinary 8-bit image, so resizing and normalization treat them like any other dataset.
    images = np.round(digit_images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digit_target.astype(np.int32)
    # Fixed, stratified splits, independent of any seed: 20% test, then 10% of the rest for validation.
    rng = np.random.default_rng(20_170_101)
    test = _stratified_take(labels, DIGITS_NUM_TEST, rng)
    rest = np.flatnonzero(~test)
    validation = np.zeros(len(labels), bool)
    validation[rest[_stratified_take(labels[rest], DIGITS_NUM_VALIDATION, rng)]] = True
    train = ~test & ~validation
    return {
        name: (images[mask], labels[mask])
        for name, mask in (("train", train), ("validation", validation), ("test", test))
    }


class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten digits (8x8 grey scans replicated to RGB), held in memory.

    Splits: train (1,293), validation (144: evaluated during training, ranks checkpoints) and test (360:
    reported at the end), all stratified by class and fixed.

    A plain in-memory source rather than a TFDS builder: preparing a builder writes files into a data dir on first
    use (and needs `importlib_resources` for a builder defined in a package), while this needs nothing but
    scikit-learn, never touches the disk, and is small enough to pickle to every Grain worker.
    """

    class_names = tuple(str(d) for d in range(10))

    def __init__(self, split: str):
        if split not in DIGITS_SPLITS:
            raise DataError(
                f"digits has splits {', '.join(map(repr, DIGITS_SPLITS))}, not {split!r}"
            )
        self._images, self._labels = _digits_splits()[split]
        self._split = split

    def __repr__(self) -> str:
        return f"DigitsSource(split={self._split!r}, num_examples={len(self)})"

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self._images[index],
            "label": self._labels[index],
            "path": f"digits/{self._split}/{index}",
        }

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Exact per-channel mean/std of pixel/255 over this split."""
        pixels = self._images.reshape(-1, 3).astype(np.float64) / 255.0
        return tuple(pixels.mean(0)), tuple(pixels.std(0))


# ----------------------------------------------------------------------------------------------------------------
# TFDS datasets prepared as ArrayRecord, read with tfds.data_source (no TensorFlow needed).


def _tfds_builder(name: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"Unknown dataset {name!r}: not a TFDS dataset name and not found in data_dir={data_dir!r}. Use "
            f"'digits' (bundled), 'folder:/path/to/images', or a TFDS name such as 'cifar10' or "
            f"'imagenet2012' (see https://www.tensorflow.org/datasets/catalog)."
        ) from e


def _tfds_problem(builder: Any, name: str, data_dir: str | None, split: str) -> DataError | None:
    """Why `builder.as_data_source(split)` failed, as a DataError that says how to fix it (None: unknown)."""
    hint = PREPARE_HINT.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
    if not builder.is_prepared():
        return DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Training never downloads; {hint}."
        )
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        return DataError(
            f"TFDS dataset {name!r} in {builder.data_dir} was prepared as {file_format}; random access "
            f"(tfds.data_source) needs array_record. Re-prepare it: {hint}."
        )
    if split not in builder.info.splits:
        return DataError(
            f"TFDS dataset {name!r} has no split {split!r} (it has {sorted(builder.info.splits)}). Set "
            f"config.train_split / config.eval_split."
        )
    return None


def _tfds_image_label_keys(info: Any) -> tuple[str, str]:
    if (
        info.supervised_keys
        and len(info.supervised_keys) == 2
        and isinstance(info.supervised_keys[0], str)
    ):
        return info.supervised_keys
    return "image", "label"


@dataclasses.dataclass(frozen=True)
class TfdsDefaults:
    """What a TFDS dataset's metadata says about the defaults of its config keys."""

    train_split: str  # "train"
    validation_split: str | None  # "validation" if the dataset has one
    test_split: str | None  # "test" if the dataset has one
    image_side: int | None  # of its images if all are one square size (CIFAR: 32), else None


@functools.lru_cache(maxsize=16)
def tfds_defaults(name: str, data_dir: str | None) -> TfdsDefaults:
    """The splits and the fixed image side of a TFDS dataset, from its builder's metadata."""
    info = _tfds_builder(name, data_dir).info
    splits = info.splits.keys()
    image_key, _ = _tfds_image_label_keys(info)
    shape = getattr(info.features[image_key], "shape", None)
    side = int(shape[0]) if shape and shape[0] and shape[0] == shape[1] else None
    return TfdsDefaults(
        "train",
        "validation" if "validation" in splits else None,
        "test" if "test" in splits else None,
        side,
    )


class TfdsSource(Source):
    """One split of a prepared TFDS dataset; image features stored as JPEG are passed on undecoded."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        builder = _tfds_builder(name, data_dir)
        self._image_key, self._label_key = _tfds_image_label_keys(builder.info)
        image_feature = builder.info.features[self._image_key]
        self.class_names = tuple(builder.info.features[self._label_key].names)
        decoders = None
        # JPEG benefits from decoding at reduced size after the crop is chosen, so it stays encoded until the
        # pipeline's transform; other encodings (PNG: CIFAR) gain nothing from that and tfds decodes them with PIL.
        if (
            isinstance(image_feature, tfds.features.Image)
            and image_feature.encoding_format == "jpeg"
        ):
            decoders = {self._image_key: tfds.decode.SkipDecoding()}
        try:
            # The builder's own as_data_source (what tfds.data_source calls) never downloads.
            self._source = builder.as_data_source(split=split, decoders=decoders)
        except Exception as e:  # tfds raises KeyError, ValueError or NotImplementedError here
            problem = _tfds_problem(builder, name, data_dir, split)
            if problem is None:
                raise
            raise problem from e
        self._name = name
        self._split = split

    def __repr__(self) -> str:
        return f"TfdsSource(name={self._name!r}, split={self._split!r}, num_examples={len(self)})"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        image = example[self._image_key]
        if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return {
            "image": image,
            "label": np.int32(example[self._label_key]),
            "path": f"{self._name}[{index}]",
        }
