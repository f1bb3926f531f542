"""How big the segmentation model is before training: parameters, MACs per image and output shapes by part.

The trainer logs this at the start of a segmentation run in place of the classifier's summary (which would list
an `fc` the segmenter does not have): the backbone's stem and stages, then the FPN neck and the head. Shapes come
from `jax.eval_shape` and MACs from `resnet_jax.summary.count_macs` over the traced eval forward pass, with
flax's `nn.Conv` (the same convention as `python -m resnet_jax.summary`: the architecture's count, not the
backend's). Nothing is compiled or computed on data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from flax import traverse_util

from resnet_jax import summary
from resnet_jax.dense import fpn
from resnet_jax.dense import task as dense_task

BACKBONE_PARTS = ("stem", "stage1", "stage2", "stage3", "stage4", "final_norm")


def summarize_segmenter(
    config: ml_collections.ConfigDict, num_classes: int
) -> dict[str, dict[str, Any]]:
    """`{part: {"params": int, "macs": int, "shape": tuple}}` for each part, stem first, then fpn and head,
    plus `"total": {"params", "macs", "batch_stats"}` for `config`'s segmenter at `config.image_size`."""
    model = dense_task.create_model_from_config(config, num_classes, conv=nn.Conv)
    size = config.image_size
    image = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)

    def forward(variables: Any, x: jax.Array) -> jax.Array:
        return model.apply(variables, x, train=False)

    def backbone_features(variables: Any, x: jax.Array) -> dict[str, jax.Array]:
        return model.apply(variables, x, method=lambda m, y: m.backbone(y, features=True))

    features = jax.eval_shape(backbone_features, variables, image)
    levels = fpn.stage_names(features)
    finest = features[levels[0]].shape[1:3]
    shapes = {name: tuple(value.shape[1:]) for name, value in features.items()}
    shapes["fpn"] = (
        f"{len(levels)} x {(*finest, config.fpn_channels)}"  # levels, the finest's shape
    )
    shapes["head"] = tuple(jax.eval_shape(forward, variables, image).shape[1:])

    params: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(variables["params"], sep="/").items():
        part = summary_part(path)
        params[part] = params.get(part, 0) + math.prod(leaf.shape)
    macs = summary.count_macs(forward, variables, image)
    parts = [p for p in (*BACKBONE_PARTS, "fpn", "head") if p in params or p in macs]
    result = {
        part: {"params": params.get(part, 0), "macs": macs.get(part, 0), "shape": shapes.get(part)}
        for part in parts
    }
    batch_stats = variables.get("batch_stats", {})
    result["total"] = {
        "params": sum(params.values()),
        "macs": sum(macs.values()),
        "batch_stats": sum(math.prod(x.shape) for x in jax.tree.leaves(batch_stats)),
    }
    return result


def summary_part(path: str) -> str:
    """The part a parameter path belongs to: `backbone/stage2/...` -> `stage2`, `fpn/...` -> `fpn`."""
    top, _, rest = path.partition("/")
    if top in ("fpn", "head"):
        return top
    component = rest.split("/")[0]
    return "stem" if component.startswith("stem") else component.split("_")[0]


def format_segmenter_summary(
    config: ml_collections.ConfigDict, num_classes: int, sizes: dict[str, dict[str, Any]]
) -> str:
    """The report the trainer logs: totals, then one row per part (FPN: its levels x the finest's shape)."""
    total = sizes["total"]
    backbone = sum(v["params"] for k, v in sizes.items() if k in BACKBONE_PARTS)
    lines = [
        f"FPN segmenter on {config.model}: {total['params']:,} parameters "
        f"({total['params'] / 1e6:.2f} M: backbone {backbone:,}, FPN {sizes['fpn']['params']:,}, "
        f"head {sizes['head']['params']:,}), {total['batch_stats']:,} BatchNorm statistics",
        f"input per image: {config.image_size}x{config.image_size}x3, {num_classes} classes per pixel",
        f"MACs per image: {total['macs'] / 1e6:.2f} M (convolutions; FLOPs = 2 x MACs)",
        "",
    ]
    header = f"{'part':<10} {'output shape':<24} {'params':>12} {'MACs':>15}"
    lines += [header, "-" * len(header)]
    for part, row in sizes.items():
        if part != "total":
            shape = str(row["shape"]) if row["shape"] else "-"
            lines.append(f"{part:<10} {shape:<24} {row['params']:>12,} {row['macs']:>15,}")
    return "\n".join(lines)


def log_run_model_summary(
    config: ml_collections.ConfigDict,
    image_size: int,
    num_classes: int,
    log: Callable[[str], None],
) -> None:
    """The trainer's model summary for `config.task`: the segmenter's parts for "segmentation", else the
    classifier's (`resnet_jax.summary.log_model_summary`), logged line by line."""
    if config.task != "segmentation":
        summary.log_model_summary(config.model, image_size, num_classes, log=log)
        return
    text = format_segmenter_summary(config, num_classes, summarize_segmenter(config, num_classes))
    for line in text.splitlines():
        log(line)
