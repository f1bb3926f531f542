"""Mixup and CutMix over the global batch, inside the compiled step, as torchvision's `v2.MixUp` / `v2.CutMix`.

Batch-level, as torchvision does it: one lambda per batch from Beta(alpha, alpha); the batch is mixed with
itself rolled by one row (row i with row i - 1, row 0 with the last), and the one-hot labels are mixed with
the same weight. Mixup's label weight is lambda; CutMix pastes a box of the rolled batch whose label weight
is 1 - (pasted area after clipping the box to the image) / (image area). timm's `mix_prob` (mix at all) and
`switch_prob` (CutMix rather than mixup when both are on) choose between them per batch.

Topology independence: the draws (lambda, box, choice) are a function of (seed, step) only, the same on every
device, and the roll is over the whole global batch: each device receives the last row of the device before
it (`lax.ppermute`, one image per step). So the mixed global batch is the same on 1 device or 64, and the
same as one device mixing the whole global batch. torchvision's reference mixes each GPU's batch
separately; the difference is which row pairs with which, not the distribution.

Mixing is linear, so mixing normalized images equals normalizing mixed pixels (per-channel affine), and a
step that receives uint8 images must mix after its float conversion (integer inputs are cast to float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Folded into the seed first, so that the mixing draws are a stream of their own, unrelated to any other
# use of the run's seed (parameter init, dropout).
_MIXING_STREAM = 0x6D6978


@dataclasses.dataclass(frozen=True)
class BatchMixing:
    """What mixes a batch: hashable, so it can be a static argument of the compiled step.

    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) concentration of each; 0 turns that one off.
    mix_prob: probability that a batch is mixed at all (timm's `mix_prob`; torchvision's recipe: 1).
    switch_prob: with both on, probability of CutMix rather than mixup (timm's `switch_prob`; torchvision's
      `RandomChoice([MixUp, CutMix])` is 0.5).
    seed: the draws of step s are a function of (seed, s).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self}")
        if not (0 <= self.mix_prob <= 1 and 0 <= self.switch_prob <= 1):
            raise ValueError(f"mix_prob and switch_prob must be in [0, 1], got {self}")

    @property
    def enabled(self) -> bool:
        """Whether any batch can be mixed; when not, the step compiles without any mixing code."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @classmethod
    def from_config(cls, config: Any) -> BatchMixing:
        """From config keys mixup_alpha, cutmix_alpha, mix_prob, switch_prob and seed."""
        return cls(
            mixup_alpha=float(config.mixup_alpha),
            cutmix_alpha=float(config.cutmix_alpha),
            mix_prob=float(config.mix_prob),
            switch_prob=float(config.switch_prob),
            seed=int(config.seed),
        )

    def step_key(self, step: jax.Array) -> jax.Array:
        """The PRNG key of the mixing at optimizer step `step` (the same on every device)."""
        key = jax.random.fold_in(jax.random.key(self.seed), _MIXING_STREAM)
        return jax.random.fold_in(key, step)


def rolled_by_one(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """The global batch rolled by one row (torchvision's `batch.roll(1, 0)`), as this device's rows.

    Without `axis_name`, `x` is the whole batch. With it, `x` is this device's consecutive rows of a global
    batch split in device order over `axis_name` (how shard_map and pmap split `P('data')` batches); row 0
    of each device then comes from the last row of the device before it.
    """
    if axis_name is None:
        return jnp.roll(x, 1, axis=0)
    num_devices = lax.axis_size(axis_name)
    previous_last = lax.ppermute(
        x[-1:], axis_name, [(d, (d + 1) % num_devices) for d in range(num_devices)]
    )
    return jnp.concatenate([previous_last, x[:-1]], axis=0)


def cutmix_box(
    key: jax.Array, lam: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
    """torchvision CutMix's box for a sampled `lam`: (mask (height, width) bool, True where pasted; the label
    weight 1 - pasted area / image area).

    The box is centred at a uniform pixel, with half-sides int(0.5 * sqrt(1 - lam) * side), clipped to the
    image: clipping makes the pasted area, hence the label weight, differ from the sampled lam.
    """
    key_y, key_x = jax.random.split(key)
    center_y = jax.random.randint(key_y, (), 0, height)
    center_x = jax.random.randint(key_x, (), 0, width)
    half = 0.5 * jnp.sqrt(1.0 - lam)
    half_h = jnp.floor(half * height).astype(jnp.int32)
    half_w = jnp.floor(half * width).astype(jnp.int32)
    y1, y2 = jnp.maximum(center_y - half_h, 0), jnp.minimum(center_y + half_h, height)
    x1, x2 = jnp.maximum(center_x - half_w, 0), jnp.minimum(center_x + half_w, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    mask = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    label_weight = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (height * width)
    return mask, label_weight


def _beta(key: jax.Array, alpha: float) -> jax.Array:
    return jax.random.beta(key, alpha, alpha) if alpha > 0 else jnp.float32(1.0)


def mix_images(
    key: jax.Array, images: jax.Array, mixing: BatchMixing, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """(mixed images, label weight) of one batch of images (B, H, W, C).

    mixed = w * x + (1 - w) * rolled_by_one(x), with w = lam (mixup) or w = 0 inside the CutMix box and 1
    outside; the label weight is what `mix_targets` gives the unrolled labels (1 when the batch is not
    mixed). `axis_name`: see `rolled_by_one`; the draws depend on `key` only: give every device the same.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        images = images.astype(jnp.float32)
    key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(key, 5)
    apply = jax.random.uniform(key_apply) < mixing.mix_prob
    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < mixing.switch_prob
    else:
        use_cutmix = jnp.asarray(mixing.cutmix_alpha > 0)
    lam_mixup = _beta(key_mixup, mixing.mixup_alpha).astype(jnp.float32)
    height, width = images.shape[1:3]
    box, lam_cutmix = cutmix_box(key_box, _beta(key_cutmix, mixing.cutmix_alpha), height, width)

    rolled = rolled_by_one(images, axis_name)
    mixed_up = (lam_mixup * images + (1.0 - lam_mixup) * rolled).astype(images.dtype)
    cut = jnp.where(box[None, :, :, None], rolled, images)
    mixed = jnp.where(apply, jnp.where(use_cutmix, cut, mixed_up), images)
    label_weight = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
    return mixed, label_weight


def mix_targets(
    targets: jax.Array, label_weight: jax.Array, axis_name: str | None = None
) -> jax.Array:
    """label_weight * targets + (1 - label_weight) * rolled_by_one(targets): targets (B, K), e.g. one-hot."""
    rolled = rolled_by_one(targets, axis_name)
    return (label_weight * targets + (1.0 - label_weight) * rolled).astype(targets.dtype)


def mix_batch(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    mixing: BatchMixing,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mixed images, mixed targets, label weight): `mix_images` and `mix_targets` of one batch."""
    mixed, label_weight = mix_images(key, images, mixing, axis_name)
    return mixed, mix_targets(targets, label_weight, axis_name), label_weight
