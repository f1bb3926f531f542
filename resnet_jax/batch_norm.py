"""BatchNorm for the ResNets: flax's `nn.BatchNorm`, and the same layer with a backward pass XLA:CPU runs faster.

`BatchNorm` here has `nn.BatchNorm`'s variables (params `scale`, `bias`; batch_stats `mean`, `var`), its forward
values (E[x^2] - E[x]^2 variance, flax's momentum convention, statistics and normalization in float32) and its
gradients; checkpoints and conversion cannot tell which of the two ran. `default_batch_norm` picks it on the CPU
backend only; GPUs and TPUs keep flax's.

Why a second form: differentiating flax's normalization leaves XLA a chain of small reductions and element-wise
passes over the activation (the gradient through the mean, through the variance, through x - mean), which
XLA:CPU fuses into more passes than needed. The training-mode backward is known in closed form:

    dx = scale * inv * (dy - S1 / M - xhat * S2 / M),   S1 = sum(dy),  S2 = sum(dy * xhat),  xhat = (x - mean) * inv

over the M values of each channel: one reduction pass for both sums and one element-wise pass, written in terms
of x itself so that no centered copy x - mean is ever stored. `jax.custom_vjp` gives XLA exactly that (resnet50
at 128 px, batch 16: +3% images/s, and +8% more without the centered copy; benchmarks/README.md). With `axis_name`
(sync BN), the statistics are averaged over the devices in the forward pass and the two sums are summed over
them in the backward pass, which is what autodiff of the averaged statistics gives; on a one-device axis both
collectives are skipped (XLA:CPU runs them as real all-reduces).

A `custom_vjp` has no forward-mode derivative: for `jax.jvp`/`jax.jacfwd` through a model in training mode (e.g.
Hessian-vector products) build it with `batch_norm=nn.BatchNorm`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from resnet_jax.parallel import device_mean, device_sum

Initializer = Callable[..., jax.Array]


def _batch_moments(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and (biased) variance over every axis but the last, across devices on `axis_name`."""
    axes = tuple(range(x.ndim - 1))
    mean, mean_of_squares = device_mean(
        (jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)), axis_name
    )
    # flax's fast variance, E[x^2] - E[x]^2 clipped at 0: the same statistics as nn.BatchNorm.
    return mean, jnp.maximum(0.0, mean_of_squares - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_batch(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalization of float32 NHWC (or any channels-last) `x`.

    Returns (y, mean, var): the normalized output and the batch statistics it used (for the running averages).
    """
    y, mean, var, _ = _normalize_forward(x, scale, bias, epsilon, axis_name)
    return y, mean, var


def _normalize_forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    mean, var = _batch_moments(x, axis_name)
    inv = lax.rsqrt(var + epsilon)
    return (x - mean) * (inv * scale) + bias, mean, var, inv


def _normalize_fwd(x, scale, bias, epsilon, axis_name):
    y, mean, var, inv = _normalize_forward(x, scale, bias, epsilon, axis_name)
    return (y, mean, var), (x, mean, inv, scale)


def _normalize_bwd(epsilon, axis_name, residuals, cotangents):
    del epsilon  # inv already holds it
    x, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    # Written without the centered activation x - mean: XLA:CPU would store it as one more full-size array,
    # since both sums and dx read it (resnet50 at 128 px: +8% images/s without it, benchmarks/README.md).
    # sum(dy * (x - mean)) = sum(dy * x) - mean * sum(dy), and dx's centered term likewise folds mean into its
    # constant. That cancels like the forward's E[x^2] - E[x]^2 variance (flax's, matched here), which
    # dominates: against float64, dx's error was the same with either backward for channel means 0-1000
    # times their std (tests/test_batch_norm.py compares with flax at means up to ~40 std).
    sum_dy = jnp.sum(dy, axes)
    sum_dy_centered = jnp.sum(dy * x, axes) - mean * sum_dy
    # This device's sums are its parameter gradients (the train step averages those over devices, as for
    # every parameter); the input gradient needs them over every device.
    # dmean, dvar: the statistics' own cotangents (zero unless a caller differentiates through them).
    total_dy, total_dy_centered, dmean, dvar = device_sum(
        (sum_dy, sum_dy_centered, dmean, dvar), axis_name
    )
    count = x.size // x.shape[-1] * (1 if axis_name is None else lax.axis_size(axis_name))
    dx_dy = scale * inv  # dy's coefficient in dx
    # dx = dx_dy * (dy - S1/M - xhat * S2/M) + dmean/M + dvar * 2 (x - mean)/M, with S2 = inv * sum(dy * centered):
    # one element-wise pass dx = dx_dy * dy + dx_x * x + dx_const, per-channel coefficients.
    dx_x = (2.0 * dvar - dx_dy * inv * inv * total_dy_centered) / count
    dx_const = (dmean - dx_dy * total_dy) / count - dx_x * mean
    dx = dx_dy * dy + dx_x * x + dx_const
    return dx, inv * sum_dy_centered, sum_dy


normalize_batch.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis (same variables, values and gradients) with `normalize_batch`'s backward.

    Fields as nn.BatchNorm's; `use_running_average` may also be passed at call time. Statistics and the
    normalization are computed in float32; the output is cast to `dtype` (float32 when None).
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        features = x.shape[-1]
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
        x = x.astype(jnp.float32)
        if use_running_average:
            # No custom gradient here: frozen statistics make this an affine map autodiff handles well.
            inv = lax.rsqrt(running_var.value + self.epsilon)
            y = (x - running_mean.value) * (inv * scale) + bias
        else:
            y, mean, var = normalize_batch(x, scale, bias, self.epsilon, self.axis_name)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y.astype(self.dtype or jnp.float32)


def default_batch_norm() -> type[nn.Module]:
    """`BatchNorm` (the closed-form backward) on the CPU backend, flax's `nn.BatchNorm` on GPUs and TPUs."""
    return BatchNorm if jax.default_backend() == "cpu" else nn.BatchNorm
