"""Winograd F(2x2, 3x3) and F(4x4, 3x3) compute what lax.conv computes: outputs and both gradients.

Tolerance, relative to the largest magnitude of the reference (|a - b| <= rtol * max|b|): the transforms add
and subtract scaled copies of the inputs before rounding, so F(2x2) (coefficients 1 and 1/2) is within 2e-6
and F(4x4) (coefficients up to 8 and down to 1/24) within 2e-5 on normal random data. Measured here: up to
3e-7 and 3e-6; lax.conv itself is within 3e-6 of a float64 conv (../shared/notes/cpu-conv.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import winograd
from resnet_jax.conv import FORMS, conv_with_winograd_kernel_grad, form_supports, lax_conv

RTOL = {2: 2e-6, 4: 2e-5}


def assert_close_to_scale(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=rtol * float(np.max(np.abs(expected)))
    )


def outputs_and_grads(conv, x, kernel):
    """The output and the gradients w.r.t. input and kernel of a loss weighting every output differently."""
    weights = jax.random.normal(jax.random.key(7), jax.eval_shape(conv, x, kernel).shape)

    @jax.jit
    def run(x, kernel):
        grads = jax.grad(lambda x, k: jnp.sum(conv(x, k) * weights), argnums=(0, 1))(x, kernel)
        return conv(x, kernel), *grads

    return run(x, kernel)


CASES = [
    # (height, width, in, out, padding, groups)
    (9, 7, 4, 6, ((1, 1), (1, 1)), 1),  # odd, non-square: the last tiles are partly cropped
    (5, 6, 4, 4, ((0, 2), (1, 0)), 1),  # asymmetric padding
    (3, 3, 8, 8, ((0, 0), (0, 0)), 1),  # no padding: one output
    (6, 6, 4, 6, ((2, 2), (2, 2)), 1),  # padding wider than needed: the output grows
    (7, 5, 8, 8, ((1, 1), (1, 1)), 4),  # grouped (ResNeXt)
]


@pytest.mark.parametrize("tile", winograd.TILE_SIZES)
@pytest.mark.parametrize("height,width,cin,cout,padding,groups", CASES)
def test_winograd_outputs_and_grads_equal_lax_conv(tile, height, width, cin, cout, padding, groups):
    x = jax.random.normal(jax.random.key(0), (2, height, width, cin))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, cin // groups, cout))
    expected = outputs_and_grads(lambda x, k: lax_conv(x, k, (1, 1), padding, groups), x, kernel)
    actual = outputs_and_grads(
        lambda x, k: winograd.winograd_conv(x, k, padding, tile, groups), x, kernel
    )
    for a, e in zip(actual, expected, strict=True):
        assert_close_to_scale(a, e, RTOL[tile])


@pytest.mark.parametrize("parts", [1, 3, 16])
def test_winograd_split_into_any_number_of_product_parts_equals_lax_conv(parts, monkeypatch):
    """The tile positions' groups (`PRODUCT_PARTS`) only reorder the sums: one group, uneven groups, one
    position per group (F(2x2) has 16), grouped channels too."""
    monkeypatch.setattr(winograd, "PRODUCT_PARTS", parts)
    padding = ((1, 1), (0, 2))
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 8))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    expected = outputs_and_grads(lambda x, k: lax_conv(x, k, (1, 1), padding, 2), x, kernel)
    for tile in winograd.TILE_SIZES:
        actual = outputs_and_grads(
            lambda x, k, tile=tile: winograd.winograd_conv(x, k, padding, tile, 2), x, kernel
        )
        for a, e in zip(actual, expected, strict=True):
            assert_close_to_scale(a, e, RTOL[tile])


@pytest.mark.parametrize("tile", winograd.TILE_SIZES)
def test_lax_forward_with_winograd_kernel_grad_equals_lax_conv(tile):
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    padding = ((1, 1), (1, 1))
    expected = outputs_and_grads(lambda x, k: lax_conv(x, k, (1, 1), padding), x, kernel)
    actual = outputs_and_grads(
        lambda x, k: conv_with_winograd_kernel_grad(x, k, (1, 1), padding, tile=tile), x, kernel
    )
    for a, e in zip(actual, expected, strict=True):
        assert_close_to_scale(a, e, RTOL[tile])


def test_winograd_takes_only_3x3_stride1_explicit_padding_in_float32():
    padding = ((1, 1), (1, 1))
    assert winograd.supports((3, 3, 4, 4), (1, 1), padding)
    assert not winograd.supports((3, 3, 4, 4), (2, 2), padding)
    assert not winograd.supports((5, 5, 4, 4), (1, 1), ((2, 2), (2, 2)))
    assert not winograd.supports((3, 3, 4, 4), (1, 1), "SAME")
    assert form_supports("winograd4", (3, 3, 4, 4), (1, 1), padding, 1, jnp.float32)
    assert not form_supports("winograd4", (3, 3, 4, 4), (1, 1), padding, 1, jnp.bfloat16)
    with pytest.raises(ValueError, match="3x3 kernel, stride 1"):
        winograd.winograd_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 1, 2, 2)), padding)


def test_every_form_agrees_with_lax_where_it_applies():
    """The autotuner may pick any form: each one that claims a conv computes it."""
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
    for kernel_size, stride, pad in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)]:
        kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 6))
        strides, padding = (stride, stride), ((pad, pad), (pad, pad))
        expected = lax_conv(x, kernel, strides, padding)
        for name, form in FORMS.items():
            if form_supports(name, kernel.shape, strides, padding, 1):
                # Jitted: one compile costs less than dispatching the many small ops of some forms.
                actual = jax.jit(form, static_argnums=(2, 3))(x, kernel, strides, padding)
                assert_close_to_scale(actual, expected, RTOL[4])
