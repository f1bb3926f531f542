"""TrainState: everything a training step reads and writes, as one pytree of arrays.

Only arrays are leaves (no functions, no model), so Orbax saves and restores it directly and `jax.jit` /
`jax.pmap` take it as an argument. The model's `apply` and the optimizer live outside, passed to the step.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step: number of updates applied (int32 scalar); params, batch_stats: the model variables (float32);
    opt_state: the optimizer's state (float32); ema_params, ema_batch_stats: exponential moving averages of
    params and of the BN running statistics (evaluated together, as timm's ModelEmaV2 does: the live
    statistics belong to the live weights), or None when `config.ema_decay == 0`."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema_params: PyTree | None = None
    ema_batch_stats: PyTree | None = None

    @property
    def variables(self) -> dict[str, PyTree]:
        """The variables `model.apply` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict[str, PyTree]:
    """Fresh `{'params', 'batch_stats'}` for NHWC float inputs of `image_size` x `image_size` x 3."""
    images = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
    return dict(model.init(rng, images, train=False))


def create_train_state(
    variables: dict[str, PyTree], tx: optax.GradientTransformation, *, use_ema: bool
) -> TrainState:
    """A TrainState at step 0 around `variables`; jit it (with out_shardings) to build it on devices."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if use_ema else None,
    )
