"""`max_pool_by_taps` (the CPU stem's max-pool) against flax's `nn.max_pool`: values and gradients, ties included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.models import create_model
from resnet_jax.pooling import default_max_pool, flax_max_pool, max_pool_by_taps


@pytest.mark.parametrize(
    "shape, window, stride, padding",
    [
        ((2, 9, 9, 3), 3, 2, 1),  # the stems' pool, odd map
        ((2, 8, 10, 4), 3, 2, 1),  # even, non-square
        ((1, 7, 7, 2), 3, 2, 0),  # BiT's pool after its zero padding
        ((1, 6, 6, 2), 2, 2, 0),  # non-overlapping windows
        ((1, 5, 5, 1), 3, 1, 1),  # stride 1: every input in up to 9 windows
    ],
)
def test_values_and_gradients_equal_flax(shape, window, stride, padding):
    rng = np.random.default_rng(0)
    # After a ReLU about half the inputs are 0: many windows tie, and the tie rule decides the gradient.
    x = jnp.maximum(jnp.asarray(rng.standard_normal(shape), jnp.float32), 0.0)
    x = (
        x.at[0, 1, 1, 0].set(x[0, 1, 2, 0] + 1.0).at[0, 1, 2, 0].add(1.0)
    )  # a tie between positive values

    def ours(x):
        return max_pool_by_taps(x, window, stride, padding)

    def reference(x):
        return flax_max_pool(x, window, stride, padding)

    expected, reference_vjp = jax.vjp(reference, x)
    got, ours_vjp = jax.vjp(ours, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    grad_out = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    # Overlapping windows add up in another order: float32 rounding only.
    np.testing.assert_allclose(ours_vjp(grad_out)[0], reference_vjp(grad_out)[0], rtol=0, atol=1e-6)


def test_constant_input_routes_each_gradient_once():
    """Every tap ties: each output's gradient goes to exactly one input (the first in window order)."""
    x = jnp.zeros((1, 5, 5, 1))
    grad_out = jnp.ones((1, 3, 3, 1))
    ours = jax.vjp(lambda x: max_pool_by_taps(x, 3, 2, 1), x)[1](grad_out)[0]
    reference = jax.vjp(lambda x: flax_max_pool(x, 3, 2, 1), x)[1](grad_out)[0]
    assert float(jnp.sum(ours)) == 9.0
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_create_model_uses_the_taps_form_on_cpu_only():
    expected = max_pool_by_taps if jax.default_backend() == "cpu" else flax_max_pool
    assert default_max_pool() is expected
    for name in ("resnet50", "resnet50d", "resnetv2_50", "resnetv2_50x1_bit"):
        assert create_model(name).max_pool is expected
    assert create_model("resnet18", max_pool=flax_max_pool).max_pool is flax_max_pool
