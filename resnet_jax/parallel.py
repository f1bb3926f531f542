"""Data parallelism: where state and batches live, and how a per-device step is compiled for all devices.

One per-device step (see steps.py), two drivers:

- "shard_map" (default): `jax.shard_map` inside `jax.jit` over a global `Mesh` with one axis, `data`, that
  spans every device of every process. State is a global array replicated on all devices (`P()`); a batch is
  a global array split along its first dimension (`P('data')`), assembled from each process's own rows with
  `jax.make_array_from_process_local_data`.
- "pmap": the classic `jax.pmap` over the local devices of each process (collectives still span all
  processes). State carries a leading axis of size `jax.local_device_count()`; a local batch is reshaped to
  (local devices, per-device batch, ...).

Both give the same numbers (tested). Nothing here knows about ResNets or optimizers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# The two drivers above. Defined here, not in config.py, so that the step's modules need only jax (no
# ml_collections): benchmarks/gpu.py runs them on machines that have nothing else.
PARALLELISMS = ("shard_map", "pmap")
# Batches sent to the devices at a time by `device_batches`: 2, as flax's examples prefetch (the step's own and
# the next one); 1 sends each batch only when its step asks for it.
DEVICE_PREFETCH = 2

PyTree = Any


def device_mean(tree: PyTree, axis_name: str | None) -> PyTree:
    """`lax.pmean(tree, axis_name)`, or `tree` itself when there is no axis or it has one device.

    XLA:CPU runs a one-device all-reduce as a real collective that copies every gradient (resnet18 at 32 px,
    batch 32: ~5-15% of a train step, benchmarks/README.md); the mean over one device is the value itself.
    """
    if axis_name is None or jax.lax.axis_size(axis_name) == 1:
        return tree
    return jax.lax.pmean(tree, axis_name)


def device_sum(tree: PyTree, axis_name: str | None) -> PyTree:
    """`lax.psum(tree, axis_name)`, or `tree` itself when there is no axis or it has one device (see
    `device_mean`)."""
    if axis_name is None or jax.lax.axis_size(axis_name) == 1:
        return tree
    return jax.lax.psum(tree, axis_name)


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


class DataParallel:
    """Places state and batches on the devices and compiles per-device steps, for one `parallelism`.

    Args:
      parallelism: "shard_map" or "pmap".
      devices: for shard_map, the mesh's devices (default: every device of every process); for pmap, the
        devices of this single process to map over (default: `jax.local_devices()` of every process,
        collectives spanning all of them). Tests pass a subset to compare 1 and 8 devices in one process.
    """

    def __init__(self, parallelism: str = "shard_map", devices: list[jax.Device] | None = None):
        if parallelism not in PARALLELISMS:
            raise ValueError(f"unknown parallelism {parallelism!r}; expected one of {PARALLELISMS}")
        self.parallelism = parallelism
        if parallelism == "shard_map":
            self.mesh = create_mesh(devices)
            self.num_devices = self.mesh.size
            self.local_devices = [
                d for d in self.mesh.devices.flat if d.process_index == jax.process_index()
            ]
            self._replicated = NamedSharding(self.mesh, P())
            self._batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        else:
            if devices is not None and jax.process_count() > 1:
                raise ValueError("pmap over a subset of devices is for single-process use only")
            self.local_devices = list(jax.local_devices() if devices is None else devices)
            # pmap's `devices` must list the same global devices on every process; left unset, pmap maps
            # over the local devices and its collectives span every process. Passing each process's
            # local devices would silently confine the gradient average to one host.
            self._pmap_devices = None if devices is None else self.local_devices
            self.num_devices = len(self.local_devices) * jax.process_count()
            # Stacked per-device copies / batch slices, one row per local device, as pmap expects them.
            self._local_mesh = Mesh(np.array(self.local_devices), (DATA_AXIS,))
            self._stacked = NamedSharding(self._local_mesh, P(DATA_AXIS))

    def check_batch_size(self, global_batch_size: int) -> int:
        """The per-process batch size; raises unless the global batch splits evenly over all devices."""
        if global_batch_size <= 0 or global_batch_size % self.num_devices:
            raise ValueError(
                f"batch size {global_batch_size} must be a positive multiple of the device count "
                f"({self.num_devices} devices in {jax.process_count()} process(es)); per-device batches "
                f"must be equal for the gradient average to be the global-batch gradient"
            )
        return global_batch_size // jax.process_count()

    # -- state ---------------------------------------------------------------------------------------

    def init_state(self, init_fn: Callable[[], PyTree]) -> PyTree:
        """Runs `init_fn` (deterministic, same on every process) and returns its result replicated."""
        if self.parallelism == "shard_map":
            return jax.jit(init_fn, out_shardings=self._replicated)()
        return self.replicate(jax.device_get(jax.jit(init_fn)()))

    def replicate(self, tree: PyTree) -> PyTree:
        """A host pytree (identical on every process) -> the replicated form the compiled steps take."""
        if self.parallelism == "shard_map":
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)),
                tree,
            )
        n = len(self.local_devices)
        return jax.tree.map(
            lambda x: jax.device_put(np.stack([np.asarray(x)] * n), self._stacked), tree
        )

    def unreplicate(self, tree: PyTree) -> PyTree:
        """One copy of a replicated pytree, as numpy arrays on the host."""
        if self.parallelism == "pmap":
            tree = jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)
        return jax.device_get(tree)

    # -- batches -------------------------------------------------------------------------------------

    def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch -> the batch as the compiled step takes it.

        Every process passes the same number of rows; rows of process p come after those of process p-1.
        """
        if self.parallelism == "shard_map":
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._batch_sharding, x),
                local_batch,
            )
        n = len(self.local_devices)

        def split(x: np.ndarray) -> jax.Array:
            if x.shape[0] % n:
                raise ValueError(
                    f"local batch of {x.shape[0]} rows does not split over {n} devices"
                )
            return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), self._stacked)

        return jax.tree.map(split, local_batch)

    def device_batches(
        self, local_batches: Iterator[dict[str, np.ndarray]], ahead: int = DEVICE_PREFETCH
    ) -> Iterator[dict[str, jax.Array]]:
        """`shard_batch` of each local batch, `ahead` of them sent to the devices at a time: when a step
        takes batch k, batches k + 1 .. k + ahead - 1 are already on their way.

        JAX's transfers and steps run asynchronously, so the next batches' copies overlap the step running
        now instead of delaying the next one (flax's `prefetch_to_device`). Reading ahead is safe for
        resuming: a run's data position is its step (`data.stream`), not the iterator's."""
        queue: collections.deque[dict[str, jax.Array]] = collections.deque()

        def send(count: int) -> None:
            for _ in range(count):
                try:
                    queue.append(self.shard_batch(next(local_batches)))
                except StopIteration:
                    return

        send(ahead)
        while queue:
            yield queue.popleft()
            send(1)

    # -- compiling -----------------------------------------------------------------------------------

    def compile(self, per_device_fn: Callable, *, donate_state: bool) -> Callable:
        """`per_device_fn(state, batch) -> outputs`, using collectives over `data`, as one compiled call
        on global (replicated state, sharded batch) -> replicated outputs. With `donate_state` the input
        state's buffers are reused for the output: callers must not touch the old state afterwards."""
        donate = (0,) if donate_state else ()
        if self.parallelism == "pmap":
            return jax.pmap(
                per_device_fn,
                axis_name=DATA_AXIS,
                devices=self._pmap_devices,
                donate_argnums=donate,
            )
        # check_vma=False: with it on, shard_map differentiates a replicated (P()) parameter as one
        # value and already sums its gradient over devices, so the step's pmean(grads) would leave it
        # N times too large. Off, each device sees its own copy, as under pmap, and pmean is right.
        mapped = jax.shard_map(
            per_device_fn,
            mesh=self.mesh,
            in_specs=(P(), P(DATA_AXIS)),
            out_specs=P(),
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=donate)
