"""A folder of images as a dataset: root/<class>/**/<image>, or root/train/... with root/val/... and root/test/...

`index_folder` lists, splits and checks the files once (the trainer asks for info, train and eval: it is
cached); `FolderSource` serves one split of the index to the pipeline as encoded file bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from resnet_jax.data import folder_index_cache
from resnet_jax.data.sources import DataError, Source, hash_fraction

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Names a folder dataset's evaluation folder commonly has; any of them serves when the configured one is absent.
CONVENTIONAL_EVAL_FOLDERS = ("val", "validation", "test")
# With eval_split None: the validation folder (else a held-out share of train) and the test folder.
VALIDATION_FOLDERS = ("val", "validation")
TEST_FOLDER = "test"

FOLDER_LAYOUT = (
    f"A folder dataset is ROOT/<class>/<image> (extensions {', '.join(IMAGE_EXTENSIONS)}), "
    "or ROOT/<train_split>/<class>/<image> plus ROOT/<eval_split>/<class>/<image>."
)

LabelledFiles = list[tuple[str, int]]  # (path, label)


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The usable files of one folder dataset, split into train, eval (validation) and test, with what was skipped."""

    root: str
    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, label)
    eval: tuple[tuple[str, int], ...]  # evaluated during training; ranks the checkpoints
    test: tuple[tuple[str, int], ...]  # evaluated once at the end; empty: no test split
    eval_description: str  # "val/", or the held-out share of the train images
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


def _eval_dir(root: str, train_split: str, eval_split: str | None) -> str | None:
    """root/<eval_split> (or the conventional eval folder present when the configured one is absent); for
    eval_split None, root/val or root/validation, else None: the eval share is then held out of train."""
    if eval_split is None:
        present = [name for name in VALIDATION_FOLDERS if os.path.isdir(os.path.join(root, name))]
        return os.path.join(root, present[0]) if present else None
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
            f"the evaluation images, or leave it None to hold out config.folder_val_fraction of the "
            f"train images."
        )
    return eval_dir


def _folder_split(directory: str, class_names: Sequence[str], train_dir: str) -> LabelledFiles:
    """The images of an eval or test folder, whose classes must be among the train folder's."""
    unknown = sorted(set(_class_dirs(directory)) - set(class_names))
    if unknown:
        raise DataError(
            f"{directory} has classes that {train_dir} lacks: {unknown}. Labels come from the train "
            f"folder's classes; add them there or remove them from {directory}."
        )
    files = _list_images(directory, class_names)
    if not files:
        raise DataError(f"No images found under {directory}. {FOLDER_LAYOUT}")
    return files


def _hold_out(
    directory: str, files: LabelledFiles, fraction: float
) -> tuple[LabelledFiles, LabelledFiles]:
    """(train, held out): a file is held out when the hash of its path under `directory` is below `fraction`.

    The path is taken relative to the folder that holds the class folders (`cat/img01.jpg`, with '/'), so a
    file's side depends on nothing but its own name: adding or removing files never moves another file across
    the split, and the same tree moved under root/train/ splits the same way.
    """
    train, held_out = [], []
    for path, label in files:
        key = folder_index_cache.relative_name(path, directory)
        (held_out if hash_fraction(key) < fraction else train).append((path, label))
    return train, held_out


def _check_classes(root: str, index: FolderIndex) -> None:
    """One DataError for a folder a classifier cannot be trained and evaluated on."""
    names = index.class_names
    if len(names) < 2:
        raise DataError(
            f"Image folder {root!r} has {len(names)} class ({', '.join(names)}): a classifier needs at least "
            f"two class folders. {FOLDER_LAYOUT}"
        )
    problems = []
    for split, files in (
        ("training", index.train),
        (f"eval ({index.eval_description})", index.eval),
    ):
        counts = np.bincount([label for _, label in files], minlength=len(names))
        if empty := [names[label] for label in np.flatnonzero(counts == 0)]:
            problems.append(f"no {split} images in class(es) {', '.join(empty)}")
    if problems:
        raise DataError(
            f"Image folder {root!r}: {'; '.join(problems)}. Every class needs both: add images to those "
            "classes, raise config.folder_val_fraction, or remove the class folders."
        )


def _is_readable_image(path: str) -> bool:
    """Whether PIL can identify the file and it has a plausible size (reads the header only)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return width > 0 and height > 0
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return False


def _unreadable_files(root: str, paths: list[str], max_bad_image_fraction: float) -> set[str]:
    """The files PIL cannot identify, logged; a DataError if too many.

    Headers are read in threads, and only for files whose verdict is not in the folder's index cache
    (`folder_index_cache`: a file's verdict is reused while its size and modification time are unchanged).
    """

    def check(to_check: Sequence[str]) -> list[bool]:
        with futures.ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(_is_readable_image, to_check))

    readable, num_checked = folder_index_cache.check_files(root, paths, check)
    logging.info(
        "Image folder %s: %d file headers read, %d verdicts from the index cache.",
        root,
        num_checked,
        len(paths) - num_checked,
    )
    bad_files = [path for path, ok in zip(paths, readable, strict=True) if not ok]
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


def _list_splits(
    root: str, train_split: str, eval_split: str | None, val_fraction: float
) -> tuple[tuple[str, ...], LabelledFiles, LabelledFiles, LabelledFiles, str]:
    """(class names, train, eval, test, what eval is) of the folder's layout, before any file is read."""
    train_dir = os.path.join(root, train_split)
    if not os.path.isdir(train_dir):
        class_names = tuple(_class_dirs(root))
        files = _list_images(root, class_names)
        if not files:
            raise DataError(f"No images found under {root}. {FOLDER_LAYOUT}")
        train, evaluation = _hold_out(root, files, val_fraction)
        return class_names, train, evaluation, [], f"{val_fraction:g} of the images, by path hash"
    class_names = tuple(_class_dirs(train_dir))
    train = _list_images(train_dir, class_names)
    if not train:
        raise DataError(f"No images found under {train_dir}. {FOLDER_LAYOUT}")
    eval_dir = _eval_dir(root, train_split, eval_split)
    if eval_dir is None:
        train, evaluation = _hold_out(train_dir, train, val_fraction)
        description = f"{val_fraction:g} of {train_split}/, by path hash"
    else:
        evaluation = _folder_split(eval_dir, class_names, train_dir)
        description = f"{os.path.basename(eval_dir)}/"
    test_dir = os.path.join(root, TEST_FOLDER)
    has_test = os.path.isdir(test_dir) and test_dir != eval_dir
    test = _folder_split(test_dir, class_names, train_dir) if has_test else []
    return class_names, train, evaluation, test, description


@functools.lru_cache(maxsize=8)
def index_folder(
    root: str,
    train_split: str = "train",
    eval_split: str | None = None,
    val_fraction: float = 0.1,
    max_bad_image_fraction: float = 0.01,
) -> FolderIndex:
    """Lists, splits and checks a folder dataset (cached: the trainer asks for info, train, eval and test).

    Layouts:
    - `root/<class>/...`: the eval (validation) images are those whose path under root (`cat/img01.jpg`) hashes
      below `val_fraction` (SHA-256 of the path, as a number in [0, 1)); no test split.
    - `root/<train_split>/<class>/...`: eval is `root/<eval_split>/`; for eval_split None, `root/val/` or
      `root/validation/` if present, else the files of the train folder whose path under it hashes below
      `val_fraction`. `root/test/`, if present and not the eval folder, is the test split, evaluated once at
      the end of training. The classes are those of the train folder.
    A hashed share is stable: adding or removing files never moves another file between train and eval.

    Every file's header is read once here, or its verdict taken from the folder's index cache while the file
    is unchanged (see `folder_index_cache`); files PIL cannot identify are skipped, counted and logged. If more
    than `max_bad_image_fraction` of the files are bad, this raises a DataError naming them. So does a folder
    with fewer than two classes, or a class with no train or no eval images.
    """
    if not os.path.isdir(root):
        raise DataError(f"Image folder {root!r} does not exist. {FOLDER_LAYOUT}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"config.folder_val_fraction must be in (0, 1), got {val_fraction}")
    class_names, train, evaluation, test, description = _list_splits(
        root, train_split, eval_split, val_fraction
    )
    paths = [path for path, _ in train + evaluation + test]
    bad_files = _unreadable_files(root, paths, max_bad_image_fraction)
    index = FolderIndex(
        root=root,
        class_names=class_names,
        train=tuple(item for item in train if item[0] not in bad_files),
        eval=tuple(item for item in evaluation if item[0] not in bad_files),
        test=tuple(item for item in test if item[0] not in bad_files),
        eval_description=description,
        bad_files=tuple(path for path in paths if path in bad_files),
    )
    _check_classes(root, index)
    logging.info(
        "Image folder %s: %d classes, %d train, %d eval (%s) and %d test images, %d unreadable skipped.",
        root,
        len(class_names),
        len(index.train),
        len(index.eval),
        description,
        len(index.test),
        len(bad_files),
    )
    return index


class FolderSource(Source):
    """One split of a folder dataset; records carry the encoded file bytes (read here, decoded later)."""

    def __init__(self, index: FolderIndex, split: str):
        """`split`: "train", "eval" or "test"."""
        self.class_names = index.class_names
        self._files = {"train": index.train, "eval": index.eval, "test": index.test}[split]
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
