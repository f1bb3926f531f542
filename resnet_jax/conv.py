"""Convolutions that XLA:CPU runs fast, drop-in for `flax.linen.Conv` in the ResNets: choosing a form per shape.

`resnet_jax.conv_forms` holds the equivalent forms of a conv (XLA's own, im2col + one matmul or one per region
of the output map, the per-tap kernel gradient, Winograd, space-to-depth for the stem) and says why each
exists. This module picks one per conv shape and runs it:

* `select_form`: the form for one conv, per `RESNET_JAX_CONV_FORM` (see `resnet_jax.conv_autotune`): timed
  once per shape and cached (`auto`), the measured rule `static_form` (`static`), or a pinned form name;
* `cpu_conv`: the conv computed by the selected form;
* `CpuConv`: `nn.Conv`'s parameters (one `kernel`, HWIO, same shape and initializer call, same RNG stream)
  computed by `cpu_conv`, so checkpoints, torchvision conversion and initialization do not care which module
  ran;
* `default_conv`: `CpuConv` on the CPU backend, `nn.Conv` elsewhere.

The forms themselves are imported from here too (`FORMS`, `lax_conv`, ...): this module is the conv API.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from resnet_jax import conv_autotune
from resnet_jax.conv_forms import (
    FORMS,
    Dtype,
    Padding,
    candidate_forms,
    conv_with_tap_kernel_grad,
    conv_with_winograd_kernel_grad,
    form_supports,
    im2col_conv,
    lax_conv,
    output_size,
    region_im2col_conv,
    space_to_depth_conv,
    static_form,
)

__all__ = [
    "FORMS",
    "CpuConv",
    "candidate_forms",
    "conv_with_tap_kernel_grad",
    "conv_with_winograd_kernel_grad",
    "cpu_conv",
    "default_conv",
    "form_supports",
    "im2col_conv",
    "lax_conv",
    "region_im2col_conv",
    "select_form",
    "space_to_depth_conv",
    "static_form",
]


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
    form name; see resnet_jax.conv_autotune, also for why a multi-process run never times)."""
    mode = mode or conv_autotune.mode()
    kh, kw, cin, cout = kernel_shape
    n = x_shape[0]
    pads = ((0, 0), (0, 0)) if isinstance(padding, str) else padding
    out_h = output_size(x_shape[1], kh, strides[0], pads[0])
    out_w = output_size(x_shape[2], kw, strides[1], pads[1])
    if min(n, out_h, out_w) <= 0:
        # No output to compute (or a kernel larger than the padded input): lax.conv returns the empty map or
        # raises nn.Conv's own error, where the matmul forms would fail to build an empty patch matrix.
        return "lax"
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
    candidates = candidate_forms(
        kernel_shape, strides, padding, feature_group_count, dtype, x_shape=x_shape
    )
    flops = 2 * n * out_h * out_w * kh * kw * cin * cout
    if (
        len(candidates) < 2
        or flops < conv_autotune.MIN_TUNED_FLOPS
        or not conv_autotune.timing_allowed()
    ):
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

    Takes `nn.Conv`'s arguments for a 2-D conv, in the same order and with its conventions: `kernel_size` a
    pair (an int is a 1-D conv to flax, refused here rather than read as a square), `strides` an int or a
    pair, `padding` 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', an int, or per dimension an int or a
    `(low, high)` pair; inputs `(N, H, W, C)`, `(H, W, C)` or with more leading batch dims, flattened for
    the conv as `nn.Conv` does. String padding becomes the pairs lax computes for it; negative padding runs
    `lax.conv_general_dilated`. Dilation and unshared weights are not offered: use `nn.Conv` for those (and
    for 1-D and 3-D convs).

    Reverse-mode autodiff of any order works (`jax.grad`, Hessian-vector products as `jax.jvp` of
    `jax.grad`). Forward mode over the model itself (`jax.jvp`, `jax.jacfwd` of the outputs) does not where
    the chosen form has a custom gradient (`jax.custom_vjp`: tap_grad, region_im2col, lax_winograd*_grad);
    JAX then says so. Pin `RESNET_JAX_CONV_FORM=lax`, or build the model with `conv=nn.Conv`, for that.
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
        kernel_size = _kernel_size_2d(self.kernel_size)
        strides = _strides_2d(self.strides)
        padding = _padding_2d(self.padding)
        if x.ndim < 3:
            raise ValueError(f"CpuConv takes (..., H, W, C) inputs, got shape {x.shape}")
        batch_shape = x.shape[:-3]
        x = x.reshape((-1, *x.shape[-3:]))  # nn.Conv's convention: one batch axis for the conv
        if padding in ("CIRCULAR", "REFLECT"):
            # As nn.Conv: pad the map with its own pixels, then a VALID conv.
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)]
            x = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "reflect")
            padding = "VALID"
        if isinstance(padding, str):
            # The same pairs lax.conv computes for SAME / SAME_LOWER / VALID, so every form can take the conv.
            padding = tuple(lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, padding))
        in_features = x.shape[-1]
        for name, count in (("input features", in_features), ("features", self.features)):
            if count % self.feature_group_count:
                raise ValueError(
                    f"CpuConv {name} {count} not divisible by feature_group_count "
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
        form = self.form or conv_autotune.mode()
        if form == "auto" and self.is_initializing():
            # `init` runs the model once (on a batch of one: `train_state.init_variables`) for the parameters'
            # shapes; timing forms for shapes no step runs would only cost time and fill the cache.
            form = "static"
        y = cpu_conv(
            x,
            kernel,
            strides,
            padding,
            self.feature_group_count,
            self.tap_kernel_grad,
            form,
        )
        if bias is not None:
            y = y + bias
        return y.reshape((*batch_shape, *y.shape[1:]))


def _kernel_size_2d(kernel_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(kernel_size, int) or len(tuple(kernel_size)) != 2:
        raise ValueError(
            f"CpuConv computes 2-D convs: kernel_size must be a pair such as (3, 3), got {kernel_size!r} "
            "(flax's nn.Conv reads an int or a 1-tuple as a 1-D conv; use nn.Conv for 1-D and 3-D convs)"
        )
    return tuple(kernel_size)


def _strides_2d(strides: int | Sequence[int] | None) -> tuple[int, int]:
    if strides is None:  # nn.Conv's old spelling of stride 1
        return (1, 1)
    if isinstance(strides, int):
        return (strides, strides)
    if len(tuple(strides)) != 2:
        raise ValueError(f"CpuConv strides must be an int or a pair, got {strides!r}")
    return tuple(strides)


PADDING_NAMES = ("SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT")


def _padding_2d(padding: Padding | str | int | Sequence[int]) -> Padding | str:
    """nn.Conv's padding conventions (`flax.linen.linear.canonicalize_padding`) as a name or two pairs."""
    if isinstance(padding, str):
        if padding.upper() not in PADDING_NAMES:
            raise ValueError(
                f"CpuConv padding {padding!r}: expected one of {PADDING_NAMES}, an int, or per dimension "
                "an int or a (low, high) pair"
            )
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != 2 or any(len(pair) != 2 for pair in pairs):
        raise ValueError(
            f"CpuConv padding {padding!r}: a 2-D conv takes an int, or two entries, each an int or a "
            "(low, high) pair"
        )
    return pairs


def default_conv() -> type[nn.Module]:
    """The conv module a model should use on the default JAX backend: `CpuConv` on CPU, `nn.Conv` elsewhere.

    On GPU and TPU the vendor convolutions (cuDNN, the TPU conv unit) beat any matmul rewrite, so `nn.Conv`
    stays the choice there.
    """
    return CpuConv if jax.default_backend() == "cpu" else nn.Conv
