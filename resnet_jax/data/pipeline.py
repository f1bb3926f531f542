"""The Grain input pipeline: config -> this process's shard -> decode, augment, batch -> process-local numpy.

Train: `grain.DataLoader` over an `IndexSampler` (endless, reshuffled each epoch from the seed, each process reading
its own equal-length shard), so the iterator's position is a small JSON state (`get_state` / `set_state`) that the
checkpoint stores and a resumed run continues from with exactly the next batch.

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
import sys
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from resnet_jax.data import folder, sources, transforms
from resnet_jax.data.sources import DataError

DIGITS = "digits"
FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before reading it."""

    num_classes: int
    num_train_examples: int  # whole train split, all processes (unreadable images excluded)
    num_eval_examples: int  # whole eval split
    image_size: int  # model input H = W after preprocessing
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A config's dataset keys with every "dataset default" (None) resolved; hashable, so results cache on it."""

    dataset: str
    data_dir: str | None
    train_split: str
    eval_split: str
    image_size: int
    augment: str
    normalization: str
    crop_padding: int
    folder_val_fraction: float
    max_bad_image_fraction: float

    @property
    def kind(self) -> str:
        """'digits', 'folder' or 'tfds'."""
        if self.dataset == DIGITS:
            return "digits"
        if self.dataset.startswith(FOLDER_PREFIX):
            return "folder"
        return "tfds"

    def source(self, split: str) -> sources.Source:
        """The source of `split` (train_split or eval_split)."""
        if self.kind == "digits":
            return sources.DigitsSource(split)
        if self.kind == "folder":
            return folder.FolderSource(
                self.folder_index(), "train" if split == self.train_split else "eval"
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


def dataset_spec(config: ml_collections.ConfigDict) -> DatasetSpec:
    """The config's dataset choices, with the dataset's defaults where the config says None.

    Default splits: digits train/test, folders train/val, TFDS train and validation (else test). Default
    augment: none for digits (flips and crops change what a digit is), cifar for datasets of square images up
    to 64 px, imagenet otherwise.
    """
    dataset = config.dataset
    if dataset == DIGITS:
        train_split, eval_split, default_augment = "train", "test", "none"
    elif dataset.startswith(FOLDER_PREFIX):
        train_split, eval_split, default_augment = "train", "val", "imagenet"
    else:
        tfds = sources.tfds_defaults(dataset, config.data_dir)
        train_split, eval_split = tfds.train_split, tfds.eval_split
        small = tfds.image_side is not None and tfds.image_side <= 64
        default_augment = "cifar" if small else "imagenet"
    return DatasetSpec(
        dataset=dataset,
        data_dir=config.data_dir,
        train_split=config.train_split or train_split,
        eval_split=config.eval_split or eval_split,
        image_size=config.image_size,
        augment=config.augment or default_augment,
        normalization=config.normalization,
        crop_padding=config.crop_padding,
        folder_val_fraction=config.folder_val_fraction,
        max_bad_image_fraction=config.max_bad_image_fraction,
    )


@functools.lru_cache(maxsize=16)
def _normalization_stats(spec: DatasetSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of pixel/255 that normalization subtracts and divides by."""
    if spec.normalization == "imagenet":
        return transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
    if spec.kind == "digits":
        return sources.DigitsSource(spec.train_split).stats()
    known = sources.KNOWN_STATS.get(spec.dataset.split("/")[0])
    if spec.kind == "tfds" and known is not None:
        return known
    mean, std = sources.estimate_stats(spec.source(spec.train_split))
    logging.info(
        "Estimated mean %s and std %s of %s from 256 train images.", mean, std, spec.dataset
    )
    return mean, std


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Sizes, classes and the model input size of the configured dataset (reads metadata, not images)."""
    spec = dataset_spec(config)
    if spec.kind == "folder":
        index = spec.folder_index()
        num_train, num_eval, class_names = len(index.train), len(index.eval), index.class_names
    else:
        train = spec.source(spec.train_split)
        num_train, num_eval = len(train), len(spec.source(spec.eval_split))
        class_names = train.class_names
    return DatasetInfo(
        num_classes=len(class_names),
        num_train_examples=num_train,
        num_eval_examples=num_eval,
        image_size=spec.image_size,
        class_names=tuple(class_names),
    )


def _preprocess_options(spec: DatasetSpec) -> dict[str, Any]:
    """The arguments TrainPreprocess and EvalPreprocess share."""
    mean, std = _normalization_stats(spec)
    return dict(
        augment=spec.augment,
        image_size=spec.image_size,
        mean=mean,
        std=std,
        crop_padding=spec.crop_padding,
    )


def eval_preprocessor(
    config: ml_collections.ConfigDict, batch_size: int = 1
) -> transforms.EvalPreprocess:
    """The eval transform `create_eval_batches` applies for `config`: its resize/crop and its mean/std.

    `preprocess(raw)` of the result turns one image (array or encoded bytes) into what the model saw in
    evaluation, which is how `resnet_jax.predict` prepares images for a model trained here.
    """
    return transforms.EvalPreprocess(
        **_preprocess_options(dataset_spec(config)), batch_size=batch_size
    )


class _PermutedSource:
    """A source seen through a fixed permutation, so contiguous per-process shards are random subsets.

    Grain's IndexSampler gives each process a contiguous range of record keys; folders (and some TFDS splits) are
    ordered by class, so without this each process would train on a few classes only, which per-device
    BatchNorm statistics would feel.
    """

    def __init__(self, source: sources.Source, seed: int):
        self._source = source
        self._seed = seed
        self._order = np.random.default_rng(seed).permutation(len(source))

    def __repr__(self) -> str:
        return f"Permuted({self._source!r}, seed={self._seed})"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._order[index])]


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


def _loader_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """grain.DataLoader's worker and read-ahead arguments."""
    if config.num_workers > 0 and not flags.FLAGS.is_parsed():
        # Grain's worker processes read absl flags; outside absl.app (tests, notebooks) they were never parsed.
        flags.FLAGS(sys.argv[:1], known_only=True)
    return dict(
        worker_count=config.num_workers,
        worker_buffer_size=config.worker_buffer_size,
        read_options=grain.ReadOptions(
            num_threads=config.num_read_threads,
            prefetch_buffer_size=config.prefetch_buffer_size,
        ),
    )


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
    local_batch_size: int,
    seed: int,
) -> grain.DataLoaderIterator:
    """An endless iterator of this process's training batches {'image': f32 (B,H,W,3), 'label': i32 (B,)}.

    Deterministic from `seed` (shuffle order and augmentation), reshuffled every epoch. Every process must pass
    the same seed: the shards are cut from one seed-fixed permutation of the split. Process p of N reads
    `len(split) // N` examples (the same count on every process; the remainder is left out, differently each
    seed), batched with drop_remainder, so an epoch is `len(split) // N // local_batch_size` batches per process.
    The iterator's `get_state()` / `set_state()` are what `grain.checkpoint.CheckpointSave/Restore` store.
    """
    _check_process_args(process_index, process_count, local_batch_size)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for Grain, got {seed}")
    spec = dataset_spec(config)
    source = spec.source(spec.train_split)
    per_process = len(source) // process_count
    if per_process < local_batch_size:
        raise DataError(
            f"{spec.dataset} split {spec.train_split!r} has {len(source)} examples: {per_process} per process for "
            f"{process_count} processes, fewer than one local batch of {local_batch_size}. Lower the batch size."
        )
    shard_options = grain.sharding.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=True
    )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    loader = grain.DataLoader(
        data_source=_PermutedSource(source, seed),
        sampler=sampler,
        operations=[
            transforms.TrainPreprocess(**_preprocess_options(spec)),
            transforms.DropUndecodable(),
            grain.transforms.Batch(batch_size=local_batch_size, drop_remainder=True),
        ],
        shard_options=shard_options,
        **_loader_options(config),
    )
    return iter(loader)


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
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's slice of the eval split: {'image', 'label', 'mask'} batches.

    No shuffle, no augmentation. Across processes every example appears exactly once with mask 1.0; padding rows
    (zeros) have mask 0.0. Every process yields `num_eval_batches(...)` batches, all of `local_batch_size` rows.
    """
    _check_process_args(process_index, process_count, local_batch_size)
    spec = dataset_spec(config)
    source = spec.source(spec.eval_split)
    start, stop = eval_shard(len(source), process_index, process_count)
    total_batches = num_eval_batches(len(source), process_count, local_batch_size)
    yielded = 0
    if stop > start:
        batch_source = _EvalBatchSource(source, start, stop, local_batch_size)
        loader = grain.DataLoader(
            data_source=batch_source,
            sampler=grain.samplers.SequentialSampler(num_records=len(batch_source)),
            operations=[eval_preprocessor(config, batch_size=local_batch_size)],
            shard_options=grain.sharding.NoSharding(),
            **_loader_options(config),
        )
        for batch in loader:
            yield batch
            yielded += 1
    size = spec.image_size
    for _ in range(total_batches - yielded):
        yield {
            "image": np.zeros((local_batch_size, size, size, 3), np.float32),
            "label": np.zeros((local_batch_size,), np.int32),
            "mask": np.zeros((local_batch_size,), np.float32),
        }
