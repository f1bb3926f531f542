"""Mean IoU, exact over an eval set: a confusion matrix per device batch, summed over devices and batches.

Each device counts its pixels into a `(num_classes, num_classes)` integer matrix (rows: true class, columns:
predicted class) with padding examples and ignored pixels weighted 0; `lax.psum` adds the devices' matrices and
the host adds the batches' in int64 (`resnet_jax.metrics.accumulate`, the classification eval's too), so every
pixel of the split is counted exactly once. IoU of class c is
TP / (TP + FP + FN); the mean runs over the classes present, i.e. with a union TP + FP + FN > 0 (a class
neither in the truth nor predicted anywhere in the split has no IoU and is left out, not counted as 0 or 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, weights: jax.Array
) -> jax.Array:
    """int32 `(num_classes, num_classes)` counts of (true, predicted) pairs where `weights` is nonzero.

    `labels`, `predictions`, `weights` broadcast to one shape; `weights` is 0/1 (padding, ignored pixels).
    Labels outside [0, num_classes) must have weight 0 (they are clipped so they index nothing harmful).
    """
    labels = jnp.clip(labels.astype(jnp.int32), 0, num_classes - 1)
    predictions = jnp.clip(predictions.astype(jnp.int32), 0, num_classes - 1)
    labels, predictions, weights = jnp.broadcast_arrays(labels, predictions, weights)
    index = (labels * num_classes + predictions).reshape(-1)
    counts = (
        jnp.zeros((num_classes * num_classes,), jnp.int32)
        .at[index]
        .add(weights.reshape(-1).astype(jnp.int32))
    )
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """float64 IoU of each class, NaN where the class has no union (absent from truth and predictions)."""
    confusion = np.asarray(confusion, np.int64)
    true_positives = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positives / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of `iou_per_class` over the classes present (union > 0); NaN for an empty matrix."""
    ious = iou_per_class(confusion)
    present = ~np.isnan(ious)
    return float(np.mean(ious[present])) if present.any() else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    """Share of counted pixels whose predicted class is the true one."""
    confusion = np.asarray(confusion, np.int64)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


DENSE_EVAL_SUM_NAMES = ("loss_sum", "pixel_count", "count", "confusion")


def summarize_dense_eval(sums: Mapping[str, Any]) -> dict[str, float]:
    """Accumulated `dense.steps.eval_step` sums -> {'loss' (per pixel), 'pixel_accuracy', 'mean_iou'}."""
    pixels = float(sums["pixel_count"])
    if pixels == 0:
        raise ValueError("the eval split yielded no counted pixels")
    return {
        "loss": float(sums["loss_sum"]) / pixels,
        "pixel_accuracy": pixel_accuracy(sums["confusion"]),
        "mean_iou": mean_iou(sums["confusion"]),
    }
