"""Dense (per-pixel) training and evaluation steps: pure functions of one device's share of a batch.

The same shape as `resnet_jax.steps` so that `DataParallel.compile` and the training loop run them unchanged:
`train_step(state, batch, *, apply_fn, tx, learning_rate_fn, ...) -> (state, metrics)` with metrics `loss` and
`grad_norm` (what `metrics.TrainMetrics` checks), and `eval_step(state, batch, ...) -> sums` psum'ed over
devices. A batch is `{'image': (B, H, W, C) float, 'label': (B, H, W) int}`, the label map of per-pixel class
ids; eval batches add `mask` (B,), 0 for the padding rows that fill the last batch.

The loss is the mean cross-entropy over every counted pixel of the global batch, whatever the devices: each
device divides its pixel sum by the global pixel count (a `psum`), so the `pmean` of gradients, as in
`resnet_jax.steps`, is the global mean's gradient even when devices hold different numbers of ignored pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from resnet_jax.dense.metrics import confusion_matrix
from resnet_jax.optim import gradient_norm
from resnet_jax.steps import update_from_loss
from resnet_jax.train_state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
ApplyFn = Callable[..., Any]


def pixel_weights(labels: jax.Array, ignore_index: int | None) -> jax.Array:
    """float32 1 for every counted pixel, 0 where the label is `ignore_index` (None: every pixel counts)."""
    if ignore_index is None:
        return jnp.ones(labels.shape, jnp.float32)
    return (labels != ignore_index).astype(jnp.float32)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-pixel softmax cross-entropy `(B, H, W)` in float32, 0 where `weights` is 0 (any label there)."""
    chex.assert_rank(logits, 4)
    chex.assert_shape(labels, logits.shape[:3])
    safe_labels = jnp.where(weights > 0, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), safe_labels
    )
    return losses * weights


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    ema_decay: float = 0.0,
    trainable_mask: PyTree | None = None,
    ignore_index: int | None = None,
    axis_name: str = "data",
) -> tuple[TrainState, Metrics]:
    """One optimizer update from this device's batch of images and label maps.

    BatchNorm and `trainable_mask` (frozen backbone: only the neck and head differentiate) behave as in
    `resnet_jax.steps.train_step`. Metrics: loss (mean over counted pixels), pixel_accuracy, learning_rate,
    grad_norm (of the averaged gradients of the trainable parameters).
    """
    images, labels = batch["image"], batch["label"]
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, images.shape[:3])
    weights = pixel_weights(labels, ignore_index)
    global_pixels = jnp.maximum(lax.psum(jnp.sum(weights), axis_name), 1.0)
    num_devices = lax.psum(1, axis_name)

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, updates = apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        # This device's share of the global mean: the pmean over devices adds the shares up.
        local_sum = jnp.sum(pixel_cross_entropy(logits, labels, weights))
        return local_sum * num_devices / global_pixels, (logits, updates.get("batch_stats", {}))

    new_state, loss, logits, trainable_grads = update_from_loss(
        state,
        loss_fn,
        tx=tx,
        ema_decay=ema_decay,
        trainable_mask=trainable_mask,
        axis_name=axis_name,
    )

    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * weights
    metrics = {
        "loss": lax.pmean(loss, axis_name),
        "pixel_accuracy": lax.psum(jnp.sum(correct), axis_name) / global_pixels,
        "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
        "grad_norm": gradient_norm(trainable_grads),
    }
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: ApplyFn,
    num_classes: int,
    use_ema: bool = False,
    ignore_index: int | None = None,
    axis_name: str = "data",
) -> Metrics:
    """Sums over all devices of this batch's per-pixel loss, counted pixels, examples and the confusion matrix.

    Padding rows (`mask` 0) and ignored pixels count nowhere. `dense.metrics.summarize_dense_eval` turns the
    accumulated sums into loss, pixel accuracy and mean IoU.
    """
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, images.shape[:3])
    chex.assert_shape(mask, images.shape[:1])
    if use_ema:
        variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    else:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = apply_fn(variables, images, train=False)
    weights = pixel_weights(labels, ignore_index) * mask.astype(jnp.float32)[:, None, None]
    sums = {
        "loss_sum": jnp.sum(pixel_cross_entropy(logits, labels, weights)),
        "pixel_count": jnp.sum(weights),
        "count": jnp.sum(mask.astype(jnp.float32)),
        "confusion": confusion_matrix(labels, jnp.argmax(logits, -1), num_classes, weights),
    }
    return lax.psum(sums, axis_name)
