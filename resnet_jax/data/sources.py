"""Random-access dataset sources: TFDS (ArrayRecord), a folder of images, and scikit-learn's digits.

Every source is a Grain `RandomAccessDataSource` (`__len__` and `__getitem__`) whose records are plain dicts

    {'image': <uint8 HWC ndarray | encoded image bytes>, 'label': np.int32, 'path': str}

so one Grain pipeline (`resnet_jax.data.pipeline`) decodes, augments and batches all of them. Encoded bytes are
decoded in the pipeline, not here, so JPEGs can be decoded at reduced size once the crop is known (PIL `draft`),
which is what dominates input cost on ImageNet. Sources are picklable: Grain worker processes receive them.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import zlib
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# torchvision's ImageNet statistics: what converted torchvision weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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

# Names a folder dataset's evaluation folder commonly has; any of them serves when the configured one is absent.
CONVENTIONAL_EVAL_FOLDERS = ("val", "validation", "test")

PREPARE_HINT = "run `python -m resnet_jax.data.prepare {name} --data_dir {data_dir}` (needs `pip install .[prepare]`)"


class DataError(ValueError):
    """A dataset cannot be used as configured; the message says how to fix it."""


class Source:
    """A random-access source with the metadata the pipeline needs."""

    class_names: tuple[str, ...]
    # Native (height, width) of every image if all share one size (digits, CIFAR), else None.
    native_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits: the bundled offline dataset.

DIGITS_NUM_TEST = 360  # 20% of 1,797, stratified


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    scikit-learn, never touches the disk, and is trivially picklable for Grain workers (115 KB).
    """

    class_names = tuple(str(d) for d in range(10))
    native_size = (8, 8)

    def __init__(self, split: str):
        train_images, train_labels, test_images, test_labels = _digits_arrays()
        if split == "train":
            self._images, self._labels = train_images, train_labels
        elif split == "test":
            self._images, self._labels = test_images, test_labels
        else:
            raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
        self._split = split

    def __repr__(self) -> str:
        # Grain checks repr(data_source) when restoring an iterator state: it must be stable across runs.
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
        pixels = self._images.reshape(-1, 3).astype(np.float64) / 255.0
        return tuple(pixels.mean(0)), tuple(pixels.std(0))


# ----------------------------------------------------------------------------------------------------------------
# A folder of images: root/<class>/**/<image>, optionally root/train/... and root/val/...


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The usable files of one folder dataset, split into train and eval, with what was skipped."""

    root: str
    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, label)
    eval: tuple[tuple[str, int], ...]
    bad_files: tuple[str, ...]


def _class_dirs(directory: str) -> list[str]:
    # torchvision's ImageFolder.find_classes: sorted directory names, plain string order.
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def _list_images(directory: str, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) in torchvision ImageFolder's order: classes sorted, os.walk sorted, file names sorted."""
    files = []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(directory, class_name)
        if not os.path.isdir(class_dir):
            continue
        for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.join(dirpath, filename), label))
    return files


def _is_readable_image(path: str) -> bool:
    """Whether PIL can identify the file and it has a plausible size (reads the header only)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return width > 0 and height > 0
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return False


def _format_fix() -> str:
    return (
        "A folder dataset is ROOT/<class>/<image> (extensions "
        + ", ".join(IMAGE_EXTENSIONS)
        + "), or ROOT/<train_split>/<class>/<image> plus ROOT/<eval_split>/<class>/<image>."
    )


@functools.lru_cache(maxsize=8)
def index_folder(
    root: str,
    train_split: str = "train",
    eval_split: str = "val",
    val_fraction: float = 0.1,
    max_bad_image_fraction: float = 0.01,
) -> FolderIndex:
    """Lists, splits and checks a folder dataset (cached: the trainer asks for info, train and eval).

    With `root/<train_split>/` present, it and `root/<eval_split>/` are the splits (an eval_split of 'val',
    'validation' or 'test' takes whichever of those folders exists), and the classes are those of the train folder. Otherwise `root/<class>/` holds everything and a deterministic, stratified `val_fraction`
    of each class (by a fixed permutation of its sorted file names) is held out for evaluation.

    Every file's header is read once here (in threads); files PIL cannot identify are skipped, counted and logged.
    If more than `max_bad_image_fraction` of the files are bad, this raises a DataError naming them.
    """
    if not os.path.isdir(root):
        raise DataError(f"Image folder {root!r} does not exist. {_format_fix()}")
    train_dir = os.path.join(root, train_split)
    if os.path.isdir(train_dir):
        eval_dir = os.path.join(root, eval_split)
        if not os.path.isdir(eval_dir) and eval_split in CONVENTIONAL_EVAL_FOLDERS:
            # Folders come with val/, validation/ or test/; a config naming one of these means "the eval folder".
            for name in CONVENTIONAL_EVAL_FOLDERS:
                if os.path.isdir(os.path.join(root, name)):
                    logging.info(
                        "Image folder %s: no %s/, evaluating on %s/.", root, eval_split, name
                    )
                    eval_dir = os.path.join(root, name)
                    break
        if not os.path.isdir(eval_dir):
            present = ", ".join(_class_dirs(root)) or "none"
            raise DataError(
                f"Image folder {root!r} has a {train_split!r} split but no {eval_split!r} split (folders found: "
                f"{present}). Create {eval_dir}/<class>/..., set config.eval_split to the folder that holds "
                f"the evaluation images, or move the classes up to {root}/<class>/ to hold out "
                f"config.folder_val_fraction of them."
            )
        class_names = tuple(_class_dirs(train_dir))
        unknown = sorted(set(_class_dirs(eval_dir)) - set(class_names))
        if unknown:
            raise DataError(
                f"{eval_dir} has classes that {train_dir} lacks: {unknown}. Labels come from the train "
                f"folder's classes; add them there or remove them from the evaluation folder."
            )
        train = _list_images(train_dir, class_names)
        evaluation = _list_images(eval_dir, class_names)
        if not evaluation:
            raise DataError(f"No images found under {eval_dir}. {_format_fix()}")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"config.folder_val_fraction must be in (0, 1), got {val_fraction}")
        class_names = tuple(_class_dirs(root))
        all_files = _list_images(root, class_names)
        train, evaluation = [], []
        for label, class_name in enumerate(class_names):
            members = [item for item in all_files if item[1] == label]
            # Seeded by the class name so adding a class does not reshuffle the others.
            rng = np.random.default_rng(zlib.crc32(class_name.encode()))
            order = rng.permutation(len(members))
            num_eval = int(round(len(members) * val_fraction))
            held_out = set(order[:num_eval].tolist())
            for position, item in enumerate(members):
                (evaluation if position in held_out else train).append(item)
    if not train:
        raise DataError(
            f"No images found under {train_dir if os.path.isdir(train_dir) else root}. {_format_fix()}"
        )

    paths = [path for path, _ in train + evaluation]
    with futures.ThreadPoolExecutor(max_workers=16) as pool:
        readable = dict(zip(paths, pool.map(_is_readable_image, paths), strict=True))
    bad_files = tuple(path for path in paths if not readable[path])
    if bad_files:
        logging.warning(
            "Skipping %d of %d images under %s that cannot be read: %s",
            len(bad_files),
            len(paths),
            root,
            ", ".join(bad_files[:20]) + (" ..." if len(bad_files) > 20 else ""),
        )
        if len(bad_files) > max_bad_image_fraction * len(paths):
            raise DataError(
                f"{len(bad_files)} of {len(paths)} images under {root} cannot be read "
                f"(more than config.max_bad_image_fraction={max_bad_image_fraction}): "
                + ", ".join(bad_files)
                + ". Fix or remove these files, or raise config.max_bad_image_fraction."
            )
    train = tuple(item for item in train if readable[item[0]])
    evaluation = tuple(item for item in evaluation if readable[item[0]])
    logging.info(
        "Image folder %s: %d classes, %d train and %d eval images, %d unreadable skipped.",
        root,
        len(class_names),
        len(train),
        len(evaluation),
        len(bad_files),
    )
    return FolderIndex(root, class_names, train, evaluation, bad_files)


class FolderSource(Source):
    """One split of a folder dataset; records carry the encoded file bytes (read here, decoded later)."""

    def __init__(self, index: FolderIndex, split: str):
        self.class_names = index.class_names
        self._files = index.train if split == "train" else index.eval
        # Grain compares this repr when restoring an iterator state: the root is left out so that a run resumed
        # on a machine that mounts the same data elsewhere still restores.
        self._description = (
            f"FolderSource(split={split!r}, num_examples={len(self._files)}, "
            f"num_classes={len(self.class_names)})"
        )

    def __repr__(self) -> str:
        return self._description

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # decoding fails downstream, where bad images are skipped and logged
        return {"image": data, "label": np.int32(label), "path": path}


# ----------------------------------------------------------------------------------------------------------------
# TFDS datasets prepared as ArrayRecord, read with tfds.data_source (no TensorFlow needed).


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"Unknown dataset {name!r}: not a TFDS dataset name and not found in data_dir={data_dir!r}. Use "
            f"'digits' (bundled), 'folder:/path/to/images', or a TFDS name such as 'cifar10' or "
            f"'imagenet2012' (see https://www.tensorflow.org/datasets/catalog)."
        ) from e


def _tfds_problem(builder, name: str, data_dir: str | None, split: str) -> DataError | None:
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


def _tfds_keys(info) -> tuple[str, str]:
    if (
        info.supervised_keys
        and len(info.supervised_keys) == 2
        and isinstance(info.supervised_keys[0], str)
    ):
        return info.supervised_keys
    return "image", "label"


class TfdsSource(Source):
    """One split of a prepared TFDS dataset; image features stored as JPEG are passed on undecoded."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        builder = _tfds_builder(name, data_dir)
        self._image_key, self._label_key = _tfds_keys(builder.info)
        features = builder.info.features
        image_feature = features[self._image_key]
        label_feature = features[self._label_key]
        self.class_names = tuple(label_feature.names)
        shape = getattr(image_feature, "shape", None)
        if shape is not None and len(shape) == 3 and shape[0] and shape[1]:
            self.native_size = (int(shape[0]), int(shape[1]))
        decoders = None
        # JPEG benefits from decoding at reduced size after the crop is chosen, so it stays encoded until the
        # pipeline's transform; other encodings (PNG: CIFAR) gain nothing from that and tfds decodes them with PIL.
        if (
            isinstance(image_feature, tfds.features.Image)
            and image_feature._encoding_format == "jpeg"
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


# ----------------------------------------------------------------------------------------------------------------


def decode_image(image: Any) -> Image.Image:
    """A lazily decoded PIL image from a record's 'image' (ndarray or encoded bytes)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    return Image.open(io.BytesIO(bytes(image)))


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
        except Exception:
            continue
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    if count == 0:
        raise DataError("Could not decode any image to estimate the dataset's mean/std.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(mean.tolist()), tuple(std.tolist())
