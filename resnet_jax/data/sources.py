"""Random-access dataset sources: scikit-learn's digits and TFDS (ArrayRecord); image folders are in `folder`.

Every source is a Grain `RandomAccessDataSource` (`__len__` and `__getitem__`) whose records are plain dicts

    {'image': <uint8 HWC ndarray | encoded image bytes>, 'label': np.int32, 'path': str}

so one Grain pipeline (`resnet_jax.data.pipeline`) decodes, augments and batches all of them. Encoded bytes are
decoded in the pipeline, not here, so JPEGs can be decoded at reduced size once the crop is known (PIL `draft`).
Sources are picklable: Grain worker processes receive them. Grain compares `repr(source)` when it restores an
iterator state, so every repr is stable across runs and machines.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from resnet_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_image

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
            pixels = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3) / 255.0
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
# scikit-learn's handwritten digits: the bundled offline dataset.

DIGITS_NUM_TEST = 360  # 20% of 1,797, stratified


@functools.cache
def _digits_train_test() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels); images uint8 (N, 8, 8, 3)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are integers 0..16; spreading them over 0..255 keeps the 17 levels distinct and makes the
    # digits an ordinary 8-bit image, so resizing and normalization treat them like any other dataset.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    # A fixed, stratified 80/20 split: every class keeps its share in both parts, independent of any seed.
    # Per-class test counts by largest remainder, so they add up to exactly DIGITS_NUM_TEST.
    class_sizes = np.bincount(labels, minlength=10)
    quotas = class_sizes * DIGITS_NUM_TEST / len(labels)
    num_test = np.floor(quotas).astype(int)
    num_test[
        np.argsort(-(quotas - num_test), kind="stable")[: DIGITS_NUM_TEST - num_test.sum()]
    ] += 1
    rng = np.random.default_rng(20_170_101)
    test_mask = np.zeros(len(labels), bool)
    for label in range(10):
        members = np.flatnonzero(labels == label)
        test_mask[rng.permutation(members)[: num_test[label]]] = True
    return images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask]


class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten digits (8x8 grey scans replicated to RGB), held in memory.

    A plain in-memory source rather than a TFDS builder: preparing a builder writes files into a data dir on first
    use (and needs `importlib_resources` for a builder defined in a package), while this needs nothing but
    scikit-learn, never touches the disk, and is small enough to pickle to every Grain worker.
    """

    class_names = tuple(str(d) for d in range(10))

    def __init__(self, split: str):
        train_images, train_labels, test_images, test_labels = _digits_train_test()
        if split == "train":
            self._images, self._labels = train_images, train_labels
        elif split == "test":
            self._images, self._labels = test_images, test_labels
        else:
            raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
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
    eval_split: str  # "validation" if the dataset has one, else "test"
    image_side: int | None  # of its images if all are one square size (CIFAR: 32), else None


@functools.lru_cache(maxsize=16)
def tfds_defaults(name: str, data_dir: str | None) -> TfdsDefaults:
    """Default splits and the fixed image side of a TFDS dataset, from its builder's metadata."""
    info = _tfds_builder(name, data_dir).info
    eval_split = "validation" if "validation" in info.splits.keys() else "test"
    image_key, _ = _tfds_image_label_keys(info)
    shape = getattr(info.features[image_key], "shape", None)
    side = int(shape[0]) if shape and shape[0] and shape[0] == shape[1] else None
    return TfdsDefaults("train", eval_split, side)


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
