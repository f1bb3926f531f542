"""The parts the ResNet families share: torch-equivalent padding and initializers, squeeze-excitation, the
ResNet-D average-pool downsample and weight standardization.

`models.py` (post-activation ResNets: torchvision's, ResNet-D, SE-ResNet, the CIFAR nets) and `models_v2.py`
(pre-activation ResNets: v2, BiT, Wide ResNet) build their blocks from these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

ModuleDef = Any
Dtype = Any

# torchvision initializes convs with kaiming_normal_(mode="fan_out", nonlinearity="relu"): untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch.nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Callable:
    """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def pad(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit symmetric padding as torch uses it; 'SAME' pads asymmetrically for strided convs."""
    return ((size, size), (size, size))


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's `make_divisible(value, divisor, round_limit=0)`: round to the nearest multiple, at least one."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as timm's `SEModule`: channel gates from the pooled map.

    The two "fully connected" layers are 1x1 convs with bias over the (N, 1, 1, C) pooled map, as in timm,
    so their kernels convert like every other conv.
    """

    conv: ModuleDef
    act: Callable
    reduction: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        squeezed = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        hidden = make_divisible(channels / self.reduction)
        s = self.conv(hidden, (1, 1), (1, 1), pad(0), use_bias=True, name="fc1")(squeezed)
        s = self.conv(channels, (1, 1), (1, 1), pad(0), use_bias=True, name="fc2")(self.act(s))
        return x * nn.sigmoid(s).astype(x.dtype)


def avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
    """torch's `AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)` on NHWC.

    ResNet-D's shortcut: on an odd map the last window holds one row/column and averages only that.
    """
    _, height, width, _ = x.shape
    padding = ((0, -height % stride), (0, -width % stride))
    return nn.avg_pool(
        x, (stride, stride), strides=(stride, stride), padding=padding, count_include_pad=False
    )


def standardize_kernel(kernel: jax.Array, epsilon: float) -> jax.Array:
    """Weight standardization (Qiao et al. 2019) of an HWIO kernel, per output channel.

    As timm's `StdConv2d`: `F.batch_norm` over each output channel's fan-in, i.e. the biased variance.
    """
    kernel32 = kernel.astype(jnp.float32)
    mean = jnp.mean(kernel32, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel32, axis=(0, 1, 2), keepdims=True)
    return ((kernel32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(kernel.dtype)


@functools.cache
def weight_standardized(conv: type[nn.Module], epsilon: float) -> type[nn.Module]:
    """The conv class `conv`, computing with its kernel standardized; the stored `kernel` stays the raw one.

    A subclass whose `param` standardizes the kernel it hands to the conv, so that any conv implementation
    (`nn.Conv`, `resnet_jax.conv.CpuConv`) keeps its parameter names, initialization and speed, and
    `init`/`apply` work with any mutable collections (a lifted `nn.map_variables` breaks `apply` with
    `mutable=[...]`).
    """

    class WeightStandardizedConv(conv):
        def param(self, name: str, init_fn: Callable, *init_args: Any, **init_kwargs: Any) -> Any:
            value = super().param(name, init_fn, *init_args, **init_kwargs)
            return standardize_kernel(value, epsilon) if name == "kernel" else value

    WeightStandardizedConv.__name__ = WeightStandardizedConv.__qualname__ = (
        f"WeightStandardized{conv.__name__}"
    )
    return WeightStandardizedConv


def pool_and_classify(
    x: jax.Array, num_classes: int, dtype: Any, outputs: dict[str, jax.Array]
) -> jax.Array:
    """Global average pooling (float32) and the `fc` classifier, as both ResNet families end; records
    `pooled` (and `logits`) in `outputs`. Call it from a compact method: `fc` belongs to the caller."""
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    outputs["pooled"] = x
    if num_classes > 0:
        x = nn.Dense(
            num_classes,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=linear_kernel_init,
            bias_init=torch_linear_bias_init(x.shape[-1]),
            name="fc",
        )(x)
        # Logits in float32 so the loss is computed in float32 under bf16 compute.
        x = x.astype(jnp.float32)
        outputs["logits"] = x
    return x


def check_nhwc(x: jax.Array, in_channels: int) -> None:
    """One clear error for a wrong input layout (the common mistake: NCHW images from PyTorch)."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(
            f"ResNet expects NHWC images of shape (batch, height, width, {in_channels}); "
            f"got shape {tuple(x.shape)}. Convert NCHW with x.transpose(0, 2, 3, 1)."
        )
