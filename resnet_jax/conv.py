"""Convolutions that XLA:CPU runs fast, drop-in for `flax.linen.Conv` in the ResNets.

XLA's CPU backend lowers every convolution to one Eigen spatial-convolution routine. Timing each of ResNet's conv
shapes alone (benchmarks/conv_shapes.py; forward + gradients, batch 16, 2-core AMD EPYC) showed:

* small maps are the big loss: a 3x3 conv over a 2x2 map with 512 channels took 854 ms, the same math as one
  matmul 24 ms, because most of its taps read only padding; up to 8x8 outputs the matmul form still wins;
* at 16x16 outputs XLA's kernel gradient (a convolution whose "kernel" is the whole output map) is slower than
  one matmul per tap (41 vs 51 ms for 128 channels); at 32x32 and up XLA's own conv is the fastest form.

`CpuConv` keeps the parameters of `nn.Conv` (one `kernel`, HWIO, same shape and initializer call, same RNG
stream), so checkpoints, torchvision conversion and initialization do not care which module ran, and computes:

* 1x1 convs as one matmul over the (strided) input;
* convs whose output map is at most `SMALL_MAP` x `SMALL_MAP` as im2col + one matmul, skipping the taps that
  fall wholly in the padding (they multiply only zeros);
* outputs up to `TAP_GRAD_MAP` with `lax.conv_general_dilated` forward and input gradient, and the kernel
  gradient as one matmul per tap (`custom_vjp`);
* larger outputs, grouped convs (ResNeXt) and string paddings with `lax.conv_general_dilated`, as `nn.Conv` does.

Every form computes the same sums as `lax.conv_general_dilated` in a different order, so outputs and gradients
agree to float32 rounding (tests/test_conv.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from resnet_jax import conv_autotune, winograd

Dtype = Any
Padding = Sequence[tuple[int, int]]

# Output maps up to SMALL_MAP (both dimensions) use im2col + one matmul; up to TAP_GRAD_MAP, lax.conv with the
# per-tap kernel gradient; larger ones plain lax.conv. Measured per shape by benchmarks/conv_shapes.py: im2col's
# patch matrix is 9x the activation, which costs more than the conv from 16x16 up; the per-tap gradient wins at
# 16x16 and loses at 32x32.
SMALL_MAP = 8
TAP_GRAD_MAP = 16

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


def _output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _live_offsets(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> list[int]:
    """Kernel offsets along one axis that read at least one real (non-padding) input position."""
    out = _output_size(size, kernel, stride, pad)
    return [
        k for k in range(kernel) if any(0 <= k - pad[0] + stride * o < size for o in range(out))
    ]


def _tap(x_padded: jax.Array, i: int, j: int, strides: tuple[int, int], out_hw: tuple[int, int]):
    """The input positions that kernel tap (i, j) multiplies, for every output position: (N, Ho, Wo, C)."""
    (sh, sw), (ho, wo) = strides, out_hw
    return x_padded[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


def _pad(x: jax.Array, padding: Padding) -> jax.Array:
    if not any(p for pair in padding for p in pair):
        return x
    return jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(N, H, W, K) @ (K, O) -> (N, H, W, O)."""
    return lax.dot_general(x, w, (((3,), (0,)), ((), ())))


def im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """The conv as one matmul of the patch matrix with the kernel, taps wholly in padding skipped."""
    kh, kw, _, _ = kernel.shape
    _, h, w, _ = x.shape
    out_hw = (
        _output_size(h, kh, strides[0], padding[0]),
        _output_size(w, kw, strides[1], padding[1]),
    )
    rows = _live_offsets(h, kh, strides[0], padding[0])
    cols = _live_offsets(w, kw, strides[1], padding[1])
    x_padded = _pad(x, padding)
    patches = [_tap(x_padded, i, j, strides, out_hw) for i in rows for j in cols]
    weights = [kernel[i, j] for i in rows for j in cols]
    if len(patches) == 1:
        return _matmul(patches[0], weights[0])
    return _matmul(jnp.concatenate(patches, axis=-1), jnp.concatenate(weights, axis=0))


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
    x_padded = _pad(x, padding)
    contract_nhw = (((0, 1, 2), (0, 1, 2)), ((), ()))
    taps = [
        [
            lax.dot_general(_tap(x_padded, i, j, strides, out_hw), grad_out, contract_nhw)
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
    out_h = _output_size(h, kh, 2, padding[0])
    out_w = _output_size(w, kw, 2, padding[1])
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
    "winograd2": winograd_form(2),
    "winograd4": winograd_form(4),
    "lax_winograd2_grad": functools.partial(conv_with_winograd_kernel_grad, tile=2),
    "lax_winograd4_grad": functools.partial(conv_with_winograd_kernel_grad, tile=4),
    "s2d_im2col": lambda x, k, s, p, g=1: space_to_depth_conv(x, k, s, p),
    "s2d_lax": lambda x, k, s, p, g=1: space_to_depth_conv(x, k, s, p, lax_conv),
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
    if feature_group_count != 1 or isinstance(padding, str):
        return "lax"
    kh, kw = kernel_shape[:2]
    out_h = _output_size(x_shape[1], kh, strides[0], padding[0])
    out_w = _output_size(x_shape[2], kw, strides[1], padding[1])
    if kh == kw == 1 or (out_h <= SMALL_MAP and out_w <= SMALL_MAP):
        return "im2col"
    # Beyond SMALL_MAP, F(4x4) took 0.6-0.8x lax's time for forward + gradients on the Intel CPU measured and
    # about half on the AMD one (benchmarks/README.md).
    if form_supports("winograd4", kernel_shape, strides, padding, 1, dtype):
        return "winograd4"
    if out_h > TAP_GRAD_MAP or out_w > TAP_GRAD_MAP:
        return "lax"
    return "tap_grad"


def candidate_forms(
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    padding: Padding | str,
    feature_group_count: int = 1,
    dtype: Dtype = jnp.float32,
) -> list[str]:
    """The forms the autotuner times for this conv (a 1x1 conv is one matmul: nothing to choose)."""
    if tuple(kernel_shape[:2]) == (1, 1) and feature_group_count == 1:
        return ["im2col"]
    return [
        name
        for name in FORMS
        if name not in _NOT_TUNED
        and form_supports(name, kernel_shape, strides, padding, feature_group_count, dtype)
    ]


# Never the fastest where measured; kept in FORMS for benchmarks/conv_shapes.py.
_NOT_TUNED = ("lax_winograd2_grad",)


def select_form(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    padding: Padding | str,
    feature_group_count: int = 1,
    dtype: Dtype = jnp.float32,
    mode: str | None = None,
) -> str:
    """The form `cpu_conv` runs for this conv: per `mode`, by default `RESNET_JAX_CONV_FORM` (auto, static or a
    form name; see resnet_jax.conv_autotune)."""
    mode = mode or conv_autotune.mode()
    static = static_form(x_shape, kernel_shape, strides, padding, feature_group_count, dtype)
    if mode == "static":
        return static
    if mode != "auto":
        if mode not in FORMS:
            raise ValueError(
                f"{conv_autotune.FORM_ENV}={mode!r}: expected auto, static or one of {sorted(FORMS)}"
            )
        supported = form_supports(mode, kernel_shape, strides, padding, feature_group_count, dtype)
        return mode if supported else static
    candidates = candidate_forms(kernel_shape, strides, padding, feature_group_count, dtype)
    kh, kw, cin, cout = kernel_shape
    n = x_shape[0]
    out_h = _output_size(
        x_shape[1], kh, strides[0], (0, 0) if isinstance(padding, str) else padding[0]
    )
    out_w = _output_size(
        x_shape[2], kw, strides[1], (0, 0) if isinstance(padding, str) else padding[1]
    )
    flops = 2 * n * out_h * out_w * kh * kw * cin * cout
    if len(candidates) < 2 or flops < conv_autotune.MIN_TUNED_FLOPS:
        return static
    # An RGB/grey image is the stem's input: a train step never needs its gradient.
    kernel_grad_only = cin * feature_group_count <= 4
    key = conv_autotune.shape_key(
        x_shape, kernel_shape, strides, padding, feature_group_count, dtype, kernel_grad_only
    )
    forms = {
        name: functools.partial(
            _apply_form, name=name, strides=strides, padding=padding, groups=feature_group_count
        )
        for name in candidates
    }
    return conv_autotune.choose_form(key, forms, x_shape, kernel_shape, dtype, kernel_grad_only)


def _apply_form(x, kernel, *, name, strides, padding, groups):
    return FORMS[name](x, kernel, strides, padding, groups)


def cpu_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Padding | str,
    feature_group_count: int = 1,
    tap_kernel_grad: bool = True,
    form: str | None = None,
) -> jax.Array:
    """The fastest of the equivalent forms on XLA:CPU for this shape (`select_form`; module docstring).

    `form` overrides `RESNET_JAX_CONV_FORM` for this call (auto, static or a form name). `tap_kernel_grad=False`
    keeps XLA's own kernel gradient where the choice is the per-tap one (kept for measuring what the per-tap
    kernel gradient buys).
    """
    strides = tuple(strides)
    if not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    name = select_form(
        x.shape, kernel.shape, strides, padding, feature_group_count, x.dtype, mode=form
    )
    if name == "tap_grad" and not tap_kernel_grad:
        name = "lax"
    return FORMS[name](x, kernel, strides, padding, feature_group_count)


class CpuConv(nn.Module):
    """`nn.Conv` (2D, NHWC, HWIO kernel named `kernel`) computed by `cpu_conv`: same parameters, faster on CPU.

    Takes the constructor arguments the ResNets pass to `nn.Conv`, in the same order. Padding is explicit
    `((top, bottom), (left, right))` or a string ('SAME'/'VALID', computed by `lax.conv_general_dilated`).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding | str = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    tap_kernel_grad: bool = True
    # None: RESNET_JAX_CONV_FORM decides (default auto); else auto, static or a form name for this module.
    form: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = _pair(self.kernel_size)
        strides = _pair(self.strides)
        padding = self.padding
        if not isinstance(padding, str):
            padding = tuple(_pair(p) for p in padding)
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"input features {in_features} not divisible by feature_group_count "
                f"{self.feature_group_count}"
            )
        # The same call as nn.Conv's, so both modules draw identical kernels from the same RNG.
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, in_features // self.feature_group_count, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = cpu_conv(
            x,
            kernel,
            strides,
            padding,
            self.feature_group_count,
            self.tap_kernel_grad,
            self.form,
        )
        if bias is not None:
            y = y + bias
        return y


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair for a 2D conv, got {value!r}")
    return value


def default_conv() -> type[nn.Module]:
    """The conv module a model should use on the default JAX backend: `CpuConv` on CPU, `nn.Conv` elsewhere.

    On GPU and TPU the vendor convolutions (cuDNN, the TPU conv unit) beat any matmul rewrite, so `nn.Conv`
    stays the choice there.
    """
    return CpuConv if jax.default_backend() == "cpu" else nn.Conv
