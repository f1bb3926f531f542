"""The Grain input pipeline: config -> this process's shard -> decode, augment, batch -> process-local numpy.

Train: `grain.DataLoader` over an `IndexSampler` (endless, reshuffled each epoch from the seed, each process reading
its own equal-length shard), so the iterator's position is a small JSON state (`get_state` / `set_state`) that the
checkpoint stores and a resumed run continues from with exactly the next batch.

Eval: one pass, no shuffle, each process a contiguous slice of the split; batches padded to the local batch size
with a 0/1 `mask` and every process yielding the same number of batches, so multi-host evaluation never waits on a
process that has run out and every example is counted exactly once.

Config keys (all optional): dataset ('digits' (default) | 'folder:/root' | a TFDS name), data_dir,
train_split, eval_split, image_size, augment ('imagenet' | 'cifar' | 'none'), crop_padding (cifar, default 4),
normalization ('dataset' | 'imagenet'), num_workers (Grain worker processes, 0 = in this process),
prefetch_buffer_size (records read ahead per process), num_read_threads, worker_buffer_size (batches each worker
keeps ready), folder_val_fraction (default 0.1), max_bad_image_fraction (default 0.01).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from resnet_jax.data import sources, transforms
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
class _Spec:
    """A config's dataset choices with every default filled in."""

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
        if self.dataset == DIGITS:
            return "digits"
        if self.dataset.startswith(FOLDER_PREFIX):
            return "folder"
        return "tfds"

    def source(self, split: str) -> sources.Source:
        """The source for one split ('train' role uses train_split; pass the split name itself)."""
        if self.kind == "digits":
            return sources.DigitsSource(split)
        if self.kind == "folder":
            index = self.folder_index()
            return sources.FolderSource(index, "train" if split == self.train_split else "eval")
        return sources.TfdsSource(self.dataset, split, self.data_dir)

    def folder_index(self) -> sources.FolderIndex:
        return sources.index_folder(
            self.dataset[len(FOLDER_PREFIX) :],
            self.train_split,
            self.eval_split,
            self.folder_val_fraction,
            self.max_bad_image_fraction,
        )


def _get(config: Any, key: str, default: Any) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _spec(config: Any) -> _Spec:
    dataset = _get(config, "dataset", DIGITS)
    data_dir = _get(config, "data_dir", None)
    if dataset == DIGITS:
        splits, native = ("train", "test"), 8
    elif dataset.startswith(FOLDER_PREFIX):
        splits, native = ("train", "val"), None
    else:
        splits, native = _tfds_default_splits(dataset, data_dir)
    image_size = int(_get(config, "image_size", native or 224))
    # Small native images (digits, CIFAR) get the CIFAR recipe, photos the ImageNet one.
    default_augment = (
        "none" if dataset == DIGITS else ("cifar" if native and native <= 64 else "imagenet")
    )
    normalization = _get(config, "normalization", "dataset")
    if normalization not in ("dataset", "imagenet"):
        raise ValueError(
            f"config.normalization must be 'dataset' or 'imagenet', got {normalization!r}"
        )
    return _Spec(
        dataset=dataset,
        data_dir=data_dir,
        train_split=_get(config, "train_split", splits[0]),
        eval_split=_get(config, "eval_split", splits[1]),
        image_size=image_size,
        augment=_get(config, "augment", default_augment),
        normalization=normalization,
        crop_padding=int(_get(config, "crop_padding", 4)),
        folder_val_fraction=float(_get(config, "folder_val_fraction", 0.1)),
        max_bad_image_fraction=float(_get(config, "max_bad_image_fraction", 0.01)),
    )


@functools.lru_cache(maxsize=16)
def _tfds_default_splits(name: str, data_dir: str | None) -> tuple[tuple[str, str], int | None]:
    """('train', 'validation' if the dataset has one else 'test') and the native image side if fixed."""
    builder = sources._tfds_builder(name, data_dir)
    split_names = set(builder.info.splits.keys())
    eval_split = "validation" if "validation" in split_names else "test"
    image_key, _ = sources._tfds_keys(builder.info)
    shape = getattr(builder.info.features[image_key], "shape", None)
    native = int(shape[0]) if shape and shape[0] and shape[0] == shape[1] else None
    return ("train", eval_split), native


@functools.lru_cache(maxsize=16)
def _dataset_stats(spec: _Spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if spec.normalization == "imagenet":
        return sources.IMAGENET_MEAN, sources.IMAGENET_STD
    if spec.kind == "digits":
        return sources.DigitsSource(spec.train_split).stats()
    if spec.kind == "tfds" and spec.dataset.split("/")[0] in sources.KNOWN_STATS:
        return sources.KNOWN_STATS[spec.dataset.split("/")[0]]
    mean, std = sources.estimate_stats(spec.source(spec.train_split))
    logging.info(
        "Estimated mean %s and std %s of %s from 256 train images.", mean, std, spec.dataset
    )
    return mean, std


def dataset_info(config: Any) -> DatasetInfo:
    """Sizes, classes and the model input size of the configured dataset (reads metadata, not images)."""
    spec = _spec(config)
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


class _Permuted:
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


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside absl.app (tests, notebooks) they were never parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1], known_only=True)


def _preprocess_args(spec: _Spec) -> dict[str, Any]:
    mean, std = _dataset_stats(spec)
    return dict(
        augment=spec.augment,
        image_size=spec.image_size,
        mean=mean,
        std=std,
        crop_padding=spec.crop_padding,
    )


def _loader_options(config: Any) -> dict[str, Any]:
    num_workers = int(_get(config, "num_workers", 0))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
    return dict(
        worker_count=num_workers,
        worker_buffer_size=int(_get(config, "worker_buffer_size", 2)),
        read_options=grain.ReadOptions(
            num_threads=int(_get(config, "num_read_threads", 16)),
            prefetch_buffer_size=int(_get(config, "prefetch_buffer_size", 500)),
        ),
    )


def _check_process(process_index: int, process_count: int, local_batch_size: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")


def create_train_iterator(
    config: Any, *, process_index: int, process_count: int, local_batch_size: int, seed: int
) -> grain.DataLoaderIterator:
    """An endless iterator of this process's training batches {'image': f32 (B,H,W,3), 'label': i32 (B,)}.

    Deterministic from `seed` (shuffle order and augmentation), reshuffled every epoch. Every process must pass
    the same seed: the shards are cut from one seed-fixed permutation of the split. Process p of N reads
    `len(split) // N` examples (the same count on every process; the remainder is left out, differently each
    seed), batched with drop_remainder, so an epoch is `len(split) // N // local_batch_size` batches per process.
    The iterator's `get_state()` / `set_state()` are what `grain.checkpoint.CheckpointSave/Restore` store.
    """
    _check_process(process_index, process_count, local_batch_size)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for Grain, got {seed}")
    spec = _spec(config)
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
        data_source=_Permuted(source, seed),
        sampler=sampler,
        operations=[
            transforms.TrainPreprocess(**_preprocess_args(spec)),
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
    config: Any, *, process_index: int, process_count: int, local_batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's slice of the eval split: {'image', 'label', 'mask'} batches.

    No shuffle, no augmentation. Across processes every example appears exactly once with mask 1.0; padding rows
    (zeros) have mask 0.0. Every process yields `num_eval_batches(...)` batches, all of `local_batch_size` rows.
    """
    _check_process(process_index, process_count, local_batch_size)
    spec = _spec(config)
    source = spec.source(spec.eval_split)
    start, stop = eval_shard(len(source), process_index, process_count)
    total_batches = num_eval_batches(len(source), process_count, local_batch_size)
    yielded = 0
    if stop > start:
        batch_source = _EvalBatchSource(source, start, stop, local_batch_size)
        loader = grain.DataLoader(
            data_source=batch_source,
            sampler=grain.samplers.SequentialSampler(num_records=len(batch_source)),
            operations=[
                transforms.EvalPreprocess(**_preprocess_args(spec), batch_size=local_batch_size)
            ],
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
