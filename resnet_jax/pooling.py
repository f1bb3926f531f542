"""Max-pooling for the ResNet stems: flax's `nn.max_pool`, and the same function with a gradient XLA:CPU runs fast.

Both take NHWC `x`, a square `window`, a `stride` and a symmetric `padding` (pixels of -inf on each side, as
torch's `max_pool2d` pads) and return the same values.

Why a second form: XLA differentiates `reduce_window(max)` by recording, in the forward pass, the argmax of every
window as four int32 index maps (one `iota` per dimension, each as large as the padded input) and scattering the
output gradient through them. On the CPU that bookkeeping costs more than the pooling itself (resnet18 at 32 px,
batch 32: about 5% of a train step in a profile; +8% images/s without it, benchmarks/README.md).
`max_pool_by_taps` computes the maximum over the window's shifted strided slices and, in the backward pass,
sends each output's gradient to the first tap (in row-major window order) that holds the maximum: the tie rule
of XLA's `select_and_scatter` and of torch's `max_pool2d`, so ties (common after a ReLU: zeros) get the same
gradient as with `nn.max_pool`. `default_max_pool` picks it on the CPU backend only; GPUs and TPUs keep XLA's.
A `custom_vjp` has no forward-mode derivative: for `jax.jvp`/`jax.jacfwd` through a model, build it with
`max_pool=flax_max_pool`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

MaxPool = Callable[[jax.Array, int, int, int], jax.Array]


def flax_max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """`nn.max_pool` with a square window and symmetric padding (reduce_window pads with -inf)."""
    return nn.max_pool(
        x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2
    )


def _output_size(size: int, window: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - window) // stride + 1


def _padded_taps(
    x: jax.Array, window: int, stride: int, padding: int
) -> tuple[jax.Array, list[tuple[int, int, jax.Array]]]:
    """x padded with -inf, and for each window tap (i, j) the input it reads at every output position."""
    _, height, width, _ = x.shape
    out_h = _output_size(height, window, stride, padding)
    out_w = _output_size(width, window, stride, padding)
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    x_padded = jnp.pad(x, pads, constant_values=-jnp.inf)
    taps = [
        (
            i,
            j,
            x_padded[
                :,
                i : i + stride * (out_h - 1) + 1 : stride,
                j : j + stride * (out_w - 1) + 1 : stride,
            ],
        )
        for i in range(window)
        for j in range(window)
    ]
    return x_padded, taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_by_taps(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """The same values as `flax_max_pool`, with the gradient described in the module docstring."""
    return _max_pool_fwd(x, window, stride, padding)[0]


def _max_pool_fwd(x, window, stride, padding):
    _, taps = _padded_taps(x, window, stride, padding)
    pooled = taps[0][2]
    for _, _, tap in taps[1:]:
        pooled = jnp.maximum(pooled, tap)
    return pooled, (x, pooled)


def _max_pool_bwd(window, stride, padding, residuals, grad_out):
    x, pooled = residuals
    x_padded, taps = _padded_taps(x, window, stride, padding)
    (_, padded_h, padded_w, _), (_, out_h, out_w, _) = x_padded.shape, pooled.shape
    zero = jnp.zeros((), grad_out.dtype)
    grad_padded = jnp.zeros(x_padded.shape, grad_out.dtype)
    routed = jnp.zeros(pooled.shape, bool)  # outputs whose gradient an earlier tap already took
    for i, j, tap in taps:
        takes = (tap == pooled) & ~routed
        routed = routed | takes
        # Spread this tap's share back onto the padded input: positions i + stride * k (rows), j + ... (cols).
        spread = (
            (0, 0, 0),
            (i, padded_h - i - stride * (out_h - 1) - 1, stride - 1),
            (j, padded_w - j - stride * (out_w - 1) - 1, stride - 1),
            (0, 0, 0),
        )
        grad_padded = grad_padded + lax.pad(jnp.where(takes, grad_out, zero), zero, spread)
    _, height, width, _ = x.shape
    return (grad_padded[:, padding : padding + height, padding : padding + width],)


max_pool_by_taps.defvjp(_max_pool_fwd, _max_pool_bwd)


def default_max_pool() -> MaxPool:
    """The max-pool a model should use on the default JAX backend: `max_pool_by_taps` on CPU, XLA's elsewhere."""
    return max_pool_by_taps if jax.default_backend() == "cpu" else flax_max_pool
