"""The training stream: global batch k holds the same examples, augmented the same way, on any topology.

Order: each epoch is a permutation of the whole train split drawn from (seed, epoch) (Grain's
`MapDataset.shuffle`, which carries the epoch in the index), cut to `steps_per_epoch * global_batch_size`
examples so that no batch straddles two epochs. Global batch k (the batch of step k + 1) is positions
[k * B, (k + 1) * B) of that stream, and process p of P reads its rows [p * B / P, (p + 1) * B / P): the
processes' rows, concatenated in process order, are the batch one process would read.

Augmentation: an example's crop and flip draw from a Philox stream keyed by the augmentation seed and the
example's position in the epoch stream (`MapDataset.random_map`), i.e. by (seed, epoch, example), never by
the process or the worker that decodes it. Grain worker processes each take every W-th example of this
process's rows and Grain interleaves them back in order, so any number of workers gives the same batches.

Position: the stream is a function of the global step, so a run resumed from step s (on any number of
processes, devices or workers) rebuilds it at s and reads exactly the batches the uninterrupted run would
have: there is no per-process iterator state to save. A different global batch size regroups the examples,
so the same step would mean other batches; the trainer refuses to resume across one.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from typing import Any

import grain
from absl import flags

from resnet_jax.data.sources import DataError, Source

# An undecodable training image is replaced by the next decodable one in the stream; this many bad ones in
# a row means the data, not a file, is broken.
MAX_CONSECUTIVE_UNDECODABLE = 100


def derived_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for one use ("order", "augment") of the run's seed.

    Hashed, not `seed + k`: Grain's shuffle seeds epoch e with seed + e, so with neighbouring seeds run 5's
    epoch 1 would be run 6's epoch 0.
    """
    digest = hashlib.sha256(f"resnet_jax/{purpose}/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class ReplaceUndecodable(grain.MapDataset):
    """Element i, or, when it could not be decoded (None), the next decodable element after it.

    A deterministic substitute keeps every batch full and identical on every topology (filtering would
    shift every later example to another batch, differently per process).
    """

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "ReplaceUndecodable"

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        for offset in range(MAX_CONSECUTIVE_UNDECODABLE):
            element = self._parent[index + offset]
            if element is not None:
                return element
        raise DataError(
            f"{MAX_CONSECUTIVE_UNDECODABLE} training images in a row cannot be decoded (see the warnings "
            "that name them); fix or remove them"
        )


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch, as one endless stream of examples.

    Element m is row m % b of this process's share of global batch m // b (b = B / P rows each): position
    (m // b) * B + p * b + m % b of the epoch stream.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(parent)
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._offset = process_index * self._local_batch_size

    def __len__(self) -> int:
        return len(self._parent) * self._local_batch_size // self._global_batch_size

    def __str__(self) -> str:
        return f"ProcessRows(global_batch_size={self._global_batch_size}, offset={self._offset})"

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local_batch_size)
        return self._parent[batch * self._global_batch_size + self._offset + row]


def process_rows(
    source: Source,
    preprocess: grain.transforms.RandomMap,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """This process's rows of every global batch, preprocessed: an endless MapDataset of examples."""
    steps_per_epoch = len(source) // global_batch_size
    examples = (
        grain.MapDataset.source(source)
        .shuffle(seed=derived_seed(seed, "order"))
        .random_map(preprocess, seed=derived_seed(seed, "augment"))
    )
    # Sliced after the substitution, so the cut and the epochs map onto whole permutations of the split.
    epochs = ReplaceUndecodable(examples)[: steps_per_epoch * global_batch_size].repeat()
    return ProcessRows(epochs, global_batch_size, process_index, process_count)


def loader_options(config: Any) -> dict[str, Any]:
    """Grain's worker and read-ahead arguments from the config: worker_count, worker_buffer_size and
    read_options (threads capped by `decoding_threads`, for the train stream and the eval loader alike)."""
    if config.num_workers > 0 and not flags.FLAGS.is_parsed():
        # Grain's worker processes read absl flags; outside absl.app (tests, notebooks) they were never parsed.
        flags.FLAGS(sys.argv[:1], known_only=True)
    return dict(
        worker_count=config.num_workers,
        worker_buffer_size=config.worker_buffer_size,
        read_options=grain.ReadOptions(
            num_threads=decoding_threads(config.num_read_threads, config.num_workers),
            prefetch_buffer_size=config.prefetch_buffer_size,
        ),
    )


def decoding_threads(num_read_threads: int, num_workers: int) -> int:
    """Threads that decode batches in each decoding process: `num_read_threads`, at most the cores per process.

    Decoding is CPU-bound and each thread builds a whole batch, so threads beyond the cores this process may
    use only add GIL hand-offs, context switches and batches held in memory (measured in
    benchmarks/README.md: 16 threads on 2 cores cost a quarter more CPU per image than 1 or 2).
    """
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return max(1, min(num_read_threads, cores // max(num_workers, 1)))


def iterate_batches(
    rows: grain.MapDataset,
    *,
    local_batch_size: int,
    start_step: int,
    read_options: grain.ReadOptions,
    num_workers: int,
    worker_buffer_size: int,
) -> Any:
    """An iterator of this process's batches from global step `start_step` on (0: the first batch).

    Batches are assembled where they are decoded: a thread builds a whole batch, and a worker process ships
    whole batches (one shared-memory block each) rather than single images, so Grain's per-element
    overhead and the transport are paid once per batch. Worker w builds batches w, w + W, ... and Grain
    interleaves them in order, so the batches do not depend on the worker count. `read_options`' thread
    count is capped by `decoding_threads`; its prefetch buffer (in examples) becomes whole batches.
    """
    batches = rows.batch(local_batch_size, drop_remainder=True)[start_step:]
    threads = decoding_threads(read_options.num_threads, num_workers)
    buffered_batches = max(threads, math.ceil(read_options.prefetch_buffer_size / local_batch_size))
    dataset = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered_batches)
    )
    if num_workers > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(dataset)
