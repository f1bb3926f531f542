"""The training and evaluation steps: pure functions of one device's share of a batch.

Each step is written once, for one device, and reaches the other devices only through collectives over
`axis_name` (`lax.pmean` of gradients, metrics and BatchNorm statistics, skipped on one device; `lax.psum` of
eval counts).
`resnet_jax.parallel` compiles the same function with `jax.shard_map` inside `jax.jit` or with `jax.pmap`;
nothing here knows how many devices there are or where they are.

Input contract: `batch['image']` is uint8 pixels, cast and normalized inside the step (`normalize_images`,
with the dataset's mean/std bound as `pixel_mean`/`pixel_std`: what the trainer feeds), or float images that
are already normalized (passed through). The model itself always sees normalized float NHWC.

Gradients are averaged with `lax.pmean`, which is right for `jax.pmap` and for `jax.shard_map` with
`check_vma=False` (see parallel.py: with the default `check_vma=True`, shard_map already sums the gradient
of a replicated parameter and the pmean would leave it N times too large).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax import lax

from resnet_jax.mixing import BatchMixing, mix_images, mix_targets
from resnet_jax.optim import gradient_norm
from resnet_jax.parallel import device_mean
from resnet_jax.train_state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
ApplyFn = Callable[..., Any]


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy, in float32, against labels smoothed by `label_smoothing`."""
    chex.assert_rank(logits, 2)
    return soft_target_cross_entropy(
        logits, jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing
    )


def soft_target_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float
) -> jax.Array:
    """Per-example softmax cross-entropy, in float32, against (B, K) target distributions (one-hot or mixed).

    Smoothing comes after mixing, as torch's `CrossEntropyLoss(label_smoothing=...)` treats the soft targets
    of torchvision's mixup/cutmix recipe: targets * (1 - label_smoothing) + label_smoothing / K.
    """
    chex.assert_equal_shape([logits, targets])
    targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def correct_predictions(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example float32 indicators: top-1 correct, and label among the top 5 (top k for k < 5 classes)."""
    top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    _, top_indices = lax.top_k(logits, min(5, logits.shape[-1]))
    top5 = jnp.any(top_indices == labels[:, None], axis=-1).astype(jnp.float32)
    return top1, top5


def normalize_images(
    images: jax.Array, pixel_mean: Sequence[float] | None, pixel_std: Sequence[float] | None
) -> jax.Array:
    """The model's input from a batch's images: uint8 pixels become `(pixel / 255 - mean) / std` in float32;
    float images are taken as already normalized and returned unchanged.

    The input pipeline ships uint8 batches (4x less host memory traffic and host-to-device transfer than
    float32) and the normalization runs here, inside the compiled step, with the dataset's statistics. The
    arithmetic is the host's (`transforms.normalize`): one float32 multiply by 1 / (255 std) and one add of
    -mean / std, with the constants rounded to float32 the same way, so both paths agree to float32 rounding.
    """
    if images.dtype != jnp.uint8:
        return images
    if pixel_mean is None or pixel_std is None:
        raise ValueError(
            "uint8 images need the dataset's pixel_mean and pixel_std to be normalized in the step "
            "(pass them to the step, e.g. from resnet_jax.data.normalization_stats(config))"
        )
    std = np.asarray(pixel_std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-np.asarray(pixel_mean, np.float32) / std).astype(np.float32)
    return images.astype(jnp.float32) * scale + offset


def partition_params(params: PyTree, trainable_mask: PyTree | None) -> tuple[dict, dict]:
    """`params` as two flat `{path: array}` dicts: (trainable, frozen) by `trainable_mask` (None: all train)."""
    flat = traverse_util.flatten_dict(params)
    if trainable_mask is None:
        return flat, {}
    mask = traverse_util.flatten_dict(trainable_mask)
    trainable = {path: value for path, value in flat.items() if mask[path]}
    return trainable, {path: value for path, value in flat.items() if not mask[path]}


def _inputs_and_loss(
    images: jax.Array,
    labels: jax.Array,
    step: jax.Array,
    label_smoothing: float,
    mixing: BatchMixing | None,
    axis_name: str,
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(the images the model trains on, their per-example loss as a function of the logits).

    Without enabled `mixing` (None, or both alphas 0): the batch's images and the smoothed cross-entropy
    against its labels, and no mixing code compiled. With it: the images and one-hot labels mixed over the
    global batch (`resnet_jax.mixing`: the same on any number of devices) and the cross-entropy against the
    mixed targets, smoothed after mixing as torchvision's recipe does.
    """
    if mixing is None or not mixing.enabled:
        return images, lambda logits: cross_entropy_loss(logits, labels, label_smoothing)
    images, label_weight = mix_images(mixing.step_key(step), images, mixing, axis_name)

    def per_example_loss(logits: jax.Array) -> jax.Array:
        targets = mix_targets(jax.nn.one_hot(labels, logits.shape[-1]), label_weight, axis_name)
        return soft_target_cross_entropy(logits, targets, label_smoothing)

    return images, per_example_loss


def update_from_loss(
    state: TrainState,
    loss_fn: Callable[[PyTree], tuple[jax.Array, tuple[jax.Array, PyTree]]],
    *,
    tx: optax.GradientTransformation,
    ema_decay: float,
    trainable_mask: PyTree | None,
    axis_name: str,
) -> tuple[TrainState, jax.Array, jax.Array, dict]:
    """The update every task's train step shares: differentiate `loss_fn(params) -> (loss, (logits,
    new batch_stats))` with respect to the trainable parameters only, average gradients and statistics over
    devices, apply the optimizer (frozen parameters get zero gradients) and move the EMA.

    Returns the new state, this device's loss, its logits and the averaged trainable gradients.
    """
    trainable, frozen = partition_params(state.params, trainable_mask)

    def loss_of_trainable(trainable: dict) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        return loss_fn(traverse_util.unflatten_dict({**frozen, **trainable}))

    (loss, (logits, batch_stats)), trainable_grads = jax.value_and_grad(
        loss_of_trainable, has_aux=True
    )(trainable)
    trainable_grads = device_mean(trainable_grads, axis_name)
    batch_stats = device_mean(batch_stats, axis_name)
    frozen_grads = {path: jnp.zeros_like(value) for path, value in frozen.items()}
    grads = traverse_util.unflatten_dict({**frozen_grads, **trainable_grads})
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return _update_ema(new_state, ema_decay), loss, logits, trainable_grads


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    label_smoothing: float,
    ema_decay: float,
    trainable_mask: PyTree | None = None,
    mixing: BatchMixing | None = None,
    dropout_seed: int | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    axis_name: str = "data",
) -> tuple[TrainState, Metrics]:
    """One optimizer update from this device's `batch` ({'image': (B, H, W, C), 'label': (B,) int}).

    `batch['image']` is uint8 pixels, normalized here with `pixel_mean` / `pixel_std` (`normalize_images`),
    or float images already normalized. Mixing sees normalized images, as it would on the host.

    BatchNorm is synced when `apply_fn`'s model was built with `bn_axis_name=axis_name`; otherwise each device
    normalizes with its own batch statistics. Either way the new running statistics are averaged over devices
    (a no-op up to rounding when synced) so that the state stays replicated.

    `trainable_mask` (a tree like the params, True where a parameter trains; None: all train) limits the
    gradient to the trainable parameters: a linear probe differentiates and all-reduces the head alone. The
    frozen parameters get zero updates (the optimizer must leave them unchanged, e.g. `optax.set_to_zero`).

    `mixing`: mixup / CutMix (see `_inputs_and_loss`); accuracy stays against the unmixed labels.
    `dropout_seed`: for models with dropout; each step and device draws from (seed, step, device index), so
    dropout masks (unlike everything else) depend on the device count.

    Returns the new state and device-averaged metrics: loss, accuracy, top5_accuracy (of this batch, before
    the update), learning_rate (the one this update used) and grad_norm (global L2 norm of the averaged
    gradients of the trainable parameters).
    """
    images, labels = batch["image"], batch["label"]
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, (images.shape[0],))
    images = normalize_images(images, pixel_mean, pixel_std)

    images, per_example_loss = _inputs_and_loss(
        images, labels, state.step, label_smoothing, mixing, axis_name
    )

    rngs = {}
    if dropout_seed is not None:
        step_key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        rngs["dropout"] = jax.random.fold_in(step_key, lax.axis_index(axis_name))

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, updates = apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        # GroupNorm networks (BiT) keep no running statistics: their update is empty.
        return jnp.mean(per_example_loss(logits)), (logits, updates.get("batch_stats", {}))

    new_state, loss, logits, trainable_grads = update_from_loss(
        state,
        loss_fn,
        tx=tx,
        ema_decay=ema_decay,
        trainable_mask=trainable_mask,
        axis_name=axis_name,
    )

    top1, top5 = correct_predictions(logits, labels)
    metrics = device_mean(
        {"loss": loss, "accuracy": jnp.mean(top1), "top5_accuracy": jnp.mean(top5)}, axis_name
    )
    metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    metrics["grad_norm"] = gradient_norm(trainable_grads)
    return new_state, metrics


def _update_ema(state: TrainState, ema_decay: float) -> TrainState:
    """The EMA of params and BN statistics moved towards `state`'s (no-op when the run keeps none)."""
    if state.ema_params is None:
        return state
    return state.replace(
        ema_params=optax.incremental_update(
            state.params, state.ema_params, step_size=1.0 - ema_decay
        ),
        ema_batch_stats=optax.incremental_update(
            state.batch_stats, state.ema_batch_stats, step_size=1.0 - ema_decay
        ),
    )


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: ApplyFn,
    use_ema: bool = False,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
    axis_name: str = "data",
) -> Metrics:
    """Sums over all devices of this eval batch's masked loss, top-1, top-5 and example count.

    `batch['mask']` is 1 for real examples and 0 for the padding that fills the last batch; summing masked
    counts (not averaging per-batch means) counts every example of the split exactly once. The loss is the
    plain cross-entropy, without label smoothing. `summarize_eval` turns accumulated sums into means.
    uint8 images are normalized with `pixel_mean` / `pixel_std` as in `train_step`.
    """
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    chex.assert_rank(images, 4)
    images = normalize_images(images, pixel_mean, pixel_std)
    if use_ema:
        variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    else:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = apply_fn(variables, images, train=False)
    top1, top5 = correct_predictions(logits, labels)
    mask = mask.astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(cross_entropy_loss(logits, labels, 0.0) * mask),
        "correct": jnp.sum(top1 * mask),
        "top5_correct": jnp.sum(top5 * mask),
        "count": jnp.sum(mask),
    }
    return lax.psum(sums, axis_name)


EVAL_SUM_NAMES = ("loss_sum", "correct", "top5_correct", "count")


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    """Accumulated `eval_step` sums -> {'loss', 'accuracy', 'top5_accuracy'} over every counted example."""
    count = float(sums["count"])
    if count == 0:
        raise ValueError("the eval split yielded no examples")
    return {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": float(sums["correct"]) / count,
        "top5_accuracy": float(sums["top5_correct"]) / count,
    }
