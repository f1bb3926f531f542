"""ResNets in Flax linen, layer for layer the networks of torchvision (v1.5) and of the ResNet paper.

Reads top to bottom: the injected building blocks, the two residual blocks, the network, then the table
of named variants. Everything is NHWC; BatchNorm statistics live in the explicit `batch_stats` collection.

Module names are stable and meaningful (`stem_conv`, `stage2_block1/conv2`, `fc`) because checkpoints,
the torchvision conversion table and freezing rules are written against them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from resnet_jax.conv import default_conv

ModuleDef = Any
Dtype = Any

# torchvision initializes convs with kaiming_normal_(mode="fan_out", nonlinearity="relu"): untruncated normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_bias_init(fan_in: int) -> Callable:
    """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torch.nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def pad(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit symmetric padding as torch uses it; 'SAME' pads asymmetrically for strided convs."""
    return ((size, size), (size, size))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str = "projection"  # or "zero_pad": the paper's parameter-free option A
    zero_init_residual: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), pad(1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (1, 1), pad(1), name="conv2")(y)
        y = self.norm(name="bn2", scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
        residual = _shortcut(self, residual, y.shape[-1])
        return self.act(residual + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: torchvision's v1.5; grouped for ResNeXt), 1x1 expand by 4."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    groups: int = 1
    width_per_group: int = 64
    shortcut: str = "projection"
    zero_init_residual: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        # torchvision: width = int(planes * base_width / 64) * groups (wide and ResNeXt variants change it).
        width = int(self.filters * (self.width_per_group / 64.0)) * self.groups
        y = self.conv(width, (1, 1), (1, 1), pad(0), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(
            width,
            (3, 3),
            (self.strides, self.strides),
            pad(1),
            feature_group_count=self.groups,
            name="conv2",
        )(y)
        y = self.act(self.norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), (1, 1), pad(0), name="conv3")(y)
        y = self.norm(name="bn3", scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
        residual = _shortcut(self, residual, y.shape[-1])
        return self.act(residual + y)


def _last_bn_scale_init(zero_init_residual: bool) -> Callable:
    # Zero-init makes each block start as the identity (Goyal et al. 2017), which helps large-batch training.
    return nn.initializers.zeros if zero_init_residual else nn.initializers.ones


def _shortcut(block: nn.Module, x: jax.Array, out_channels: int) -> jax.Array:
    """The identity, or a projection/zero-pad when the block changes resolution or width."""
    if block.strides == 1 and x.shape[-1] == out_channels:
        return x
    if block.shortcut == "zero_pad":
        # Option A of the paper: subsample spatially, pad the new channels with zeros; no parameters.
        x = x[:, :: block.strides, :: block.strides, :]
        extra = out_channels - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    s = (block.strides, block.strides)
    x = block.conv(out_channels, (1, 1), s, pad(0), name="downsample_conv")(x)
    return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """One network for every variant; the block, widths and stem are fields, conv/norm/act are injected.

    `__call__(x, train)` returns logits `(N, num_classes)`, or the pooled features `(N, C)` when
    `num_classes == 0`. With `features=True` it returns a dict of every intermediate a backbone user needs:
    `stem` (after the max-pool), `stage1`..`stage4` (C2..C5 of the FPN papers), `pooled`, and `logits`
    when the model has a classifier.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool; "cifar": one 3x3/1 conv
    shortcut: str = "projection"
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None  # sync BN statistics over this mapped axis (e.g. "data")
    bn_frozen: bool = False  # always normalize with the running statistics, even when training
    conv: ModuleDef = nn.Conv
    act: Callable = nn.relu
    in_channels: int = 3

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet expects NHWC images of shape (batch, height, width, {self.in_channels}); "
                f"got shape {tuple(x.shape)}. Convert NCHW with x.transpose(0, 2, 3, 1)."
            )
        conv = functools.partial(
            self.conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_kernel_init,
        )
        # BN momentum 0.9 here is torch's momentum=0.1: flax weights the old statistic, torch the new one.
        # Statistics and the normalization stay in float32 whatever the compute dtype.
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train or self.bn_frozen,
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name if train and not self.bn_frozen else None,
        )
        outputs = {}
        if self.stem == "imagenet":
            x = conv(self.stage_widths[0], (7, 7), (2, 2), pad(3), name="stem_conv")(x)
            x = self.act(norm(name="stem_bn")(x))
            # reduce_window pads with -inf, as torch's max_pool2d does.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pad(1))
        elif self.stem == "cifar":
            x = conv(self.stage_widths[0], (3, 3), (1, 1), pad(1), name="stem_conv")(x)
            x = self.act(norm(name="stem_bn")(x))
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet' or 'cifar'")
        outputs["stem"] = x

        for stage, (num_blocks, filters) in enumerate(
            zip(self.stage_sizes, self.stage_widths, strict=True)
        ):
            for block in range(num_blocks):
                extra = {}
                if self.block_cls is Bottleneck:
                    extra = dict(groups=self.groups, width_per_group=self.width_per_group)
                x = self.block_cls(
                    filters=filters,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    strides=2 if stage > 0 and block == 0 else 1,
                    shortcut=self.shortcut,
                    zero_init_residual=self.zero_init_residual,
                    name=f"stage{stage + 1}_block{block + 1}",
                    **extra,
                )(x)
            outputs[f"stage{stage + 1}"] = x

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        outputs["pooled"] = x
        if self.num_classes > 0:
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=linear_kernel_init,
                bias_init=torch_linear_bias_init(x.shape[-1]),
                name="fc",
            )(x)
            # Logits in float32 so the loss is computed in float32 under bf16 compute.
            x = x.astype(jnp.float32)
            outputs["logits"] = x
        return outputs if features else x


# The table of architectures: torchvision's ImageNet networks, then the CIFAR networks of He et al. 2016, sec. 4.2.
resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
resnet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
resnet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
wide_resnet50_2 = functools.partial(resnet50, width_per_group=128)
wide_resnet101_2 = functools.partial(resnet101, width_per_group=128)
resnext50_32x4d = functools.partial(resnet50, groups=32, width_per_group=4)
resnext101_32x8d = functools.partial(resnet101, groups=32, width_per_group=8)
resnext101_64x4d = functools.partial(resnet101, groups=64, width_per_group=4)


def cifar_resnet(depth: int) -> Callable[..., ResNet]:
    """The paper's 6n+2-layer CIFAR network: 16/32/64 channels, n basic blocks a stage, option-A shortcuts."""
    num_blocks = (depth - 2) // 6
    return functools.partial(
        ResNet,
        stage_sizes=(num_blocks,) * 3,
        stage_widths=(16, 32, 64),
        block_cls=BasicBlock,
        stem="cifar",
        shortcut="zero_pad",
        num_classes=10,
    )


IMAGENET_MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "wide_resnet50_2": wide_resnet50_2,
    "wide_resnet101_2": wide_resnet101_2,
    "resnext50_32x4d": resnext50_32x4d,
    "resnext101_32x8d": resnext101_32x8d,
    "resnext101_64x4d": resnext101_64x4d,
}
CIFAR_MODELS: dict[str, Callable[..., ResNet]] = {
    f"cifar_resnet{depth}": cifar_resnet(depth) for depth in (20, 32, 44, 56, 110)
}
MODELS: dict[str, Callable[..., ResNet]] = {**IMAGENET_MODELS, **CIFAR_MODELS}


def list_models() -> list[str]:
    """Names accepted by `create_model`: torchvision's ImageNet ResNets, then the CIFAR ResNets."""
    return list(MODELS)


def create_model(name: str, num_classes: int = 1000, **options: Any) -> ResNet:
    """Builds a named ResNet.

    Args:
      name: one of `list_models()`, e.g. "resnet50" or "cifar_resnet56".
      num_classes: size of the classifier; 0 drops it and the model returns pooled features.
      **options: any `ResNet` field: `dtype` (compute dtype, e.g. jnp.bfloat16; params and BN stay
        float32), `zero_init_residual`, `bn_axis_name` (sync BN over a mapped axis), `bn_frozen`,
        `conv` (another conv implementation with the same HWIO kernels; default:
        `resnet_jax.conv.default_conv()`, the matmul forms on CPU and `nn.Conv` elsewhere), `act`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")
    unknown = set(options) - {f.name for f in ResNet.__dataclass_fields__.values()} - {"parent"}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for create_model({name!r})")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")
    # XLA:CPU's convolutions are several times slower than the same math as matmuls in a ResNet train
    # step (benchmarks/README.md); the parameters are identical either way.
    options.setdefault("conv", default_conv())
    return MODELS[name](num_classes=num_classes, **options)
