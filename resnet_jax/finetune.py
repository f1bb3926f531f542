"""Fine-tuning: a pretrained backbone under a freshly initialized head, and how much of it trains.

`config.init_from` names a checkpoint (a training workdir of ours, or a variables checkpoint written by
`python -m resnet_jax.convert`). `load_pretrained` reads its params and batch_stats, keeps the new model's freshly
initialized classifier (`fc`, sized for the new `num_classes`), and checks every other parameter against the new
model: one error lists every missing, unexpected and mis-shaped path at once.

`config.finetune_mode` chooses what trains:

| mode           | backbone weights                 | BatchNorm statistics     | head   |
|----------------|----------------------------------|--------------------------|--------|
| "full"         | train (lr x backbone multiplier) | updated from each batch  | trains |
| "frozen_bn"    | train (lr x backbone multiplier) | frozen (running stats)   | trains |
| "linear_probe" | frozen (zero update)             | frozen (running stats)   | trains |

Frozen BatchNorm is the model option `bn_frozen=True` (normalize with the running statistics even in training),
which is what small fine-tuning batches want. Parameter groups go to `optim.create_optimizer` as a label tree
(`param_groups`) and learning-rate multipliers (`lr_multipliers`): a multiplier of 0 is `optax.set_to_zero`, so a
linear probe leaves the backbone bit-identical and keeps no optimizer state for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from resnet_jax.checkpoint import load_variables
from resnet_jax.config import FINETUNE_MODES
from resnet_jax.tree_diff import diff_variables

Variables = dict[str, Any]
PyTree = Any

HEAD = "head"
BACKBONE = "backbone"
DEFAULT_HEAD_NAMES = ("fc",)


class CheckpointMismatchError(ValueError):
    """The pretrained variables do not fit the model beyond its head; the message lists every difference."""


def _architecture_summary(params: Mapping[str, Any]) -> str:
    """'8 residual blocks per stage (2, 2, 2, 2), basic' from the module names, for the mismatch hint."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for name, module in params.items():
        if match := re.fullmatch(r"stage(\d+)_block(\d+)", name):
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block)
            bottleneck = bottleneck or "conv3" in module
    stage_sizes = tuple(blocks[s] for s in sorted(blocks))
    kind = "bottleneck" if bottleneck else "basic"
    return f"blocks per stage {stage_sizes} ({kind})"


def merge_pretrained(
    init_variables: Mapping[str, Any],
    pretrained_variables: Mapping[str, Any],
    *,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    pretrained_name: str | None = None,
    model_name: str | None = None,
) -> Variables:
    """The model's variables with every non-head params/batch_stats entry taken from `pretrained_variables`.

    Args:
      init_variables: the new model's freshly initialized `{'params', 'batch_stats'}` (arrays or
        `jax.ShapeDtypeStruct`s: only their shapes and dtypes are read where the pretrained value is used).
      pretrained_variables: `{'params', 'batch_stats'}` of the checkpoint (numpy or jax arrays).
      head_names: top-level modules that stay freshly initialized whatever the checkpoint holds (the
        classifier, sized for the new `num_classes`). `()` takes everything from the checkpoint.
      pretrained_name, model_name: architecture names, only used to word the error.

    Returns:
      `{'params', 'batch_stats'}`: pretrained backbone values (cast to the model's dtypes), fresh head.

    Raises:
      CheckpointMismatchError: listing every path the model has and the checkpoint lacks, every path the
        checkpoint has and the model lacks, and every shape that differs (outside `head_names`).
    """
    heads = set(head_names)

    def in_head(path: str) -> bool:  # "params/fc/kernel" -> is "fc" a head module?
        return path.split("/")[1] in heads

    mismatch = diff_variables(init_variables, pretrained_variables, ignore=in_head)
    if mismatch:
        model_arch = _architecture_summary(init_variables.get("params") or {})
        checkpoint_arch = _architecture_summary(pretrained_variables.get("params") or {})
        hint = ""
        if model_arch != checkpoint_arch:
            hint = (
                f"this looks like a different architecture: the checkpoint has {checkpoint_arch}, "
                f"the model {model_arch}; set config.model to the checkpoint's model"
                f"{f' ({pretrained_name!r})' if pretrained_name else ''}"
            )
        elif mismatch.misshaped and not (mismatch.missing or mismatch.unexpected):
            hint = (
                "same layout, different widths: check the model variant (e.g. wide_/resnext) "
                "and in_channels"
            )
        raise CheckpointMismatchError(
            mismatch.format(
                f"the checkpoint{f' ({pretrained_name})' if pretrained_name else ''} does not fit "
                f"the model{f' ({model_name})' if model_name else ''} beyond its head {sorted(heads)}",
                hint,
                missing_title="missing from the checkpoint",
                unexpected_title="unexpected (in the checkpoint, not in the model)",
            )
        )

    # Checked before any value is read, so abstract (ShapeDtypeStruct) init trees are fine: only their
    # dtypes are used where the pretrained value is taken.
    merged: Variables = {}
    for collection in ("params", "batch_stats"):
        fresh = traverse_util.flatten_dict(dict(init_variables.get(collection) or {}))
        pretrained = traverse_util.flatten_dict(dict(pretrained_variables.get(collection) or {}))
        merged[collection] = traverse_util.unflatten_dict(
            {
                path: leaf if path[0] in heads else np.asarray(pretrained[path], dtype=leaf.dtype)
                for path, leaf in fresh.items()
            }
        )
    return merged


def load_pretrained(
    init_variables: Mapping[str, Any],
    path: str,
    *,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    model_name: str | None = None,
    step: int | None = None,
) -> tuple[Variables, dict[str, Any]]:
    """`merge_pretrained` of the checkpoint at `path` (any kind `load_variables` reads): `(variables, metadata)`."""
    pretrained, metadata = load_variables(path, step=step)
    variables = merge_pretrained(
        init_variables,
        pretrained,
        head_names=head_names,
        pretrained_name=metadata.get("model"),
        model_name=model_name,
    )
    return variables, metadata


def param_groups(params: PyTree, head_names: Sequence[str] = DEFAULT_HEAD_NAMES) -> PyTree:
    """A tree like `params` with leaves "head" (under a top-level module in `head_names`) or "backbone"."""
    heads = set(head_names)

    def label(path: tuple[Any, ...], _: Any) -> str:
        return HEAD if str(getattr(path[0], "key", path[0])) in heads else BACKBONE

    return jax.tree_util.tree_map_with_path(label, params)


def _check_mode(mode: str) -> None:
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown finetune_mode {mode!r}; expected one of {FINETUNE_MODES}")


def lr_multipliers(mode: str, backbone_lr_multiplier: float = 1.0) -> dict[str, float]:
    """Learning-rate factor per group for `optim.create_optimizer`: 0 freezes the backbone (linear probe)."""
    _check_mode(mode)
    if backbone_lr_multiplier < 0:
        raise ValueError(f"backbone_lr_multiplier must be >= 0, got {backbone_lr_multiplier}")
    backbone = 0.0 if mode == "linear_probe" else float(backbone_lr_multiplier)
    return {HEAD: 1.0, BACKBONE: backbone}


def model_options(mode: str) -> dict[str, Any]:
    """`create_model` options for the mode: BatchNorm normalizes with its running statistics unless "full"."""
    _check_mode(mode)
    return {"bn_frozen": mode != "full"}


def trainable_mask(param_labels: PyTree, multipliers: Mapping[str, float]) -> PyTree | None:
    """A tree like the params: True where the parameter trains (its group's multiplier is not 0).

    None when every parameter trains. The train step differentiates only the True leaves, so a linear
    probe computes (and all-reduces) the head's gradient alone instead of the whole backbone's.
    """
    mask = jax.tree.map(lambda label: multipliers.get(label, 1.0) != 0.0, param_labels)
    return None if all(jax.tree.leaves(mask)) else mask
