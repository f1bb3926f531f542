"""Pre-activation ResNets (He et al. 2016b, "Identity Mappings"): timm's ResNetV2 and BiT, and Wide ResNets.

Each block normalizes and activates its input first (norm -> act -> conv, three times in a bottleneck) and
adds the raw input back; the projection shortcut reads the pre-activated input. A final norm + act precedes
the pooling. The norm is BatchNorm (timm `resnetv2_*`, the WRN paper) or GroupNorm(32) with
weight-standardized convs (BiT, Kolesnikov et al. 2020), which keeps no `batch_stats` at all.

Module names follow the v1 models' (`stem_conv`, `stage2_block1/conv2`, `downsample_conv`, `fc`), with
`norm1..3` for the pre-activation norms and `final_norm` before the pooling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.layers import (
    check_nhwc,
    conv_kernel_init,
    pad,
    pool_and_classify,
    weight_standardized,
)
from resnet_jax.pooling import MaxPool, flax_max_pool

ModuleDef = Any
Dtype = Any

# timm's BiT convs (StdConv2d(eps=1e-8)) and its GroupNormAct (eps=1e-5); StdConv2d's own default eps is 1e-6.
WEIGHT_STANDARDIZATION_EPSILON = 1e-8
GROUP_NORM_EPSILON = 1e-5


class PreActBasicBlock(nn.Module):
    """norm-act-conv3x3, norm-act-(dropout)-conv3x3: timm's `PreActBasic`, the WRN paper's wide block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    dropout: ModuleDef
    strides: int = 1
    zero_init_residual: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        preact = self.act(self.norm(name="norm1")(x))
        shortcut = _shortcut(self, x, preact)
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), s, pad(1), name="conv1")(preact)
        y = self.dropout()(self.act(self.norm(name="norm2")(y)))
        last_init = nn.initializers.zeros if self.zero_init_residual else conv_kernel_init
        y = self.conv(self.filters, (3, 3), (1, 1), pad(1), kernel_init=last_init, name="conv2")(y)
        return y + shortcut


class PreActBottleneck(nn.Module):
    """norm-act-conv1x1, norm-act-conv3x3 (strided), norm-act-conv1x1 (x4): timm's `PreActBottleneck`."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    dropout: ModuleDef
    strides: int = 1
    zero_init_residual: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        preact = self.act(self.norm(name="norm1")(x))
        shortcut = _shortcut(self, x, preact)
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (1, 1), (1, 1), pad(0), name="conv1")(preact)
        y = self.act(self.norm(name="norm2")(y))
        y = self.conv(self.filters, (3, 3), s, pad(1), name="conv2")(y)
        y = self.act(self.norm(name="norm3")(y))
        last_init = nn.initializers.zeros if self.zero_init_residual else conv_kernel_init
        out = self.filters * self.expansion
        y = self.conv(out, (1, 1), (1, 1), pad(0), kernel_init=last_init, name="conv3")(y)
        return y + shortcut


def _shortcut(block: nn.Module, x: jax.Array, preact: jax.Array) -> jax.Array:
    """The identity, or a 1x1 (strided) conv of the pre-activated input when the shape changes."""
    out_channels = block.filters * block.expansion
    if block.strides == 1 and x.shape[-1] == out_channels:
        return x
    s = (block.strides, block.strides)
    return block.conv(out_channels, (1, 1), s, pad(0), name="downsample_conv")(preact)


class PreActResNet(nn.Module):
    """One pre-activation network for every variant; norm kind, stem and widths are fields, conv/act injected.

    `__call__(x, train, features)` as `resnet_jax.models.ResNet`: logits, pooled features (`num_classes=0`),
    or with `features=True` the dict `stem`, `stage1`.. (raw stage outputs, before the final norm),
    `pooled` (after the final norm + act), `logits`. Training with `dropout_rate > 0` needs a 'dropout' rng.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    stem: str = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool; "bit": zero-padded pool; "cifar": 3x3/1
    norm: str = "batch"  # or "group": GroupNorm(32) + weight-standardized convs (BiT)
    dropout_rate: float = 0.0  # between the two convs of a basic block (the WRN paper's)
    zero_init_residual: bool = False  # each block's last conv starts at 0 (timm's zero_init_last)
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
        conv = self.conv
        if self.norm == "group":
            conv = weight_standardized(conv, WEIGHT_STANDARDIZATION_EPSILON)
        conv = functools.partial(
            conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_kernel_init,
        )
        norm = self._norm(train)
        dropout = functools.partial(nn.Dropout, self.dropout_rate, deterministic=not train)

        outputs = {}
        if self.stem == "cifar":
            x = conv(self.stem_width, (3, 3), (1, 1), pad(1), name="stem_conv")(x)
        elif self.stem in ("imagenet", "bit"):
            # No norm in the stem: the first block's norm1 pre-activates it.
            x = conv(self.stem_width, (7, 7), (2, 2), pad(3), name="stem_conv")(x)
            if self.stem == "bit":
                # BiT pads with zeros, then pools without padding (timm's stem_type="fixed").
                x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
                x = self.max_pool(x, 3, 2, 0)
            else:
                x = self.max_pool(x, 3, 2, 1)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected 'imagenet', 'bit' or 'cifar'")
        outputs["stem"] = x

        for stage, (num_blocks, filters) in enumerate(
            zip(self.stage_sizes, self.stage_widths, strict=True)
        ):
            for block in range(num_blocks):
                x = self.block_cls(
                    filters=filters,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    dropout=dropout,
                    strides=2 if stage > 0 and block == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
            outputs[f"stage{stage + 1}"] = x

        x = self.act(norm(name="final_norm")(x))
        x = pool_and_classify(x, self.num_classes, self.dtype, outputs)
        return outputs if features else x

    def _norm(self, train: bool) -> ModuleDef:
        # Statistics and the normalization stay in float32 whatever the compute dtype.
        if self.norm == "group":
            # use_fast_variance=False: E[(x - mean)^2], as torch computes it, not E[x^2] - mean^2.
            return functools.partial(
                nn.GroupNorm,
                num_groups=32,
                epsilon=GROUP_NORM_EPSILON,
                use_fast_variance=False,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
            )
        if self.norm == "batch":
            # momentum 0.9 here is torch's momentum=0.1 (models.ResNet says why).
            return functools.partial(
                self.batch_norm,
                use_running_average=not train or self.bn_frozen,
                momentum=0.9,
                epsilon=1e-5,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                axis_name=self.bn_axis_name if train and not self.bn_frozen else None,
            )
        raise ValueError(f"unknown norm {self.norm!r}; expected 'batch' or 'group'")
