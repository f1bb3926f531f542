"""The optimizer and learning-rate schedule, built from the config with Optax.

Everything tunable is a config key; nothing here hides a constant. The pieces:

- `scaled_learning_rate`: the peak learning rate of the run, by the linear scaling rule applied to the batch
  size the run actually uses (`learning_rate_per_256`), or `learning_rate` as given.
- `create_learning_rate_schedule`: linear warmup, then cosine decay, step decay or a constant. Schedules are
  functions of the optimizer step (0-based: the learning rate used by the update that makes step 1).
- `weight_decay_mask`: which parameters get weight decay. Only kernels (ndim > 1: conv HWIO, dense (in, out));
  never BatchNorm scale/bias nor biases (all ndim == 1), as in Goyal et al. 2017 and most ImageNet recipes.
- `gradient_norm`: the global L2 norm of the gradients (the `grad_norm` metric, and what clipping bounds).
- `create_optimizer`: SGD with (Nesterov) momentum, LARS or AdamW, with optional global-norm clipping, and an
  optional split into parameter groups (`optax.multi_transform`) with their own learning-rate multipliers,
  a multiplier of 0 freezing the group (no update, no optimizer state, no weight decay).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # annotations only: the GPU benchmark image has no ml_collections
    import ml_collections

PyTree = Any


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """`config.num_train_steps` if positive, else `config.num_epochs` epochs of `steps_per_epoch`."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch))


def gradient_norm(grads: Any) -> jax.Array:
    """The global L2 norm of `grads` (what `optax.tree.norm` returns), summed per tap of each conv kernel.

    Why per tap: where a conv form multiplies only the taps that read real input (the centre of a 3x3 kernel
    over 1x1 maps: resnet18's last stage at 32 px), autodiff gives the kernel's gradient as those taps padded
    with zeros. The optimizer update reads that padding inside its own loop, but XLA:CPU hands a whole-array
    sum of squares to YNNPACK, which takes no padding, so the padded gradient was written out in full first
    (3 x 9.4 MB per resnet18 step at 32 px; the step is 1.06x faster without that). XLA simplifies a slice of
    a padding to the live tap or to zeros, so summing tap by tap reads only the live taps and writes nothing.
    """
    total = 0.0
    for leaf in jax.tree.leaves(grads):
        leaf = leaf.astype(_at_least_float32(leaf.dtype))
        taps = [leaf]
        # An HWIO kernel up to 7x7 (the stems); any other 4-D leaf is summed whole rather than in thousands of
        # slices.
        if leaf.ndim == 4 and 1 < leaf.shape[0] * leaf.shape[1] <= 49:
            taps = [leaf[i, j] for i in range(leaf.shape[0]) for j in range(leaf.shape[1])]
        for tap in taps:
            total += jnp.sum(jnp.square(tap))
    return jnp.sqrt(jnp.asarray(total))


def _at_least_float32(dtype: Any) -> Any:
    """float32 for narrower floats (bf16, fp16) and non-floats, the dtype itself otherwise (float64 under x64)."""
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.float32


def clip_by_gradient_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm(max_norm)` with the norm taken by `gradient_norm` (same values and the same
    empty state, so checkpoints do not change; `gradient_norm` says why it sums per tap)."""

    def update(updates, state, params=None):
        del params
        norm = gradient_norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)

        # Explicit casts (the product in float32 or wider, as implicit promotion would give), so this also
        # runs under `jax.numpy_dtype_promotion("strict")`.
        def clip(g):
            wide = _at_least_float32(g.dtype)
            return (g.astype(wide) * scale.astype(wide)).astype(g.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The run's peak learning rate: `learning_rate_per_256 * batch_size / 256` when learning_rate_per_256 > 0
    (the linear scaling rule of Goyal et al. 2017), else `learning_rate`.

    Applied here, at run time, to the global batch size the run uses, so `--config.batch_size=...` rescales
    the rate; a rule evaluated inside a config file would not see the override.
    """
    # .get: configs built before the schema had learning_rate_per_256 still resolve to learning_rate.
    per_256 = config.get("learning_rate_per_256", 0.0)
    if per_256 < 0:
        raise ValueError(f"learning_rate_per_256 must be >= 0, got {per_256}")
    if per_256 > 0:
        return float(per_256) * config.batch_size / 256
    return float(config.learning_rate)


def describe_learning_rate(config: ml_collections.ConfigDict) -> str:
    """How the peak learning rate was resolved, for the run's log."""
    learning_rate = scaled_learning_rate(config)
    per_256 = config.get("learning_rate_per_256", 0.0)
    if per_256 > 0:
        return (
            f"peak learning rate {learning_rate:g} = learning_rate_per_256 {per_256:g} x global batch "
            f"{config.batch_size} / 256"
        )
    return f"peak learning rate {learning_rate:g} (config.learning_rate)"


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """The schedule named by `config.lr_schedule`, in optimizer steps.

    - "cosine": linear warmup from 0 over `warmup_epochs`, then cosine decay to 0 at the last step.
    - "step": linear warmup, then `learning_rate` multiplied by `lr_decay_factor` at each boundary of
      `lr_decay_epochs` (in epochs) or `lr_decay_steps` (in steps; exactly one of the two is set).
    - "constant": linear warmup, then `learning_rate`.

    Warmup starts at 0 and reaches the peak at step `warmup_steps` (Goyal et al. 2017). The peak
    ("learning_rate" above) is `scaled_learning_rate(config)`.
    """
    base_lr = scaled_learning_rate(config)
    total_steps = total_train_steps(config, steps_per_epoch)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup_steps >= total_steps and config.warmup_epochs > 0:
        raise ValueError(
            f"warmup_epochs={config.warmup_epochs} is {warmup_steps} steps, not fewer than the "
            f"{total_steps} training steps"
        )
    name = config.lr_schedule
    if name == "cosine":
        main = optax.cosine_decay_schedule(base_lr, decay_steps=max(total_steps - warmup_steps, 1))
    elif name == "step":
        epochs, steps = tuple(config.lr_decay_epochs), tuple(config.lr_decay_steps)
        if bool(epochs) == bool(steps):
            raise ValueError(
                "lr_schedule='step' needs exactly one of lr_decay_epochs or lr_decay_steps; "
                f"got lr_decay_epochs={epochs}, lr_decay_steps={steps}"
            )
        boundaries = steps or tuple(int(round(e * steps_per_epoch)) for e in epochs)
        if list(boundaries) != sorted(set(boundaries)) or boundaries[0] <= warmup_steps:
            raise ValueError(
                f"lr decay boundaries {boundaries} (in steps) must be strictly increasing and after "
                f"the {warmup_steps} warmup steps; two epochs that round to one step lose a decay"
            )
        main = optax.piecewise_constant_schedule(
            base_lr,
            # Boundaries are absolute steps; the schedule after warmup counts from the end of warmup.
            {int(b) - warmup_steps: config.lr_decay_factor for b in boundaries},
        )
    elif name == "constant":
        main = optax.constant_schedule(base_lr)
    else:
        raise ValueError(f"unknown lr_schedule {name!r}; expected 'cosine', 'step' or 'constant'")
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, base_lr, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for the parameters that get weight decay: kernels (ndim > 1), not BN scale/bias nor biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _base_optimizer(
    config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    name = config.optimizer
    if name == "sgd":
        # Decay added to the gradient before momentum: torch.optim.SGD(weight_decay=...)'s update.
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov),
        )
    if name == "lars":
        # LARS (You et al. 2017): the same mask excludes BN/bias from decay and from the trust ratio.
        return optax.lars(
            learning_rate,
            weight_decay=config.weight_decay,
            weight_decay_mask=weight_decay_mask,
            trust_coefficient=config.lars_trust_coefficient,
            trust_ratio_mask=weight_decay_mask,
            momentum=config.momentum,
            nesterov=config.nesterov,
        )
    if name == "adamw":
        return optax.adamw(
            learning_rate,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd', 'lars' or 'adamw'")


def create_optimizer(
    config: ml_collections.ConfigDict,
    learning_rate_fn: optax.Schedule,
    *,
    param_labels: PyTree | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer`, with optional clipping and parameter groups.

    Args:
      config: reads optimizer, momentum, nesterov, weight_decay, grad_clip_norm, lars_trust_coefficient,
        adam_b1, adam_b2, adam_eps.
      learning_rate_fn: the schedule (see `create_learning_rate_schedule`).
      param_labels: for fine-tuning, a pytree like the params whose leaves are group names (e.g.
        "backbone", "head"). None: one group.
      lr_multipliers: group name -> factor on the learning rate; 0 freezes the group. Groups not listed get 1.
    """
    if param_labels is None:
        tx = _base_optimizer(config, learning_rate_fn)
    else:
        multipliers = dict(lr_multipliers or {})

        def group_optimizer(multiplier: float) -> optax.GradientTransformation:
            if multiplier == 0.0:
                return optax.set_to_zero()
            return _base_optimizer(config, lambda step: multiplier * learning_rate_fn(step))

        groups = set(jax.tree.leaves(param_labels))
        if unknown := set(multipliers) - groups:
            raise ValueError(
                f"lr_multipliers name groups {sorted(unknown)} that no parameter has; "
                f"groups: {sorted(groups)}"
            )
        tx = optax.multi_transform(
            {group: group_optimizer(multipliers.get(group, 1.0)) for group in groups},
            param_labels,
        )
    if config.grad_clip_norm > 0:
        clip = clip_by_gradient_norm(config.grad_clip_norm)
        if param_labels is not None:
            # Frozen groups' gradients are dropped before the norm is taken: they must not shrink the
            # clipping factor of the groups that train (a linear probe clips on the head's norm alone).
            frozen = {g for g, m in (lr_multipliers or {}).items() if m == 0.0}
            trained = jax.tree.map(lambda label: label not in frozen, param_labels)
            clip = optax.masked(clip, trained)
            zero_frozen = optax.masked(optax.set_to_zero(), jax.tree.map(lambda t: not t, trained))
            clip = optax.chain(zero_frozen, clip)
        tx = optax.chain(clip, tx)
    return tx
