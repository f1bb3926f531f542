"""ResNets in Flax linen, layer for layer the networks of torchvision (v1.5), timm and the ResNet papers.

Reads top to bottom: the two residual blocks, the network, then the table of named variants (the
pre-activation family, v2/BiT/WRN, is in `models_v2.py`; the shared parts in `layers.py`). Everything is
NHWC; BatchNorm statistics live in the explicit `batch_stats` collection.

Module names are stable and meaningful (`stem_conv`, `stage2_block1/conv2`, `fc`) because checkpoints,
the torchvision conversion table and freezing rules are written against them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import models_v2
from resnet_jax.batch_norm import default_batch_norm
from resnet_jax.conv import default_conv
from resnet_jax.layers import (
    SqueezeExcite,
    avg_pool_ceil,
    check_nhwc,
    conv_kernel_init,
    pad,
    pool_and_classify,
)
from resnet_jax.models_v2 import PreActResNet
from resnet_jax.pooling import MaxPool, default_max_pool, flax_max_pool

ModuleDef = Any
Dtype = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    shortcut: str = (
        "projection"  # "zero_pad": the paper's parameter-free option A; "avg_pool": ResNet-D
    )
    zero_init_residual: bool = False
    squeeze_excite: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), pad(1), name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (1, 1), pad(1), name="conv2")(y)
        y = self.norm(name="bn2", scale_init=_last_bn_scale_init(self.zero_init_residual))(y)
        if self.squeeze_excite:
            y = SqueezeExcite(self.conv, self.act, name="se")(y)
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
    squeeze_excite: bool = False
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
        if self.squeeze_excite:
            y = SqueezeExcite(self.conv, self.act, name="se")(y)
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
    if block.shortcut == "avg_pool" and block.strides > 1:
        # ResNet-D (He et al. 2019, "Bag of Tricks"): average, then a 1x1 conv that sees every position.
        x, s = avg_pool_ceil(x, block.strides), (1, 1)
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
    stem: str = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool; "deep": three 3x3 convs + max-pool; "cifar": 3x3/1
    shortcut: str = "projection"  # "avg_pool": ResNet-D; "zero_pad": the CIFAR nets' option A
    groups: int = 1
    width_per_group: int = 64
    squeeze_excite: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None  # sync BN statistics over this mapped axis (e.g. "data")
    bn_frozen: bool = False  # always normalize with the running statistics, even when training
    conv: ModuleDef = nn.Conv
    max_pool: MaxPool = flax_max_pool  # create_model: resnet_jax.pooling.default_max_pool()
    batch_norm: ModuleDef = nn.BatchNorm  # create_model: resnet_jax.batch_norm.default_batch_norm()
    act: Callable = nn.relu
    in_channels: int = 3

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, features: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        check_nhwc(x, self.in_channels)
        conv = functools.partial(
            self.conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_kernel_init,
        )
        norm = self._norm(train)
        x = self._stem(x, conv, norm)
        outputs = {"stem": x}

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
                    squeeze_excite=self.squeeze_excite,
                    name=f"stage{stage + 1}_block{block + 1}",
                    **extra,
                )(x)
            outputs[f"stage{stage + 1}"] = x

        x = pool_and_classify(x, self.num_classes, self.dtype, outputs)
        return outputs if features else x

    def _norm(self, train: bool) -> ModuleDef:
        # BN momentum 0.9 here is torch's momentum=0.1: flax weights the old statistic, torch the new one.
        # Statistics and the normalization stay in float32 whatever the compute dtype.
        return functools.partial(
            self.batch_norm,
            use_running_average=not train or self.bn_frozen,
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name if train and not self.bn_frozen else None,
        )

    def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        """The layers before stage 1 (their modules are the network's own: `stem_conv`, `stem_bn`, ...)."""
        if self.stem == "imagenet":
            x = conv(self.stage_widths[0], (7, 7), (2, 2), pad(3), name="stem_conv")(x)
            x = self.act(norm(name="stem_bn")(x))
            # Padded with -inf, as torch's max_pool2d pads.
            return self.max_pool(x, 3, 2, 1)
        if self.stem == "deep":
            # ResNet-C/D: three 3x3 convs (32, 32, 64 channels for 64) replace the 7x7, as timm's stem_type="deep".
            width = self.stage_widths[0]
            x = conv(width // 2, (3, 3), (2, 2), pad(1), name="stem_conv1")(x)
            x = self.act(norm(name="stem_bn1")(x))
            x = conv(width // 2, (3, 3), (1, 1), pad(1), name="stem_conv2")(x)
            x = self.act(norm(name="stem_bn2")(x))
            x = conv(width, (3, 3), (1, 1), pad(1), name="stem_conv3")(x)
            x = self.act(norm(name="stem_bn")(x))
            return self.max_pool(x, 3, 2, 1)
        if self.stem == "cifar":
            x = conv(self.stage_widths[0], (3, 3), (1, 1), pad(1), name="stem_conv")(x)
            return self.act(norm(name="stem_bn")(x))
        raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet', 'deep' or 'cifar'")


# The table of architectures: torchvision's ImageNet networks, timm's variants, then the CIFAR networks (He et
# al. 2016, sec. 4.2; Zagoruyko & Komodakis 2016).
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


# timm's variants, layer for layer as timm 1.0 builds them: ResNet-D ("Bag of Tricks": deep stem, average-pool
# shortcut), SE-ResNet (squeeze-excitation, reduction 16), and the pre-activation v2 nets (models_v2.py) with
# BatchNorm (timm's resnetv2_*) or GroupNorm + weight standardization (BiT).
resnet18d = functools.partial(resnet18, stem="deep", shortcut="avg_pool")
resnet26d = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=Bottleneck, stem="deep", shortcut="avg_pool"
)
resnet50d = functools.partial(resnet50, stem="deep", shortcut="avg_pool")
resnet101d = functools.partial(resnet101, stem="deep", shortcut="avg_pool")
seresnet50 = functools.partial(resnet50, squeeze_excite=True)
seresnet101 = functools.partial(resnet101, squeeze_excite=True)
resnetv2_50 = functools.partial(
    PreActResNet, stage_sizes=(3, 4, 6, 3), block_cls=models_v2.PreActBottleneck
)
resnetv2_101 = functools.partial(
    PreActResNet, stage_sizes=(3, 4, 23, 3), block_cls=models_v2.PreActBottleneck
)
resnetv2_50x1_bit = functools.partial(resnetv2_50, stem="bit", norm="group")
resnetv2_101x1_bit = functools.partial(resnetv2_101, stem="bit", norm="group")


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


def wide_resnet(depth: int, width: int) -> Callable[..., PreActResNet]:
    """WRN-depth-width (Zagoruyko & Komodakis 2016): pre-activation basic blocks, (depth - 4) / 6 a stage,
    16/32/64 x width channels after a 16-channel 3x3 stem; `dropout_rate` (the paper: 0.3) between convs."""
    num_blocks = (depth - 4) // 6
    return functools.partial(
        PreActResNet,
        stage_sizes=(num_blocks,) * 3,
        stage_widths=(16 * width, 32 * width, 64 * width),
        stem_width=16,
        block_cls=models_v2.PreActBasicBlock,
        stem="cifar",
        num_classes=10,
    )


# Every name builds one of the two networks: post-activation (here) or pre-activation (models_v2.py).
Network = ResNet | PreActResNet
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
TIMM_MODELS: dict[str, Callable[..., Network]] = {
    "resnet18d": resnet18d,
    "resnet26d": resnet26d,
    "resnet50d": resnet50d,
    "resnet101d": resnet101d,
    "seresnet50": seresnet50,
    "seresnet101": seresnet101,
    "resnetv2_50": resnetv2_50,
    "resnetv2_101": resnetv2_101,
    "resnetv2_50x1_bit": resnetv2_50x1_bit,
    "resnetv2_101x1_bit": resnetv2_101x1_bit,
}
CIFAR_MODELS: dict[str, Callable[..., Network]] = {
    **{f"cifar_resnet{depth}": cifar_resnet(depth) for depth in (20, 32, 44, 56, 110)},
    "wide_resnet28_10": wide_resnet(28, 10),
}
MODELS: dict[str, Callable[..., Network]] = {**IMAGENET_MODELS, **TIMM_MODELS, **CIFAR_MODELS}


def list_models() -> list[str]:
    """Names accepted by `create_model`: torchvision's ImageNet ResNets, timm's variants, the CIFAR nets."""
    return list(MODELS)


def create_model(name: str, num_classes: int = 1000, **options: Any) -> Network:
    """Builds a named ResNet (`ResNet`, or `PreActResNet` for the v2/BiT/WRN names).

    Args:
      name: one of `list_models()`, e.g. "resnet50", "resnet50d" or "cifar_resnet56".
      num_classes: size of the classifier; 0 drops it and the model returns pooled features.
      **options: any field of the network: `dtype` (compute dtype, e.g. jnp.bfloat16; params and norm
        statistics stay float32), `zero_init_residual`, `bn_axis_name` (sync BN over a mapped axis),
        `bn_frozen`, `conv` (another conv implementation with the same HWIO kernels; default:
        `resnet_jax.conv.default_conv()`, the matmul forms on CPU and `nn.Conv` elsewhere), `max_pool`
        (default: `resnet_jax.pooling.default_max_pool()`, same values, a cheaper gradient on CPU),
        `batch_norm` (default: `resnet_jax.batch_norm.default_batch_norm()`, nn.BatchNorm's variables and
        values, a closed-form backward on CPU), `act`;
        `dropout_rate` for the pre-activation nets (e.g. 0.3 for wide_resnet28_10).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")
    network = MODELS[name].func  # nested functools.partials flatten: this is the class
    unknown = set(options) - set(network.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for create_model({name!r})")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")
    # XLA:CPU's convolutions are several times slower than the same math as matmuls in a ResNet train
    # step (benchmarks/README.md); the parameters are identical either way.
    options.setdefault("conv", default_conv())
    options.setdefault("max_pool", default_max_pool())
    options.setdefault("batch_norm", default_batch_norm())
    return MODELS[name](num_classes=num_classes, **options)
