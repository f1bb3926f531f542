"""A folder of images as a dataset: root/<class>/**/<image>, optionally root/train/... and root/val/...

`index_folder` lists, splits and checks the files once (the trainer asks for info, train and eval: it is
cached); `FolderSource` serves one split of the index to the pipeline as encoded file bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from resnet_jax.data.sources import DataError, Source

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Names a folder dataset's evaluation folder commonly has; any of them serves when the configured one is absent.
CONVENTIONAL_EVAL_FOLDERS = ("val", "validation", "test")

FOLDER_LAYOUT = (
    f"A folder dataset is ROOT/<class>/<image> (extensions {', '.join(IMAGE_EXTENSIONS)}), "
    "or ROOT/<train_split>/<class>/<image> plus ROOT/<eval_split>/<class>/<image>."
)

LabelledFiles = list[tuple[str, int]]  # (path, label)


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


def _list_images(directory: str, class_names: Sequence[str]) -> LabelledFiles:
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


def _eval_dir(root: str, train_split: str, eval_split: str) -> str:
    """root/<eval_split>, or the conventional eval folder present when the configured one is absent."""
    eval_dir = os.path.join(root, eval_split)
    if not os.path.isdir(eval_dir) and eval_split in CONVENTIONAL_EVAL_FOLDERS:
        # Folders come with val/, validation/ or test/; a config naming one of these means "the eval folder".
        for name in CONVENTIONAL_EVAL_FOLDERS:
            if os.path.isdir(os.path.join(root, name)):
                logging.info("Image folder %s: no %s/, evaluating on %s/.", root, eval_split, name)
                return os.path.join(root, name)
    if not os.path.isdir(eval_dir):
        present = ", ".join(_class_dirs(root)) or "none"
        raise DataError(
            f"Image folder {root!r} has a {train_split!r} split but no {eval_split!r} split (folders found: "
            f"{present}). Create {eval_dir}/<class>/..., set config.eval_split to the folder that holds "
            f"the evaluation images, or move the classes up to {root}/<class>/ to hold out "
            f"config.folder_val_fraction of them."
        )
    return eval_dir


def _split_folders(
    root: str, train_split: str, eval_split: str
) -> tuple[tuple[str, ...], LabelledFiles, LabelledFiles]:
    """(class names, train, eval) of root/<train_split>/ and root/<eval_split>/; the train folder names the classes."""
    train_dir = os.path.join(root, train_split)
    eval_dir = _eval_dir(root, train_split, eval_split)
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
        raise DataError(f"No images found under {eval_dir}. {FOLDER_LAYOUT}")
    if not train:
        raise DataError(f"No images found under {train_dir}. {FOLDER_LAYOUT}")
    return class_names, train, evaluation


def _hold_out(
    root: str, val_fraction: float
) -> tuple[tuple[str, ...], LabelledFiles, LabelledFiles]:
    """(class names, train, eval) of root/<class>/, holding out a stratified `val_fraction` of each class."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"config.folder_val_fraction must be in (0, 1), got {val_fraction}")
    class_names = tuple(_class_dirs(root))
    all_files = _list_images(root, class_names)
    train, evaluation = [], []
    for label, class_name in enumerate(class_names):
        members = [item for item in all_files if item[1] == label]
        # Seeded by the class name so adding a class does not reshuffle the others.
        order = np.random.default_rng(zlib.crc32(class_name.encode())).permutation(len(members))
        held_out = set(order[: int(round(len(members) * val_fraction))].tolist())
        for position, item in enumerate(members):
            (evaluation if position in held_out else train).append(item)
    if not train:
        raise DataError(f"No images found under {root}. {FOLDER_LAYOUT}")
    return class_names, train, evaluation


def _is_readable_image(path: str) -> bool:
    """Whether PIL can identify the file and it has a plausible size (reads the header only)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return width > 0 and height > 0
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return False


def _unreadable_files(root: str, paths: list[str], max_bad_image_fraction: float) -> set[str]:
    """The files PIL cannot identify (headers read in threads), logged; a DataError if too many."""
    with futures.ThreadPoolExecutor(max_workers=16) as pool:
        bad_files = [
            path
            for path, readable in zip(paths, pool.map(_is_readable_image, paths), strict=True)
            if not readable
        ]
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
    return set(bad_files)


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
    'validation' or 'test' takes whichever of those folders exists), and the classes are those of the train
    folder. Otherwise `root/<class>/` holds everything and a deterministic, stratified `val_fraction` of each
    class (by a fixed permutation of its sorted file names) is held out for evaluation.

    Every file's header is read once here; files PIL cannot identify are skipped, counted and logged. If more
    than `max_bad_image_fraction` of the files are bad, this raises a DataError naming them.
    """
    if not os.path.isdir(root):
        raise DataError(f"Image folder {root!r} does not exist. {FOLDER_LAYOUT}")
    if os.path.isdir(os.path.join(root, train_split)):
        class_names, train, evaluation = _split_folders(root, train_split, eval_split)
    else:
        class_names, train, evaluation = _hold_out(root, val_fraction)
    paths = [path for path, _ in train + evaluation]
    bad_files = _unreadable_files(root, paths, max_bad_image_fraction)
    index = FolderIndex(
        root=root,
        class_names=class_names,
        train=tuple(item for item in train if item[0] not in bad_files),
        eval=tuple(item for item in evaluation if item[0] not in bad_files),
        bad_files=tuple(path for path in paths if path in bad_files),
    )
    logging.info(
        "Image folder %s: %d classes, %d train and %d eval images, %d unreadable skipped.",
        root,
        len(class_names),
        len(index.train),
        len(index.eval),
        len(bad_files),
    )
    return index


class FolderSource(Source):
    """One split of a folder dataset; records carry the encoded file bytes (read here, decoded later)."""

    def __init__(self, index: FolderIndex, split: str):
        self.class_names = index.class_names
        self._files = index.train if split == "train" else index.eval
        # The root is left out of the repr (which Grain checks on restore) so that a run resumed on a machine
        # that mounts the same data elsewhere still restores.
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
