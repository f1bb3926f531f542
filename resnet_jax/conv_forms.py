"""The equivalent forms of a 2D conv (NHWC input, HWIO kernel) that `resnet_jax.conv` chooses among.

XLA's CPU backend lowers every convolution to one Eigen spatial-convolution routine. Timing each of ResNet's conv
shapes alone (benchmarks/conv_shapes.py; forward + gradients, batch 16, 2-core AMD EPYC) showed:

* small maps are the big loss: a 3x3 conv over a 2x2 map with 512 channels took 854 ms, the same math as one
  matmul 24 ms, because most of its taps read only padding; up to 8x8 outputs the matmul form still wins;
* at 16x16 outputs XLA's kernel gradient (a convolution whose "kernel" is the whole output map) is slower than
  one matmul per tap (41 vs 51 ms for 128 channels); at 32x32 and up XLA's own conv is the fastest form.

So `FORMS` holds, by name:

* `lax`: `lax.conv_general_dilated`, what `nn.Conv` computes (and the only form for string and negative
  paddings);
* `im2col`: one matmul of the patch matrix with the kernel, skipping the taps that fall wholly in the padding
  (they multiply only zeros); a 1x1 conv is one matmul over the (strided) input;
* `region_im2col`: one matmul per region of output positions (corners, edges, interior), each over only the
  taps that read real input there: no product with padding at all (2.25x fewer products than im2col at 2x2
  maps; `resnet_jax.im2col`);
* `tap_grad`: `lax` forward and input gradient, the kernel gradient as one matmul per tap (`custom_vjp`);
* `winograd2`/`winograd4` and `lax_winograd*_grad`: Winograd F(2x2)/F(4x4, 3x3) (`resnet_jax.winograd`), for
  the whole conv or for the kernel gradient only;
* `s2d_im2col`/`s2d_lax`: a wide stride-2 conv (the stem) over 2x2 space-to-depth blocks;
* `grouped_im2col`: a grouped conv (ResNeXt) as one matmul of each group's patch matrix, batched over the groups
  (`resnet_jax.im2col`);
  Winograd also takes groups, the other matmul forms do not.

`form_supports` says which forms compute a conv, `static_form` is the choice without timing and
`candidate_forms` what the autotuner times. Every form computes the same sums as `lax.conv_general_dilated` in
a different order, so outputs and gradients agree to float32 rounding (tests/test_conv.py,
tests/test_winograd.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax import winograd
from resnet_jax.im2col import (
    grouped_im2col_conv,
    im2col_conv,
    output_size,
    pad_map,
    region_im2col_conv,
    region_products,
    tap_input,
)

Dtype = Any
Padding = Sequence[tuple[int, int]]

# Output maps up to SMALL_MAP (both dimensions) use im2col + one matmul; up to TAP_GRAD_MAP, lax.conv with the
# per-tap kernel gradient; larger ones plain lax.conv. Measured per shape by benchmarks/conv_shapes.py: im2col's
# patch matrix is 9x the activation, which costs more than the conv from 16x16 up; the per-tap gradient wins at
# 16x16 and loses at 32x32.
SMALL_MAP = 8
TAP_GRAD_MAP = 16
# The region form is a candidate, and the choice without timing, where it multiplies at most this fraction of
# im2col's products: 3x3 convs with padding 1 over 2x2 maps (0.44), where it took 3.1 ms against im2col's 4.1
# (resnet18 at 32 px, 256 channels, batch 32, forward + gradients, Zen 4). At 4x4 maps (0.69) its nine
# smaller matmuls lost to im2col's one (3.9 against 3.6 ms; benchmarks/README.md).
REGION_MAX_FRACTION = 0.5

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def lax_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding | str,
    feature_group_count: int = 1,
) -> jax.Array:
    """The reference: what `nn.Conv` computes for NHWC inputs and HWIO kernels."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding if isinstance(padding, str) else tuple(padding),
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=feature_group_count,
    )


def _kernel_grad_by_taps(
    x: jax.Array,
    grad_out: jax.Array,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    padding: Padding,
) -> jax.Array:
    """d(loss)/d(kernel) as one (C, N*Ho*Wo) @ (N*Ho*Wo, O) matmul per tap."""
    kh, kw, _, _ = kernel_shape
    out_hw = grad_out.shape[1:3]
    x_padded = pad_map(x, padding)
    contract_nhw = (((0, 1, 2), (0, 1, 2)), ((), ()))
    taps = [
        [
            lax.dot_general(tap_input(x_padded, i, j, strides, out_hw), grad_out, contract_nhw)
            for j in range(kw)
        ]
        for i in range(kh)
    ]
    return jnp.stack([jnp.stack(row) for row in taps])


def conv_with_tap_kernel_grad(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """`lax_conv` forward and input gradient; the kernel gradient as per-tap matmuls."""
    return _conv_tap_grad(x, kernel, tuple(strides), tuple(tuple(p) for p in padding))


# strides and padding are static (Python tuples), so they are nondiff arguments of the custom_vjp.
_conv_tap_grad = jax.custom_vjp(
    lambda x, kernel, strides, padding: lax_conv(x, kernel, strides, padding),
    nondiff_argnums=(2, 3),
)


def _conv_tap_grad_fwd(x, kernel, strides, padding):
    return lax_conv(x, kernel, strides, padding), (x, kernel)


def _conv_tap_grad_bwd(strides, padding, residuals, grad_out):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: lax_conv(x_, kernel, strides, padding), x)
    (grad_x,) = input_vjp(grad_out)
    grad_kernel = _kernel_grad_by_taps(x, grad_out, kernel.shape, strides, padding)
    return grad_x, grad_kernel.astype(kernel.dtype)


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


def winograd_form(tile: int) -> Callable[..., jax.Array]:
    """The conv by Winograd F(tile x tile, 3x3) (3x3 stride-1 only), in `FORMS`' signature."""

    def conv(x, kernel, strides, padding, feature_group_count=1):
        del strides  # (1, 1): see form_supports
        return winograd.winograd_conv(x, kernel, padding, tile, feature_group_count)

    return conv


def conv_with_winograd_kernel_grad(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
    feature_group_count: int = 1,
    tile: int = 4,
) -> jax.Array:
    """`lax_conv` forward and input gradient; the kernel gradient by Winograd F(tile x tile, 3x3)."""
    return _conv_winograd_grad(
        x, kernel, tuple(tuple(p) for p in padding), feature_group_count, tile
    )


_conv_winograd_grad = jax.custom_vjp(
    lambda x, kernel, padding, groups, tile: lax_conv(x, kernel, (1, 1), padding, groups),
    nondiff_argnums=(2, 3, 4),
)


def _conv_winograd_grad_fwd(x, kernel, padding, groups, tile):
    return lax_conv(x, kernel, (1, 1), padding, groups), (x, kernel)


def _conv_winograd_grad_bwd(padding, groups, tile, residuals, grad_out):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: lax_conv(x_, kernel, (1, 1), padding, groups), x)
    (grad_x,) = input_vjp(grad_out)
    _, kernel_vjp = jax.vjp(lambda k_: winograd.winograd_conv(x, k_, padding, tile, groups), kernel)
    (grad_kernel,) = kernel_vjp(grad_out)
    return grad_x, grad_kernel


_conv_winograd_grad.defvjp(_conv_winograd_grad_fwd, _conv_winograd_grad_bwd)


def space_to_depth_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding,
    inner: Callable[..., jax.Array] = im2col_conv,
) -> jax.Array:
    """A stride-2 conv as a stride-1 conv over 2x2 space-to-depth blocks (the MLPerf TPU stem trick).

    Input (N, H, W, C) padded becomes (N, H/2, W/2, 4C) and the k x k kernel, zero-padded to even size,
    (k/2, k/2, 4C, O): the stem's 49 strided taps of 3 channels become 16 contiguous taps of 12.
    """
    if tuple(strides) != (2, 2):
        raise ValueError(f"space-to-depth takes stride 2, got {strides}")
    n, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    out_h = output_size(h, kh, 2, padding[0])
    out_w = output_size(w, kw, 2, padding[1])
    # Rows 0 .. 2 * (out + ceil(k / 2) - 1) - 1 of the padded input are all any output reads.
    rows, cols = 2 * (out_h + (kh + 1) // 2 - 1), 2 * (out_w + (kw + 1) // 2 - 1)
    top, left = padding[0][0], padding[1][0]
    x = jnp.pad(x, ((0, 0), (top, max(0, rows - h - top)), (left, max(0, cols - w - left)), (0, 0)))
    x = x[:, :rows, :cols]
    x = x.reshape(n, rows // 2, 2, cols // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, rows // 2, cols // 2, 4 * c)
    kernel = jnp.pad(kernel, ((0, kh % 2), (0, kw % 2), (0, 0), (0, 0)))
    kernel = kernel.reshape((kh + 1) // 2, 2, (kw + 1) // 2, 2, -1, o).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape((kh + 1) // 2, (kw + 1) // 2, -1, o)
    return inner(x, kernel, (1, 1), ((0, 0), (0, 0)))


# The equivalent forms, by name: f(x, kernel, strides, padding, feature_group_count=1) -> y.
FORMS: dict[str, Callable[..., jax.Array]] = {
    "lax": lax_conv,
    "tap_grad": lambda x, k, s, p, g=1: conv_with_tap_kernel_grad(x, k, s, p),
    "im2col": lambda x, k, s, p, g=1: im2col_conv(x, k, s, p),
    "region_im2col": lambda x, k, s, p, g=1: region_im2col_conv(x, k, s, p),
    "winograd2": winograd_form(2),
    "winograd4": winograd_form(4),
    "lax_winograd2_grad": functools.partial(conv_with_winograd_kernel_grad, tile=2),
    "lax_winograd4_grad": functools.partial(conv_with_winograd_kernel_grad, tile=4),
    "s2d_im2col": lambda x, k, s, p, g=1: space_to_depth_conv(x, k, s, p),
    "s2d_lax": lambda x, k, s, p, g=1: space_to_depth_conv(x, k, s, p, lax_conv),
    "grouped_im2col": lambda x, k, s, p, g=1: grouped_im2col_conv(x, k, s, p, g),
}


def form_supports(
    name: str,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Padding | str,
    feature_group_count: int,
    dtype: Dtype = jnp.float32,
) -> bool:
    """Whether form `name` computes this conv (every form computes the same values where it does).

    Winograd's transforms multiply by up to 8 and 1/24 and cancel in the sums: fine in float32, too coarse in
    bfloat16 (errors of several bf16 ulps of the output scale), so it is float32/float64 only.
    """
    if name == "lax":
        return True
    if not isinstance(padding, str) and any(p < 0 for pair in padding for p in pair):
        return False  # negative padding crops the map: lax.conv's alone
    if name == "grouped_im2col":
        return feature_group_count > 1 and not isinstance(padding, str)
    if "winograd" in name:
        return jnp.dtype(dtype).itemsize >= 4 and winograd.supports(kernel_shape, strides, padding)
    if name.startswith("s2d"):
        # For 3x3 kernels the padded 4x4 kernel multiplies 16/9 as much: only wide strided kernels (stems).
        return (
            feature_group_count == 1
            and not isinstance(padding, str)
            and tuple(strides) == (2, 2)
            and min(kernel_shape[:2]) >= 5
        )
    return feature_group_count == 1 and not isinstance(padding, str)


def static_form(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    padding: Padding | str,
    feature_group_count: int = 1,
    dtype: Dtype = jnp.float32,
) -> str:
    """The form chosen without timing (`RESNET_JAX_CONV_FORM=static`, and convs too small to time)."""
    if isinstance(padding, str):
        return "lax"
    kh, kw = kernel_shape[:2]
    out_h = output_size(x_shape[1], kh, strides[0], padding[0])
    out_w = output_size(x_shape[2], kw, strides[1], padding[1])
    supports = functools.partial(
        form_supports,
        kernel_shape=kernel_shape,
        strides=strides,
        padding=padding,
        feature_group_count=feature_group_count,
        dtype=dtype,
    )
    if feature_group_count > 1:
        # F(4x4) where the map holds a whole output tile (ResNeXt-50 at 64 px, forward + gradients: 0.2-0.8x
        # grouped_im2col's time at 16x16-4x4 maps on a Zen 5; on 2x2 maps it computes 16 outputs for 4).
        if min(out_h, out_w) >= 4 and supports("winograd4"):
            return "winograd4"
        if supports("grouped_im2col"):
            return "grouped_im2col"
    if not supports("im2col"):
        return "lax"  # negative padding, with or without groups
    if kh == kw == 1 or (out_h <= SMALL_MAP and out_w <= SMALL_MAP):
        if region_pays(x_shape, kernel_shape, strides, padding):
            return "region_im2col"
        return "im2col"
    # Beyond SMALL_MAP, F(4x4) took 0.6-0.8x lax's time for forward + gradients on the Intel CPU measured and
    # about half on the AMD one (benchmarks/README.md).
    if supports("winograd4"):
        return "winograd4"
    if out_h > TAP_GRAD_MAP or out_w > TAP_GRAD_MAP:
        return "lax"
    return "tap_grad"


def region_pays(
    x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int], padding: Padding
) -> bool:
    """Whether the region form is worth timing or taking without timing: it needs at most
    `REGION_MAX_FRACTION` of im2col's products. Also where every output reads only padding (both counts 0):
    both forms return the zeros."""
    region, dense = region_products(x_shape[1:3], kernel_shape[:2], strides, padding)
    return region <= REGION_MAX_FRACTION * dense


def candidate_forms(
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    padding: Padding | str,
    feature_group_count: int = 1,
    dtype: Dtype = jnp.float32,
    x_shape: Sequence[int] | None = None,
) -> list[str]:
    """The forms the autotuner times for this conv (a 1x1 conv is one matmul: nothing to choose).

    The region form is a candidate only where `x_shape` is given and it saves enough products to win
    (`REGION_MAX_FRACTION`); elsewhere it is im2col with more, smaller matmuls.
    """
    if tuple(kernel_shape[:2]) == (1, 1) and feature_group_count == 1:
        if not form_supports("im2col", kernel_shape, strides, padding, 1, dtype):
            return ["lax"]  # string or negative padding
        return ["im2col"]
    skipped = set(_NOT_TUNED)
    if feature_group_count > 1 and form_supports(
        "grouped_im2col", kernel_shape, strides, padding, feature_group_count
    ):
        skipped.update(GROUPED_NOT_TIMED)
    if (
        x_shape is None
        or isinstance(padding, str)
        or not region_pays(x_shape, kernel_shape, strides, padding)
    ):
        skipped.add("region_im2col")
    return [
        name
        for name in FORMS
        if name not in skipped
        and form_supports(name, kernel_shape, strides, padding, feature_group_count, dtype)
    ]


# Never the fastest where measured; kept in FORMS for benchmarks/conv_shapes.py.
_NOT_TUNED = ("lax_winograd2_grad",)
# XLA:CPU's grouped convolution (`lax`, and the forward of `lax_winograd*_grad`) took 30-65x the time of
# Winograd or of one matmul per tap (the form before `grouped_im2col`) for every 3x3 conv of ResNeXt-50 at
# 64 px (0.4-5.3 s each, forward + gradients): timing it would cost seconds per shape to rule it out.
# Pinning `RESNET_JAX_CONV_FORM=lax` still runs it.
GROUPED_NOT_TIMED = ("lax", "lax_winograd2_grad", "lax_winograd4_grad")
