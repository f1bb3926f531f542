"""timm's state-dict names for the variants torchvision does not define, and which of them some weights are.

timm's `ResNet` class (resnet*d, seresnet*) keeps torchvision's names and adds a few; its `ResNetV2` class
(resnetv2_*, BiT) names everything anew:

  timm ResNet (v1)                          resnet_jax
  conv1.0 / .1 / .3 / .4 / .6, bn1          stem_conv1 / stem_bn1 / stem_conv2 / stem_bn2 / stem_conv3, stem_bn
  layer{S}.{B}.downsample.1 / .2 (avg)      stage{S}_block{B+1}/downsample_conv / downsample_bn (.0 is the pool)
  layer{S}.{B}.se.fc1 / fc2 (1x1 convs)     stage{S}_block{B+1}/se/fc1 / fc2

  timm ResNetV2                             resnet_jax (models_v2.PreActResNet)
  stem.conv                                 stem_conv
  stages.{S-1}.blocks.{B}.norm{K}/conv{K}   stage{S}_block{B+1}/norm{K} / conv{K}
  stages.{S-1}.blocks.{B}.downsample.conv   stage{S}_block{B+1}/downsample_conv
  norm                                      final_norm
  head.fc (a 1x1 conv: (out, in, 1, 1))     fc (a Dense: (in, out))

Everything else (leaf names, OIHW <-> HWIO) is as for torchvision (`mapping.py`). GroupNorm's weight/bias map to
scale/bias like BatchNorm's, and BiT has no running statistics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_jax.models import TIMM_MODELS, Bottleneck, create_model
from resnet_jax.models_v2 import PreActResNet

DEEP_STEM_TO_TORCH = {
    "stem_conv1": "conv1.0",
    "stem_bn1": "conv1.1",
    "stem_conv2": "conv1.3",
    "stem_bn2": "conv1.4",
    "stem_conv3": "conv1.6",
}
# timm's avg-pool shortcut is Sequential(pool, conv, bn): the pool, parameter-free, takes index 0.
AVG_POOL_SHORTCUT_TO_TORCH = {"downsample_conv": "downsample.1", "downsample_bn": "downsample.2"}

_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_V2_MODULES = {
    "stem_conv": "stem.conv",
    "final_norm": "norm",
    "fc": "head.fc",
    "downsample_conv": "downsample.conv",
}
_V2_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Rank of each name within its parent in timm's ResNetV2 registration (= state_dict) order.
RESNETV2_ORDER = {
    name: rank
    for rank, name in enumerate(
        "stem conv stages blocks downsample norm1 conv1 norm2 conv2 norm3 conv3 norm head fc "
        "weight bias running_mean running_var num_batches_tracked".split()
    )
}


def resnetv2_key(collection: str, path: Sequence[str]) -> str:
    """timm ResNetV2's state-dict key of one resnet_jax leaf, e.g.
    `('params', ('stage1_block1', 'downsample_conv', 'kernel'))` -> `'stages.0.blocks.0.downsample.conv.weight'`."""
    *modules, leaf = path
    parts = []
    for module in modules:
        block = _BLOCK.fullmatch(module)
        if block:
            parts.append(f"stages.{int(block.group(1)) - 1}.blocks.{int(block.group(2)) - 1}")
        else:
            parts.append(_V2_MODULES.get(module, module))
    parts.append(_V2_LEAVES.get((collection, leaf), leaf))
    return ".".join(parts)


def _blocks_per_stage(
    shapes: Mapping[str, Sequence[int]], pattern: str, first: int
) -> tuple[int, ...]:
    sizes = []
    for stage in range(first, first + 4):
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(pattern.format(stage), k))}
        sizes.append(max(blocks) + 1 if blocks else 0)
    return tuple(sizes)


def structure(shapes: Mapping[str, Sequence[int]]) -> dict[str, object] | None:
    """What the keys say about a timm variant's structure, as resnet_jax model fields, or None for a plain
    torchvision-layout ResNet (which `mapping.infer_architecture` reads itself)."""
    if "stem.conv.weight" in shapes:
        return {
            "family": "v2",
            "stage_sizes": _blocks_per_stage(shapes, r"stages\.{}\.blocks\.(\d+)\.", first=0),
            # BiT's GroupNorm keeps no running statistics.
            "norm": "batch" if "norm.running_mean" in shapes else "group",
        }
    deep = "conv1.0.weight" in shapes
    squeeze_excite = any(".se.fc1." in key for key in shapes)
    avg_pool = any(re.match(r"layer\d\.0\.downsample\.2\.", key) for key in shapes)
    if not (deep or squeeze_excite or avg_pool):
        return None
    return {
        "family": "v1",
        "stage_sizes": _blocks_per_stage(shapes, r"layer{}\.(\d+)\.", first=1),
        "stem": "deep" if deep else "imagenet",
        "shortcut": "avg_pool" if avg_pool else "projection",
        "squeeze_excite": squeeze_excite,
        "bottleneck": "layer1.0.conv3.weight" in shapes,
    }


def infer_variant(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The name in `TIMM_MODELS` whose fields match what the keys say (`structure`), or None."""
    found = structure(shapes)
    if found is None:
        return None
    for name in TIMM_MODELS:
        model = create_model(name, num_classes=0)  # an unbound dataclass: no parameters are built
        if tuple(model.stage_sizes) != found["stage_sizes"]:
            continue
        if isinstance(model, PreActResNet) != (found["family"] == "v2"):
            continue
        fields: dict[str, Any] = (
            {"norm": model.norm}
            if isinstance(model, PreActResNet)
            else {
                "stem": model.stem,
                "shortcut": model.shortcut,
                "squeeze_excite": model.squeeze_excite,
                "bottleneck": model.block_cls is Bottleneck,
            }
        )
        if all(found[field] == value for field, value in fields.items()):
            return name
    return None
