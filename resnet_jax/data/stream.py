"""The training stream: global batch k holds the same examples, augmented the same way, on any topology.

Order: epoch e is a permutation of the whole train split drawn from (seed, epoch) alone (`EpochOrder`:
argsort of Philox random bits keyed by them, computed once per epoch and cached), cut to
`steps_per_epoch * global_batch_size` examples so that no batch straddles two epochs. Global batch k (the
batch of step k + 1) is positions [k * B, (k + 1) * B) of that stream, and process p of P reads its rows
[p * B / P, (p + 1) * B / P): the processes' rows, concatenated in process order, are the batch one process
would read.

Augmentation: an example's crop and flip draw from a Philox stream keyed by the augmentation seed and the
example's position in the epoch stream (Grain's `random_map` scheme: counter [0, 0, 0, position]), i.e. by
(seed, epoch, example), never by the process, worker or thread that decodes it. `TrainBatches` builds whole
batches; Grain worker w builds batches w, w + W, ... and Grain interleaves them back in order, so any number
of workers gives the same batches.

Position: the stream is a function of the global step, so a run resumed from step s (on any number of
processes, devices or workers) rebuilds it at s and reads exactly the batches the uninterrupted run would
have: there is no per-process iterator state to save. A different global batch size regroups the examples,
so the same step would mean other batches; the trainer refuses to resume across one.

Why not Grain's `MapDataset.shuffle(...).random_map(...).batch(...)` chain (what this module used until
issue 13): Grain's shuffle computes each record's position with `index_shuffle` (0.1-0.2 ms a record on
small splits), and each of the six layers of that chain pays Grain's per-record bookkeeping; one MapDataset
whose element is a whole batch, written into preallocated arrays, pays them once a batch (measured in
benchmarks/README.md, "Input pipeline").
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags

from resnet_jax.data.sources import DataError, Source

# An undecodable training image is replaced by the next decodable one in the stream; this many bad ones in
# a row means the data, not a file, is broken.
MAX_CONSECUTIVE_UNDECODABLE = 100


def derived_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for one use ("order", "augment") of the run's seed.

    Hashed, not `seed + k`: with `seed + k` neighbouring run seeds would share streams (run 5's epoch 1
    would be run 6's epoch 0 under a per-epoch `seed + epoch`).
    """
    digest = hashlib.sha256(f"resnet_jax/{purpose}/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class EpochOrder:
    """Which example of the split sits at each position of the endless epoch stream.

    Position q is index q % n of epoch q // n's permutation (n examples). A permutation is the stable
    argsort of n raw Philox outputs keyed by (seed, epoch): a function of those two numbers only, the
    same in every process, worker and thread, and across NumPy versions (bit generators' streams are
    fixed; `Generator.permutation`'s algorithm is not promised to be). The last two epochs' permutations
    are kept (a batch or an undecodable record's substitute may reach into the next epoch).
    """

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Sent to Grain's worker processes: without the cache and the lock (each worker builds its own).
        return {"num_examples": self.num_examples, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["num_examples"], state["seed"])

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of the split's indices (int64, length n)."""
        with self._lock:
            order = self._cache.get(epoch)
            if order is None:
                bits = np.random.Philox(key=(self.seed << 64) | epoch).random_raw(self.num_examples)
                order = np.argsort(bits, kind="stable")
                self._cache = {e: o for e, o in self._cache.items() if e == epoch - 1}
                self._cache[epoch] = order
        return order

    def __getitem__(self, position: int) -> int:
        epoch, index = divmod(position, self.num_examples)
        return int(self.permutation(epoch)[index])


def example_rng(
    key: int, position: int, rng: np.random.Generator | None = None
) -> np.random.Generator:
    """The augmentation generator of stream position `position`: Philox with `key`, counter [0, 0, 0,
    position] (the draws Grain's `random_map` gave the same position). Resets and returns `rng` if given,
    which is cheaper than building one (7 against 16 us)."""
    if rng is None:
        return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, 0, position]))
    state = rng.bit_generator.state
    state["state"]["counter"] = np.array([0, 0, 0, position], dtype=np.uint64)
    state["buffer"] = np.zeros(4, np.uint64)
    state["buffer_pos"] = 4
    state["has_uint32"] = 0
    state["uinteger"] = 0
    rng.bit_generator.state = state
    return rng


def philox_key(seed: int) -> int:
    """The 128-bit Philox key that `np.random.Philox(seed)` derives from `seed` (as Grain's random_map)."""
    words = np.random.Philox(seed).state["state"]["key"]
    return int(words[0]) | (int(words[1]) << 64)


class TrainBatches(grain.MapDataset):
    """Element k: this process's rows of global batch k, preprocessed and stacked ({key: (b, ...) array}).

    Row r of process p's share (b = B / P rows) is position m = k * B + p * b + r of the epoch stream cut
    to L = steps_per_epoch * B examples per epoch: position (m // L) * n + m % L of `EpochOrder`. A record
    that cannot be decoded (`preprocess` returns None) is replaced by the next decodable one in the stream,
    with that one's augmentation: a deterministic substitute keeps every batch full and identical on
    every topology (filtering would shift every later example to another batch, differently per process).
    `finish(row, k)`, if given, completes a row in batch k (progressive resizing: the size depends on k).
    """

    def __init__(
        self,
        source: Source,
        preprocess: grain.transforms.RandomMap,
        *,
        seed: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        finish: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    ):
        super().__init__()
        self._source = source
        self._preprocess = preprocess
        self._finish = finish
        self._order = EpochOrder(len(source), derived_seed(seed, "order"))
        self._augment_key = philox_key(derived_seed(seed, "augment"))
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._offset = process_index * self._local_batch_size
        self._epoch_length = len(source) // global_batch_size * global_batch_size

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return (
            f"TrainBatches(global_batch_size={self._global_batch_size}, offset={self._offset}, "
            f"source={self._source!r})"
        )

    def example(self, position: int, rng: np.random.Generator) -> dict[str, Any]:
        """The preprocessed example at epoch-stream `position`, or the next decodable one after it."""
        for offset in range(MAX_CONSECUTIVE_UNDECODABLE):
            record = self._source[self._order[position + offset]]
            element = self._preprocess.random_map(
                record, example_rng(self._augment_key, position + offset, rng)
            )
            if element is not None:
                return element
        raise DataError(
            f"{MAX_CONSECUTIVE_UNDECODABLE} training images in a row cannot be decoded (see the warnings "
            "that name them); fix or remove them"
        )

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        first = index * self._global_batch_size + self._offset
        rng = example_rng(self._augment_key, 0)
        batch: dict[str, np.ndarray] = {}
        for row in range(self._local_batch_size):
            epoch, within = divmod(first + row, self._epoch_length)
            element = self.example(epoch * len(self._source) + within, rng)
            if self._finish is not None:
                element = self._finish(element, index)
            if not batch:
                batch = {
                    key: np.empty(
                        (self._local_batch_size, *np.shape(value)), np.asarray(value).dtype
                    )
                    for key, value in element.items()
                }
            for key, value in element.items():
                batch[key][row] = value
        return batch


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
    """Threads that decode batches in each decoding process.

    In process (no workers): `num_read_threads`, at most the cores this process may use: decoding is
    CPU-bound and each thread builds a whole batch, so more threads only add GIL hand-offs, context
    switches and batches held in memory (measured in benchmarks/README.md: 16 threads on 2 cores cost a
    quarter more CPU per image than 1 or 2). With worker processes: one thread each, as a PyTorch
    DataLoader worker: `num_workers` is then the number of cores given to decoding, so the training
    process keeps its own core for the step and the transfers, and images/s grows with the workers (two
    threads in one worker already filled both cores of a 2-core machine, so a second worker added only a
    quarter).
    """
    if num_workers > 0:
        return 1
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return max(1, min(num_read_threads, cores))


def iterate_batches(
    batches: TrainBatches,
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
    threads = decoding_threads(read_options.num_threads, num_workers)
    buffered_batches = max(threads, math.ceil(read_options.prefetch_buffer_size / local_batch_size))
    dataset = batches[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered_batches)
    )
    if num_workers > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(dataset)
