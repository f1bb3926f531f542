"""From device metrics to host numbers: the training-metrics buffer and exact evaluation over a split.

Both keep the devices busy: per-step metrics stay on the devices until a log or checkpoint step needs
them, and an eval split's per-batch sums are fetched once, after the last batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import steps
from resnet_jax.parallel import DataParallel
from resnet_jax.train_state import TrainState


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; nothing from that step on was saved."""


class TrainMetrics:
    """Per-step metrics kept on the devices until they are needed, then checked and averaged on the host.

    Fetching every step would make the host wait for the devices each step; fetching only at log and
    checkpoint steps keeps the devices busy. Every step's loss and gradient norm are still checked, so a
    non-finite value is reported with the exact step that produced it.
    """

    def __init__(self, data_parallel: DataParallel):
        self._data_parallel = data_parallel
        self._on_device: list[tuple[int, dict[str, jax.Array]]] = []
        self._on_host: list[tuple[int, dict[str, float]]] = []

    def append(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._on_device.append((step, metrics))

    def check_finite(self) -> None:
        """Fetches pending metrics; raises NonFiniteLossError at the first step with NaN/Inf."""
        if not self._on_device:
            return
        fetched = self._data_parallel.unreplicate([m for _, m in self._on_device])
        for (step, _), metrics in zip(self._on_device, fetched, strict=True):
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                # The trainer adds which checkpoints are kept and how to rerun (`training`).
                raise NonFiniteLossError(
                    f"non-finite training loss or gradient at step {step} (loss "
                    f"{float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}); stopped, "
                    f"nothing from step {step} on was saved"
                )
            self._on_host.append((step, {k: float(v) for k, v in metrics.items()}))
        self._on_device = []

    def summary(self) -> dict[str, float]:
        """Means over the steps since the last summary (learning_rate: the latest), as train_* metrics."""
        self.check_finite()
        if not self._on_host:
            return {}
        names = self._on_host[0][1].keys()
        summary = {
            f"train_{name}": float(np.mean([m[name] for _, m in self._on_host]))
            for name in names
            if name != "learning_rate"
        }
        summary["learning_rate"] = self._on_host[-1][1]["learning_rate"]
        self._on_host = []
        return summary


@jax.jit
def _finite_flags(tree: Any) -> Any:
    """Per leaf: are all its values finite (integer leaves, e.g. the step, always are)?"""

    def finite(x: jax.Array) -> jax.Array:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.all(jnp.isfinite(x))
        return jnp.array(True)

    return jax.tree.map(finite, tree)


def non_finite_paths(tree: Any) -> list[str]:
    """Paths (`params/stage1_block1/bn1/scale`) of the leaves holding a NaN or Inf, computed on the devices.

    A loss can stay finite while BatchNorm's running variance has overflowed; checking every leaf before a
    save is what keeps a checkpoint trainable from.
    """
    flags = jax.device_get(_finite_flags(tree))
    return [
        "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
        for path, finite in jax.tree_util.tree_flatten_with_path(flags)[0]
        if not finite
    ]


EvalFn = Callable[[TrainState, Any], Mapping[str, jax.Array]]
Summarize = Callable[[Mapping[str, Any]], dict[str, float]]


def accumulate(batch_sums: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-name totals of fetched per-batch eval sums, wide enough that a long split loses nothing.

    Scalars are added exactly (`math.fsum`) into a float; arrays (a confusion matrix) in int64, or float64
    for float arrays. Every eval step (classification's `steps.eval_step`, the dense one) returns sums, so
    every task's exact eval is this plus its own summary of the totals.
    """
    batch_sums = list(batch_sums)
    if not batch_sums:
        return {}
    totals: dict[str, Any] = {}
    for name in batch_sums[0]:
        values = [np.asarray(sums[name]) for sums in batch_sums]
        if values[0].ndim == 0:
            totals[name] = math.fsum(float(v) for v in values)
        else:
            wide = np.int64 if np.issubdtype(values[0].dtype, np.integer) else np.float64
            totals[name] = np.sum([v.astype(wide) for v in values], axis=0, dtype=wide)
    return totals


def evaluate(
    eval_fns: Mapping[str, EvalFn],
    state: TrainState,
    data_parallel: DataParallel,
    batches: Iterable[dict[str, np.ndarray]],
    on_batch: Callable[[], None] = lambda: None,
    summarize: Summarize = steps.summarize_eval,
) -> dict[str, float]:
    """Exact metrics of every `eval_fns[prefix]` over one pass of `batches` (each process's padded,
    masked share of the split), as `{f"{prefix}_{name}": value}`.

    The split is read and placed on the devices once, however many functions (the model, its EMA)
    evaluate it; `on_batch` is called after each batch (a progress bar). `summarize` turns the split's
    `accumulate`d sums into metrics: `steps.summarize_eval` for classification,
    `dense.metrics.summarize_dense_eval` for segmentation.
    """
    sums: dict[str, list] = {prefix: [] for prefix in eval_fns}
    for batch in batches:
        device_batch = data_parallel.shard_batch(batch)
        for prefix, eval_fn in eval_fns.items():
            sums[prefix].append(eval_fn(state, device_batch))
        on_batch()
    results = {}
    for prefix, fetched in data_parallel.unreplicate(sums).items():
        # Accumulated on the host, exactly, so that long splits lose nothing to float32 rounding.
        totals = accumulate(fetched)
        results.update({f"{prefix}_{name}": value for name, value in summarize(totals).items()})
    return results
