"""CpuConv computes what nn.Conv computes: same parameters, outputs and gradients to float32 rounding.

Tolerance: the forms sum the same products in a different order, so results differ by float32 rounding only.
We compare with rtol=1e-5 relative to the largest magnitude of the reference (an elementwise relative test
would fail on outputs that cancel to near zero), i.e. |a - b| <= 1e-5 * max|b| + 1e-6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resnet_jax.conv import CpuConv, cpu_conv, default_conv, im2col_conv, lax_conv
from resnet_jax.models import create_model

RTOL = 1e-5


def assert_close_to_scale(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale + 1e-6)


def outputs_and_grads(module: nn.Module, variables, x):
    """The output, and the gradients w.r.t. kernel and input of a loss that weights every output differently.

    Jitted as a whole: one compile per case is much cheaper than op-by-op dispatch of the backward pass.
    """
    weights = jax.random.normal(jax.random.key(7), jax.eval_shape(module.apply, variables, x).shape)

    @jax.jit
    def run(variables, x):
        def loss(variables, x):
            return jnp.sum(module.apply(variables, x) * weights)

        grad_variables, grad_x = jax.grad(loss, argnums=(0, 1))(variables, x)
        return module.apply(variables, x), grad_variables["params"], grad_x

    return run(variables, x)


CASES = [
    # (height, width, in, out, kernel, stride, padding, groups)
    (8, 8, 4, 6, 3, 1, 1, 1),
    (8, 8, 4, 6, 3, 2, 1, 1),
    (9, 7, 4, 6, 3, 2, 1, 1),  # odd, non-square: strided taps that end early
    (8, 8, 4, 6, 1, 1, 0, 1),
    (8, 8, 4, 6, 1, 2, 0, 1),  # the downsample projection
    (16, 16, 3, 8, 7, 2, 3, 1),  # the ImageNet stem
    (4, 4, 8, 8, 3, 1, 1, 1),
    (4, 4, 8, 8, 3, 2, 1, 1),  # 4x4 -> 2x2: im2col with dead taps
    (2, 2, 8, 8, 3, 1, 1, 1),  # 2x2: every tap reads real input for some output
    (1, 1, 8, 8, 3, 1, 1, 1),  # 1x1 map: only the centre tap reads real input
    (2, 2, 8, 8, 3, 2, 1, 1),  # 2x2 -> 1x1
    (3, 3, 8, 8, 3, 1, 0, 1),  # no padding
    (6, 6, 4, 6, 3, 1, 2, 1),  # padding wider than needed: output grows
    (1, 1, 4, 6, 3, 2, 2, 1),  # stride above the input size: live taps 0 and 2, not the middle one
    (16, 16, 8, 8, 3, 1, 1, 1),  # 16x16: lax forward, per-tap kernel gradient
    (32, 32, 8, 16, 3, 2, 1, 1),  # 32x32 -> 16x16, the same
    (32, 32, 8, 8, 3, 1, 1, 1),  # large map: plain lax.conv
    (8, 8, 8, 8, 3, 1, 1, 4),  # grouped (ResNeXt): Winograd
    (2, 2, 8, 8, 3, 1, 1, 2),  # grouped, 2x2 map: a patch matrix per group
    (9, 7, 8, 12, 3, 2, 1, 4),  # grouped, strided, odd
    (6, 6, 8, 8, 3, 1, 1, 8),  # depthwise
    (4, 4, 8, 8, 1, 1, 0, 2),  # grouped 1x1
]


@pytest.mark.parametrize("height,width,cin,cout,kernel,stride,padding,groups", CASES)
def test_cpu_conv_outputs_and_grads_equal_nn_conv(
    height, width, cin, cout, kernel, stride, padding, groups
):
    x = jax.random.normal(jax.random.key(0), (2, height, width, cin))
    args = dict(
        features=cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=False,
    )
    reference, ours = nn.Conv(**args), CpuConv(**args)
    variables = reference.init(jax.random.key(1), x)
    ours_variables = ours.init(jax.random.key(1), x)
    # Same parameter tree, shapes and values from the same RNG: checkpoints do not care which module ran.
    assert jax.tree.structure(variables) == jax.tree.structure(ours_variables)
    np.testing.assert_array_equal(variables["params"]["kernel"], ours_variables["params"]["kernel"])

    expected = outputs_and_grads(reference, variables, x)
    actual = outputs_and_grads(ours, variables, x)
    for a, e in zip(actual, expected, strict=True):
        jax.tree.map(assert_close_to_scale, a, e)


def test_im2col_skips_taps_that_read_only_padding():
    # A 3x3 conv over a 1x1 map reads real input only at the centre tap: the other 8 taps' weights must not
    # matter, and the kernel gradient of those taps is exactly zero (as lax.conv's is).
    x = jax.random.normal(jax.random.key(0), (2, 1, 1, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    centre_only = jnp.zeros_like(kernel).at[1, 1].set(kernel[1, 1])
    pad = ((1, 1), (1, 1))
    np.testing.assert_array_equal(
        im2col_conv(x, kernel, (1, 1), pad), im2col_conv(x, centre_only, (1, 1), pad)
    )
    grad = jax.grad(lambda k: jnp.sum(im2col_conv(x, k, (1, 1), pad) ** 2))(kernel)
    assert float(jnp.abs(grad[1, 1]).sum()) > 0
    np.testing.assert_array_equal(grad.at[1, 1].set(0.0), jnp.zeros_like(grad))


@pytest.mark.parametrize("groups,stride", [(1, 1), (4, 1), (4, 2)])
def test_bfloat16_compute_matches_nn_conv_to_bf16_rounding(groups, stride):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    args = dict(
        features=16,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        feature_group_count=groups,
        use_bias=False,
        dtype=jnp.bfloat16,
    )
    variables = nn.Conv(**args).init(jax.random.key(1), x)
    expected = nn.Conv(**args).apply(variables, x)
    actual = CpuConv(**args).apply(variables, x)
    assert actual.dtype == expected.dtype == jnp.bfloat16
    # bf16 has 8 bits of mantissa: 2^-8 of the scale, doubled for the different summation order.
    assert_close_to_scale(actual.astype(jnp.float32), expected.astype(jnp.float32), rtol=2**-7)


def test_string_padding_and_bias_follow_nn_conv():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
    for padding in ("SAME", "VALID"):
        args = dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=padding)
        variables = nn.Conv(**args).init(jax.random.key(1), x)
        assert set(variables["params"]) == {"kernel", "bias"}
        assert_close_to_scale(
            CpuConv(**args).apply(variables, x), nn.Conv(**args).apply(variables, x)
        )


@pytest.mark.parametrize(
    "args",
    [
        dict(kernel_size=(3, 3), padding=1),
        dict(kernel_size=(3, 3), padding=[1, (0, 2)]),
        dict(kernel_size=(3, 3), strides=2, padding="same_lower"),
        dict(kernel_size=(3, 3), strides=None, padding="VALID"),
        dict(kernel_size=(3, 3), padding="CIRCULAR"),
        dict(kernel_size=(4, 3), strides=2, padding="REFLECT"),
        dict(kernel_size=(3, 3), padding=((-1, 1), (1, -1))),  # negative padding crops
        dict(kernel_size=(1, 1), padding=((0, -1), (-1, 0))),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "x_shape,form",
    [
        ((2, 7, 6, 4), "static"),
        ((7, 6, 4), "im2col"),  # unbatched
        ((2, 3, 7, 6, 4), "tap_grad"),  # two batch dims
    ],
    ids=str,
)
def test_nn_conv_argument_conventions_and_batch_dims_give_nn_conv_results(args, x_shape, form):
    """nn.Conv's spellings (int strides and paddings, per-dimension ints or pairs, string modes in any case,
    negative padding) and its input ranks (unbatched, extra batch dims) build and compute the same conv in
    CpuConv, with any form asked for (a form that cannot compute it defers to lax.conv)."""
    x = jax.random.normal(jax.random.key(0), x_shape)
    variables = nn.Conv(5, **args).init(jax.random.key(1), x)
    ours = CpuConv(5, **args, form=form)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables
    )
    expected = outputs_and_grads(nn.Conv(5, **args), variables, x)
    actual = outputs_and_grads(ours, variables, x)
    for a, e in zip(actual, expected, strict=True):
        jax.tree.map(assert_close_to_scale, a, e)


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(kernel_size=3), "1-D conv"),  # flax reads an int kernel_size as (3,), not (3, 3)
        (dict(kernel_size=(3,)), "1-D conv"),
        (dict(kernel_size=(3, 3, 3)), "2-D convs"),
        (dict(kernel_size=(3, 3), padding="CAUSAL"), "padding 'CAUSAL'"),
        (dict(kernel_size=(3, 3), padding=(1, 1, 1)), "two entries"),
        (dict(kernel_size=(3, 3), strides=(1, 1, 1)), "strides"),
        (dict(kernel_size=(3, 3), feature_group_count=4), "features 6 not divisible"),
    ],
)
def test_what_nn_conv_reads_otherwise_is_refused_not_reinterpreted(args, message):
    with pytest.raises(ValueError, match=message):
        CpuConv(6, **args).init(jax.random.key(0), jnp.ones((1, 6, 6, 8)))


@pytest.mark.parametrize("form", ["region_im2col", "tap_grad", "lax_winograd4_grad"])
def test_hessian_vector_products_go_through_the_custom_gradient_forms(form):
    # jax.jvp of jax.grad: the forward-mode pass runs over each form's backward rule.
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 8))
    args = dict(features=8, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    variables = nn.Conv(**args).init(jax.random.key(1), x)

    def hvp(module):
        grad = jax.grad(lambda v: jnp.sum(jnp.sin(module.apply(v, x))))
        return jax.jvp(grad, (variables,), (variables,))[1]["params"]["kernel"]

    assert_close_to_scale(hvp(CpuConv(**args, form=form)), hvp(nn.Conv(**args)))


def test_cpu_conv_function_agrees_with_lax_conv_under_jit():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    pad = ((1, 1), (1, 1))
    jitted = jax.jit(functools.partial(cpu_conv, strides=(2, 2), padding=pad))
    assert_close_to_scale(jitted(x, kernel), lax_conv(x, kernel, (2, 2), pad))


@pytest.mark.parametrize(
    "form", ["auto", "static", "im2col", "region_im2col", "winograd4", "s2d_im2col"]
)
@pytest.mark.parametrize(
    "x_shape,padding",
    [
        ((2, 2, 2, 4), ((0, 0), (0, 0))),  # the kernel is larger than the map: no output position
        ((2, 1, 6, 4), ((0, 0), (1, 1))),  # no output row
        ((0, 6, 6, 4), ((1, 1), (1, 1))),  # an empty batch
    ],
)
def test_empty_outputs_are_empty_like_nn_conv(form, x_shape, padding):
    """Where nn.Conv returns an empty map, so does CpuConv, whichever form is asked for (a matmul form has
    no patch to build there), and its gradients are the zeros of the inputs' shapes."""
    args = dict(features=8, kernel_size=(3, 3), strides=(1, 1), padding=padding)
    x = jnp.ones(x_shape)
    variables = nn.Conv(**args).init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))
    expected = nn.Conv(**args).apply(variables, x)
    assert 0 in expected.shape
    conv = CpuConv(**args, form=form)
    assert conv.apply(variables, x).shape == expected.shape
    grads = jax.grad(lambda v, x: conv.apply(v, x).sum(), argnums=(0, 1))(variables, x)
    assert grads[1].shape == x.shape and not np.any(grads[1])
    assert not np.any(grads[0]["params"]["kernel"])


def test_default_conv_is_cpu_conv_on_cpu():
    assert jax.default_backend() == "cpu"
    assert default_conv() is CpuConv


def _resnet18_logits_and_grads(conv, dtype, variables, images, labels):
    """Logits and parameter gradients of resnet18's cross-entropy in train mode, computed in `dtype`."""
    # GELU, not ReLU: with ReLU, a pre-activation within rounding of zero takes the other branch in one of
    # the two computations and moves a gradient by percent (seen in 1 of 10 seeds at batch 4). A smooth
    # activation leaves rounding as the only difference, which is what this test measures.
    model = create_model("resnet18", num_classes=10, conv=conv, dtype=dtype, act=nn.gelu)
    variables = jax.tree.map(lambda v: v.astype(dtype), variables)

    def loss_fn(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images.astype(dtype),
            train=True,
            mutable=["batch_stats"],
        )
        one_hot = jax.nn.one_hot(labels, 10)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * one_hot, axis=-1)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    return jax.tree.map(lambda a: np.asarray(a, np.float64), (logits, grads))


def _error_to_scale(actual, expected) -> float:
    """The largest |actual - expected| / max|expected| over the leaves of two trees."""
    errors = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b))), actual, expected
    )
    return max(jax.tree.leaves(errors))


def test_resnet18_logits_and_grads_equal_with_either_conv():
    """A whole resnet18 at 32x32 (every conv form: stem, 8x8 maps, 2x2 and 1x1 maps, projections).

    In float64 both convs give the same logits and gradients to 1e-9 of each leaf's largest magnitude: the
    forms compute the same function. In float32 a fixed tolerance would be the wrong test: BatchNorm over
    batch 4 at 2x2 and 1x1 maps divides by small variances, and nn.Conv's own float32 gradients were up to
    5.7e-4 of scale away from float64 (10 seeds, AMD EPYC Zen 4). So CpuConv's float32 error, measured against
    float64, must stay within 5x nn.Conv's (measured 0.4-2.6x over those seeds; a broken form is off by
    O(1), a matmul in reduced precision by ~1e-2).
    """
    seed = 0
    images = jax.random.normal(jax.random.key(seed), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10
    # lazy_init: the variables only, bit for bit what init gives, without running the forward pass op by op
    # (eager nn.Conv at every resnet18 layer shape is seconds of compiling single ops).
    input_shape = jax.ShapeDtypeStruct(images.shape, images.dtype)
    variables = create_model("resnet18", num_classes=10, conv=nn.Conv).lazy_init(
        jax.random.key(seed + 1), input_shape
    )
    ours_variables = create_model("resnet18", num_classes=10, conv=CpuConv).lazy_init(
        jax.random.key(seed + 1), input_shape
    )
    jax.tree.map(np.testing.assert_array_equal, variables, ours_variables)

    args = (variables, images, labels)
    with jax.enable_x64(True):
        exact = _resnet18_logits_and_grads(nn.Conv, jnp.float64, *args)
        ours_exact = _resnet18_logits_and_grads(CpuConv, jnp.float64, *args)
    float64_error = _error_to_scale(ours_exact, exact)
    reference_error = _error_to_scale(
        _resnet18_logits_and_grads(nn.Conv, jnp.float32, *args), exact
    )
    ours_error = _error_to_scale(_resnet18_logits_and_grads(CpuConv, jnp.float32, *args), exact)
    print(
        f"error to scale: float64 CpuConv vs nn.Conv {float64_error:.1e}; float32 vs float64: "
        f"nn.Conv {reference_error:.2e}, CpuConv {ours_error:.2e}"
    )
    assert float64_error < 1e-9
    assert reference_error < 1e-3  # float32 rounding, not a broken reference
    assert ours_error <= 5 * reference_error
