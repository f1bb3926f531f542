"""Semantic segmentation on a ResNet backbone: an FPN neck (Lin et al. 2017) and a Panoptic-FPN-style head.

`SegmentationModel` calls the backbone with `features=True` under the module name `backbone`, so its variables are
exactly a classifier's (`params/backbone/stem_conv/...`) without `fc`: a classification checkpoint maps onto them by
a prefix (`resnet_jax.dense.pretrained`). The neck reads every `stageN` output the backbone returns: C2..C5 of an
ImageNet ResNet (strides 4..32), or stage1..stage3 of a CIFAR net (strides 1, 2, 4). The head merges all levels at
the finest one and upsamples the class logits bilinearly to the input size.

Conv and norm are injected as in the backbone: the neck's and head's convs are `resnet_jax.conv.default_conv()`
(the matmul forms on CPU) and the head's norm is GroupNorm (no state; right for the small batches of dense
training) or BatchNorm with its `batch_stats`, synced over `bn_axis_name` when training.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.conv import default_conv
from resnet_jax.layers import conv_kernel_init, pad

ModuleDef = Any
Dtype = Any

HEAD_NORMS = ("group", "batch")


def stage_names(features: Mapping[str, jax.Array]) -> list[str]:
    """The backbone's stage outputs in order, finest first: `stage1`, `stage2`, ... (C2.. of the FPN papers)."""
    names = sorted(
        (name for name in features if re.fullmatch(r"stage\d+", name)), key=lambda n: int(n[5:])
    )
    if len(names) < 2:
        raise ValueError(
            f"an FPN needs at least two stage outputs from the backbone's features=True dict; got {sorted(features)}"
        )
    return names


def resize_to(x: jax.Array, height: int, width: int, method: str) -> jax.Array:
    """NHWC `x` resized to (height, width): "nearest" (the FPN's top-down path) or "bilinear" (half-pixel
    centers, torch's `align_corners=False`)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method=method)


class FPN(nn.Module):
    """Feature pyramid: a 1x1 lateral conv per stage, top-down nearest upsampling + add, a 3x3 output conv.

    Returns `{stage_name: (N, H_s, W_s, channels)}` for every stage output of the backbone (P2..P5 for C2..C5).
    With `norm=None` (the FPN paper's) the convs have biases; with a norm, each conv is followed by it.
    """

    channels: int
    conv: ModuleDef
    norm: ModuleDef | None = None

    def _conv(self, x: jax.Array, kernel: int, name: str) -> jax.Array:
        size = (kernel, kernel)
        y = self.conv(
            self.channels, size, (1, 1), pad(kernel // 2), use_bias=self.norm is None, name=name
        )(x)
        return y if self.norm is None else self.norm(name=f"{name}_norm")(y)

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        names = stage_names(features)
        laterals = {name: self._conv(features[name], 1, f"lateral_{name}") for name in names}
        merged: dict[str, jax.Array] = {}
        top_down = None
        for name in reversed(names):  # coarsest first
            x = laterals[name]
            if top_down is not None:
                x = x + resize_to(top_down, x.shape[1], x.shape[2], "nearest")
            top_down = x
            merged[name] = self._conv(x, 3, f"output_{name}")
        return {name: merged[name] for name in names}


class SegmentationHead(nn.Module):
    """Per level conv3x3-norm-act, upsampled to the finest level and summed; a 1x1 classifier, then the logits
    bilinearly upsampled to (height, width). Logits in float32 so the loss is float32 under bf16 compute."""

    num_classes: int
    channels: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, pyramid: Mapping[str, jax.Array], height: int, width: int) -> jax.Array:
        names = list(pyramid)
        finest = pyramid[names[0]]
        total = None
        for name in names:
            y = self.conv(
                self.channels, (3, 3), (1, 1), pad(1), use_bias=False, name=f"conv_{name}"
            )(pyramid[name])
            y = self.act(self.norm(name=f"norm_{name}")(y))
            y = resize_to(y, finest.shape[1], finest.shape[2], "bilinear")
            total = y if total is None else total + y
        logits = self.conv(
            self.num_classes, (1, 1), (1, 1), pad(0), use_bias=True, name="classifier"
        )(total)
        return resize_to(logits.astype(jnp.float32), height, width, "bilinear")


class SegmentationModel(nn.Module):
    """Per-pixel class logits `(N, H, W, num_classes)` from NHWC images, on a `create_model(name,
    num_classes=0, ...)` backbone (its BatchNorm options, e.g. `bn_frozen`, are the backbone's own).

    Top-level modules: `backbone`, `fpn`, `head` (`resnet_jax.dense.pretrained.HEAD_NAMES` are the last two:
    the parameter group that is new when fine-tuning from a classifier).
    """

    backbone: nn.Module
    num_classes: int
    fpn_channels: int = 64
    head_channels: int = 64
    head_norm: str = "group"  # "group": GroupNorm, no state; "batch": BatchNorm with batch_stats
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None  # the head's BatchNorm statistics synced over this axis
    conv: ModuleDef | None = None  # None: resnet_jax.conv.default_conv()

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    def _norm(self, train: bool, channels: int) -> ModuleDef:
        if self.head_norm == "group":
            # 32 groups (Wu & He 2018) when the width allows, else the largest group count dividing it.
            return functools.partial(
                nn.GroupNorm,
                num_groups=math.gcd(32, channels),
                epsilon=1e-5,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
            )
        if self.head_norm == "batch":
            # momentum 0.9 is torch's 0.1, as in the backbone (models.ResNet says why).
            return functools.partial(
                nn.BatchNorm,
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                axis_name=self.bn_axis_name if train else None,
            )
        raise ValueError(f"unknown head_norm {self.head_norm!r}; expected one of {HEAD_NORMS}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if getattr(self.backbone, "num_classes", 0) != 0:
            raise ValueError(
                "the segmentation backbone must be built without a classifier: create_model(name, num_classes=0)"
            )
        conv = functools.partial(
            self.conv or default_conv(),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_kernel_init,
        )
        features = self.backbone(x, train=train, features=True)
        pyramid = FPN(self.fpn_channels, conv, name="fpn")(features)
        logits = SegmentationHead(
            self.num_classes,
            self.head_channels,
            conv,
            self._norm(train, self.head_channels),
            name="head",
        )(pyramid, x.shape[1], x.shape[2])
        return logits
