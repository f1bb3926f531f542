"""The Grain input pipeline: config -> splits -> this process's share -> decode, augment, batch -> numpy.

Splits: every dataset has a train split, an eval split (validation: evaluated during training, it ranks the
checkpoints) and possibly a test split (evaluated once, at the end, reported as test_*). Where the dataset has
no validation split of its own (digits, TFDS datasets such as CIFAR, image folders without val/), a fixed
share of train is held out for it, so model selection never looks at the test split.

Train: `stream` (global batch k is the same examples on any topology; the data position is the global step).

Eval: one pass, no shuffle, each process a contiguous slice of the split; batches padded to the local batch size
with a 0/1 `mask` and every process yielding the same number of batches, so multi-host evaluation never waits on a
process that has run out and every example is counted exactly once.

The config is one built on `resnet_jax.config.base_config()` and validated (the trainer does both); the data keys
are described there. None for data_dir, train_split, eval_split or augment means the dataset's default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from resnet_jax.data import folder, progressive, sources, stream, transforms
from resnet_jax.data.sources import DataError

DIGITS = "digits"
# Per-pixel labelled canvases of the digits (`resnet_jax.dense.canvases`, imported where used: it imports us).
DIGIT_CANVASES = "digit_canvases"
FOLDER_PREFIX = "folder:"
# The share of a TFDS train split held out for validation when the dataset has no validation split.
VALIDATION_FRACTION = 0.1
SPLIT_ROLES = ("train", "eval", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before reading it."""

    num_classes: int
    num_train_examples: int  # whole train split, all processes (unreadable images excluded)
    num_eval_examples: int  # whole eval (validation) split
    image_size: int  # model input H = W after preprocessing
    class_names: tuple[str, ...]
    num_test_examples: int = 0  # 0: the dataset has no test split apart from eval
    eval_split: str = ""  # what eval is, for logs: "validation", "val/", ...


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A config's dataset keys with every "dataset default" (None) resolved; hashable, so results cache on it."""

    dataset: str
    data_dir: str | None
    train_split: str
    # Folders: None = val/ or validation/, else a share of train held out by path hash.
    eval_split: str | None
    test_split: str | None  # None: no test split (folders: root/test/ when present)
    # > 0: eval is this share of train_split (chosen by index hash), and train is the rest.
    held_out_fraction: float
    image_size: int
    augment: str
    normalization: str
    crop_padding: int
    folder_val_fraction: float
    max_bad_image_fraction: float
    canvas_digit_sizes: tuple[int, int] = (10, 20)  # digit_canvases: the digits' side range ...
    canvas_examples: tuple[int, int] = (0, 0)  # ... and the canvases in train, in each eval split

    @property
    def kind(self) -> str:
        """'digits', 'digit_canvases', 'folder' or 'tfds'."""
        if self.dataset in (DIGITS, DIGIT_CANVASES):
            return self.dataset
        if self.dataset.startswith(FOLDER_PREFIX):
            return "folder"
        return "tfds"

    def source(self, role: str) -> sources.Source:
        """The source of one of SPLIT_ROLES: "train", "eval" or "test"."""
        if role not in SPLIT_ROLES:
            raise ValueError(f"role must be one of {SPLIT_ROLES}, got {role!r}")
        if self.kind == "folder":
            return folder.FolderSource(self.folder_index(), role)
        split = {"train": self.train_split, "eval": self.eval_split, "test": self.test_split}[role]
        if split is None:
            raise DataError(f"{self.dataset} has no {role} split")
        if self.kind == "digits":
            return sources.DigitsSource(split)
        if self.kind == DIGIT_CANVASES:
            from resnet_jax.dense import canvases

            count = self.canvas_examples[role != "train"]
            return canvases.DigitCanvases(
                split, count, canvas_size=self.image_size, digit_sizes=self.canvas_digit_sizes
            )
        if self.held_out_fraction > 0 and role != "test":
            whole = sources.TfdsSource(self.dataset, self.train_split, self.data_dir)
            held_out = sources.index_hash_fractions(len(whole)) < self.held_out_fraction
            chosen = held_out if role == "eval" else ~held_out
            return sources.Subset(
                whole, np.flatnonzero(chosen), "validation" if role == "eval" else "rest"
            )
        return sources.TfdsSource(self.dataset, split, self.data_dir)

    def folder_index(self) -> folder.FolderIndex:
        """The files of a 'folder:' dataset (cached by `index_folder`)."""
        return folder.index_folder(
            self.dataset[len(FOLDER_PREFIX) :],
            self.train_split,
            self.eval_split,
            self.folder_val_fraction,
            self.max_bad_image_fraction,
        )


def _default_splits(
    config: ml_collections.ConfigDict,
) -> tuple[str, str | None, str | None, float, str]:
    """(train, eval, test, held-out fraction, augment) of the configured dataset when the config says None."""
    if config.dataset in (DIGITS, DIGIT_CANVASES):
        return "train", "validation", "test", 0.0, "none"
    if config.dataset.startswith(FOLDER_PREFIX):
        return "train", None, None, 0.0, "imagenet"
    tfds = sources.tfds_defaults(config.dataset, config.data_dir)
    small = tfds.image_side is not None and tfds.image_side <= 64
    augment = "cifar" if small else "imagenet"
    if tfds.validation_split is not None:
        # Its own validation split is what such datasets (ImageNet) report; their test split may be unlabelled.
        return tfds.train_split, tfds.validation_split, None, 0.0, augment
    return tfds.train_split, "validation", tfds.test_split, VALIDATION_FRACTION, augment


def dataset_spec(config: ml_collections.ConfigDict) -> DatasetSpec:
    """The config's dataset choices, with the dataset's defaults where the config says None.

    Default splits: digits train / validation / test (1,293 / 144 / 360, fixed and stratified); folders: see
    `folder.index_folder`; TFDS: train and validation if the dataset has one (no test), else train less a
    VALIDATION_FRACTION share held out by index hash, that share, and test. A config that names its
    eval_split evaluates on that split during training and has no test split apart from it. Default augment:
    none for digits (flips and crops change what a digit is), cifar for datasets of square images up to
    64 px, imagenet otherwise.
    """
    train_split, eval_split, test_split, held_out, augment = _default_splits(config)
    if config.eval_split is not None:
        eval_split, held_out = config.eval_split, 0.0
        test_split = test_split if test_split != eval_split else None
    return DatasetSpec(
        dataset=config.dataset,
        data_dir=config.data_dir,
        train_split=config.train_split or train_split,
        eval_split=eval_split,
        test_split=test_split,
        held_out_fraction=held_out,
        image_size=config.image_size,
        augment=config.augment or augment,
        normalization=config.normalization,
        crop_padding=config.crop_padding,
        folder_val_fraction=config.folder_val_fraction,
        max_bad_image_fraction=config.max_bad_image_fraction,
        canvas_digit_sizes=tuple(config.canvas_digit_sizes),
        canvas_examples=(config.canvas_train_examples, config.canvas_eval_examples),
    )


@functools.lru_cache(maxsize=16)
def _normalization_stats(spec: DatasetSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of pixel/255 that normalization subtracts and divides by."""
    if spec.normalization == "imagenet":
        return transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
    if spec.kind in (DIGITS, DIGIT_CANVASES):  # canvases: what a digits backbone saw
        return sources.DigitsSource(spec.train_split).stats()
    known = sources.KNOWN_STATS.get(spec.dataset.split("/")[0])
    if spec.kind == "tfds" and known is not None:
        return known
    mean, std = sources.estimate_stats(spec.source("train"))
    logging.info(
        "Estimated mean %s and std %s of %s from 256 train images.", mean, std, spec.dataset
    )
    return mean, std


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Sizes, classes and the model input size of the configured dataset (reads metadata, not images)."""
    spec = dataset_spec(config)
    if spec.kind == "folder":
        index = spec.folder_index()
        sizes = len(index.train), len(index.eval), len(index.test)
        class_names, eval_split = index.class_names, index.eval_description
    else:
        train = spec.source("train")
        num_test = len(spec.source("test")) if spec.test_split is not None else 0
        sizes = len(train), len(spec.source("eval")), num_test
        class_names, eval_split = train.class_names, str(spec.eval_split)
        if spec.held_out_fraction > 0:
            eval_split = f"{spec.held_out_fraction:g} of {spec.train_split}, by index hash"
    return DatasetInfo(
        num_classes=len(class_names),
        num_train_examples=sizes[0],
        num_eval_examples=sizes[1],
        num_test_examples=sizes[2],
        image_size=spec.image_size,
        class_names=tuple(class_names),
        eval_split=eval_split,
    )


def normalization_stats(config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], ...]:
    """Per-channel (mean, std) of pixel / 255 for the config: host-normalized, or by the step (uint8_images)."""
    return _normalization_stats(dataset_spec(config))


def _preprocess_options(spec: DatasetSpec, host_normalize: bool = True) -> dict[str, Any]:
    """The arguments TrainPreprocess and EvalPreprocess share."""
    mean, std = _normalization_stats(spec)
    return dict(
        host_normalize=host_normalize,
        augment=spec.augment,
        image_size=spec.image_size,
        mean=mean,
        std=std,
        crop_padding=spec.crop_padding,
    )


def eval_preprocessor(
    config: ml_collections.ConfigDict, batch_size: int = 1, host_normalize: bool = True
) -> transforms.EvalPreprocess:
    """The eval transform `create_eval_batches` applies for `config` (its size, resize/crop, mean/std):
    `preprocess(raw)` of it is one image (array or encoded bytes) as the model saw it in evaluation, which
    is how `resnet_jax.predict` prepares images for a model trained here."""
    spec = dataset_spec(config)
    options = _preprocess_options(spec, host_normalize) | transforms.eval_options(config)
    return transforms.EvalPreprocess(**options, batch_size=batch_size)


class _EvalBatchSource:
    """Records are whole eval batches: the examples [start + i * B, start + (i + 1) * B) of a process's slice."""

    def __init__(self, source: sources.Source, start: int, stop: int, batch_size: int):
        self._source, self._start, self._stop, self._batch_size = source, start, stop, batch_size

    def __repr__(self) -> str:
        return f"EvalBatches({self._source!r}, {self._start}, {self._stop}, {self._batch_size})"

    def __len__(self) -> int:
        return math.ceil((self._stop - self._start) / self._batch_size)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        first = self._start + index * self._batch_size
        return [self._source[i] for i in range(first, min(first + self._batch_size, self._stop))]


def _train_preprocessor(
    spec: DatasetSpec, recipe: Any, host_normalize: bool
) -> grain.transforms.RandomMap:
    """Decode, augment, normalize one training record: the dense canvases keep their label maps."""
    if spec.kind != DIGIT_CANVASES:
        return transforms.TrainPreprocess(
            **_preprocess_options(spec, host_normalize), recipe=recipe
        )
    from resnet_jax.dense import canvases

    return canvases.CanvasTrainPreprocess(*_normalization_stats(spec))


def _eval_batches_map(
    config: ml_collections.ConfigDict, batch_size: int, host_normalize: bool
) -> grain.transforms.Map:
    """Records of one eval batch -> the padded, masked batch (`map([])`: a whole padding batch)."""
    spec = dataset_spec(config)
    if spec.kind != DIGIT_CANVASES:
        return eval_preprocessor(config, batch_size, host_normalize)
    from resnet_jax.dense import canvases

    return canvases.CanvasEvalPreprocess(*_normalization_stats(spec), batch_size, spec.image_size)


def _check_process_args(process_index: int, process_count: int, local_batch_size: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int,
    process_count: int,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    uint8_images: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """An endless iterator of this process's rows of the global training batches, from `start_step` on:
    {'image': f32 (B/P,H,W,3), 'label': i32 (B/P,)} (uint8 images with `uint8_images`: the step normalizes).

    Global batch k (the batch of step k + 1) is a function of (seed, k) and of the dataset only, for any
    number of processes, devices and workers (see `stream`); this process reads its rows
    [p * B / P, (p + 1) * B / P) of it. Every process must pass the same seed. An epoch is
    `len(train split) // global_batch_size` batches (the remainder is left out, differently each epoch).
    Resume by passing the global step reached as `start_step`: nothing else needs saving.
    """
    local_batch_size = global_batch_size // process_count
    _check_process_args(process_index, process_count, local_batch_size)
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch {global_batch_size} does not split over {process_count} processes"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    spec = dataset_spec(config)
    source = spec.source("train")
    if len(source) < global_batch_size:
        raise DataError(
            f"{spec.dataset} split {spec.train_split!r} has {len(source)} training examples, fewer than one "
            f"global batch of {global_batch_size}. Lower the batch size."
        )
    recipe = transforms.TrainRecipe.from_config(config)
    preprocess = _train_preprocessor(spec, recipe, host_normalize=not uint8_images)
    schedule = progressive.ResolutionSchedule.from_config(config, len(source) // global_batch_size)
    batches = stream.TrainBatches(
        source,
        preprocess,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        finish=progressive.finisher(preprocess, schedule),
    )
    options = stream.loader_options(config)
    return stream.iterate_batches(
        batches,
        local_batch_size=local_batch_size,
        start_step=start_step,
        read_options=options["read_options"],
        num_workers=options["worker_count"],
        worker_buffer_size=options["worker_buffer_size"],
    )


def eval_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous slice; sizes differ by at most one."""
    base, remainder = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, remainder)
    return start, start + base + (1 if process_index < remainder else 0)


def num_eval_batches(num_examples: int, process_count: int, local_batch_size: int) -> int:
    """Batches every process yields in one eval pass (set by the largest shard)."""
    return math.ceil(math.ceil(num_examples / process_count) / local_batch_size)


def create_eval_batches(
    config: ml_collections.ConfigDict,
    *,
    process_index: int,
    process_count: int,
    local_batch_size: int,
    split: str = "eval",
    uint8_images: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's slice of the eval split (or of the test split for split="test"):
    {'image', 'label', 'mask'} batches.

    No shuffle, no augmentation. Across processes every example appears exactly once with mask 1.0; padding rows
    (zeros) have mask 0.0. Every process yields `num_eval_batches(...)` batches, all of `local_batch_size` rows.
    """
    _check_process_args(process_index, process_count, local_batch_size)
    spec = dataset_spec(config)
    if split not in ("eval", "test"):
        raise ValueError(f"split must be 'eval' or 'test', got {split!r}")
    source = spec.source(split)
    start, stop = eval_shard(len(source), process_index, process_count)
    total_batches = num_eval_batches(len(source), process_count, local_batch_size)
    yielded = 0
    preprocess = _eval_batches_map(config, local_batch_size, host_normalize=not uint8_images)
    if stop > start:
        batch_source = _EvalBatchSource(source, start, stop, local_batch_size)
        loader = grain.DataLoader(
            data_source=batch_source,
            sampler=grain.samplers.SequentialSampler(num_records=len(batch_source)),
            operations=[preprocess],
            shard_options=grain.sharding.NoSharding(),
            **stream.loader_options(config),
        )
        for batch in loader:
            yield batch
            yielded += 1
    for _ in range(total_batches - yielded):
        yield preprocess.map([])
