"""The matmul forms of a conv (resnet_jax.im2col): the region form computes lax.conv's sums, skipping only zeros.

Tolerances: in float64 the forms agree with `lax.conv_general_dilated` to 1e-12 of the output's scale (the same
products summed in another order); in float32 to 1e-5 of scale, as tests/test_conv.py states for every form.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import conv_forms
from resnet_jax.im2col import (
    grouped_im2col_conv,
    im2col_conv,
    live_offsets,
    output_regions,
    output_size,
    region_im2col_conv,
    region_products,
)

CASES = [
    # (height, width, kernel, stride, ((top, bottom), (left, right)))
    (2, 2, 3, 1, ((1, 1), (1, 1))),  # resnet18's last 3x3 stage at 32 px: four one-position regions
    (4, 4, 3, 1, ((1, 1), (1, 1))),  # corners, edges and interior
    (4, 4, 3, 2, ((1, 1), (1, 1))),  # strided: 4x4 -> 2x2
    (2, 2, 3, 2, ((1, 1), (1, 1))),  # 2x2 -> 1x1, one region
    (1, 1, 3, 1, ((1, 1), (1, 1))),  # the centre tap only
    (5, 3, 3, 2, ((1, 1), (1, 1))),  # odd, non-square
    (3, 4, 3, 1, ((2, 0), (0, 2))),  # asymmetric padding
    (2, 3, 3, 3, ((3, 3), (1, 1))),  # padding wider than the kernel: outputs that read nothing
    (9, 9, 7, 2, ((3, 3), (3, 3))),  # a stem
    (6, 6, 3, 1, ((0, 0), (0, 0))),  # no padding: one region, im2col itself
    (4, 4, 1, 2, ((0, 0), (0, 0))),  # a 1x1 projection
    # Every output reads only padding: zeros from both forms (im2col has no tap to take).
    (1, 1, 1, 2, ((1, 1), (1, 1))),
]


def assert_close_to_scale(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale + 1e-12)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def output_and_grads(conv, x, kernel, strides, padding):
    """The conv's output and the gradients w.r.t. input and kernel of a loss weighting each output apart.

    Jitted: one compile per case costs less than dispatching the backward op by op.
    """

    def loss(x, kernel):
        y = conv(x, kernel, strides, padding)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

    return (conv(x, kernel, strides, padding), *jax.grad(loss, argnums=(0, 1))(x, kernel))


@pytest.mark.parametrize("form", [region_im2col_conv, im2col_conv], ids=["region", "im2col"])
@pytest.mark.parametrize("height,width,kernel_size,stride,padding", CASES)
@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_matmul_forms_outputs_and_grads_equal_lax_conv(
    form, height, width, kernel_size, stride, padding, dtype, rtol
):
    with jax.enable_x64(dtype == jnp.float64):
        x = jax.random.normal(jax.random.key(0), (3, height, width, 5), dtype)
        kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 5, 4), dtype)
        strides = (stride, stride)
        expected = output_and_grads(conv_forms.lax_conv, x, kernel, strides, padding)
        actual = output_and_grads(form, x, kernel, strides, padding)
        for a, e in zip(actual, expected, strict=True):
            assert a.dtype == e.dtype
            assert_close_to_scale(a, e, rtol)


@pytest.mark.parametrize("height,width,kernel_size,stride,padding", CASES)
def test_grouped_im2col_form_outputs_and_grads_equal_lax_grouped_conv(
    height, width, kernel_size, stride, padding
):
    # float64, 3 groups of 4 input and 2 output channels: the same sums as lax.conv's in another order.
    # (float32, bf16 and the form's choice inside CpuConv: tests/test_conv.py.)
    groups, dtype, rtol = 3, jnp.float64, 1e-12
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (3, height, width, 4 * groups), dtype)
        kernel = jax.random.normal(
            jax.random.key(1), (kernel_size, kernel_size, 4, 2 * groups), dtype
        )
        strides = (stride, stride)
        lax_grouped = functools.partial(conv_forms.lax_conv, feature_group_count=groups)
        grouped = functools.partial(grouped_im2col_conv, groups=groups)
        expected = output_and_grads(lax_grouped, x, kernel, strides, padding)
        actual = output_and_grads(grouped, x, kernel, strides, padding)
        for a, e in zip(actual, expected, strict=True):
            assert a.dtype == e.dtype
            assert_close_to_scale(a, e, rtol)


def test_region_im2col_with_non_square_kernels_and_strides_batch_1_and_bfloat16():
    padding = ((2, 1), (0, 2))
    x = jax.random.normal(jax.random.key(0), (1, 5, 3, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 2, 4, 6))
    with jax.enable_x64():
        x64, k64 = x.astype(jnp.float64), kernel.astype(jnp.float64)
        expected = output_and_grads(conv_forms.lax_conv, x64, k64, (2, 1), padding)
        actual = output_and_grads(region_im2col_conv, x64, k64, (2, 1), padding)
        for a, e in zip(actual, expected, strict=True):
            assert_close_to_scale(a, e, 1e-12)
    # bfloat16 in, bfloat16 out, within bfloat16 rounding (8 bits of mantissa) of lax's float32 result.
    y = region_im2col_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (2, 1), padding)
    assert y.dtype == jnp.bfloat16
    reference = conv_forms.lax_conv(
        x.astype(jnp.bfloat16).astype(jnp.float32),
        kernel.astype(jnp.bfloat16).astype(jnp.float32),
        (2, 1),
        padding,
    )
    assert_close_to_scale(y.astype(jnp.float32), reference, 2e-2)


def real_products(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    """(output position, kernel offset) pairs along one axis that read a real input: counted one by one."""
    return sum(
        0 <= position * stride - pad[0] + offset < size
        for position in range(output_size(size, kernel, stride, pad))
        for offset in range(kernel)
    )


def test_region_form_multiplies_exactly_the_real_inputs_and_im2col_its_live_taps():
    for size, kernel, stride, before, after in itertools.product(
        range(1, 9), (1, 3, 5, 7), (1, 2, 3), range(4), range(4)
    ):
        pad = (before, after)
        if output_size(size, kernel, stride, pad) < 1:
            continue
        runs = output_regions(size, kernel, stride, pad)
        # The runs tile the output positions in order; each position's offsets are exactly the ones that
        # read real input; neighbouring runs differ (as few matmuls as the map allows).
        assert [start for start, *_ in runs] == [0] + [stop for _, stop, *_ in runs[:-1]]
        assert runs[-1][1] == output_size(size, kernel, stride, pad)
        for start, stop, first, end in runs:
            for position in range(start, stop):
                real = [k for k in range(kernel) if 0 <= position * stride - pad[0] + k < size]
                assert list(range(first, end)) == real, (size, kernel, stride, pad, position)
        assert all(a[2:] != b[2:] for a, b in itertools.pairwise(runs))
        region, dense = region_products((size, 1), (kernel, 1), (stride, 1), (pad, (0, 0)))
        assert region == real_products(size, kernel, stride, pad)
        out = output_size(size, kernel, stride, pad)
        assert dense == out * len(live_offsets(size, kernel, stride, pad))
    # The figures the docstrings quote: 3x3, padding 1, stride 1.
    assert region_products((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1))) == (16, 36)
    assert region_products((4, 4), (3, 3), (1, 1), ((1, 1), (1, 1))) == (100, 144)
    assert region_products((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1))) == (484, 576)


def test_region_form_ignores_weights_that_meet_only_padding():
    # Over a 2x2 map the corner output (0, 0) reads taps (1..2, 1..2) only. Changing the other taps'
    # weights must leave it exactly unchanged (they meet zeros), as with lax.conv.
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    other = kernel.at[0, :].set(7.0).at[:, 0].set(-7.0)
    padding = ((1, 1), (1, 1))
    y, y_other = (region_im2col_conv(x, k, (1, 1), padding) for k in (kernel, other))
    np.testing.assert_array_equal(y[:, 0, 0], y_other[:, 0, 0])
    assert not np.array_equal(y[:, 1, 1], y_other[:, 1, 1])


def test_region_form_is_timed_and_chosen_without_timing_only_where_it_halves_the_products():
    padding = ((1, 1), (1, 1))
    kernel = (3, 3, 64, 64)
    tiny, small, mid = (8, 2, 2, 64), (8, 4, 4, 64), (8, 8, 8, 64)
    for x_shape, timed in [(tiny, True), (small, False), (mid, False)]:
        candidates = conv_forms.candidate_forms(kernel, (1, 1), padding, x_shape=x_shape)
        assert ("region_im2col" in candidates) == timed, x_shape
    # Without the input's shape the saving is unknown: not a candidate.
    assert "region_im2col" not in conv_forms.candidate_forms(kernel, (1, 1), padding)
    assert conv_forms.static_form(tiny, kernel, (1, 1), padding) == "region_im2col"
    assert conv_forms.static_form(small, kernel, (1, 1), padding) == "im2col"
    # Outputs that all read only padding: the region form (zeros; both forms return them).
    strided_past = ((1, 1, 1, 2), (1, 1, 2, 2), (2, 2), padding)
    assert conv_forms.static_form(*strided_past) == "region_im2col"


def test_im2col_and_region_form_agree_where_there_is_no_padding_to_skip():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    padding = ((0, 0), (0, 0))
    np.testing.assert_array_equal(
        region_im2col_conv(x, kernel, (1, 1), padding), im2col_conv(x, kernel, (1, 1), padding)
    )
