"""A classification checkpoint as a segmentation model's backbone, and the two parameter groups.

A classifier's variables are `{'params': {'stem_conv': ..., 'stage1_block1': ..., 'fc': ...}, 'batch_stats': ...}`;
a `SegmentationModel`'s are the same modules under `backbone` (no `fc`), plus the new `fpn` and `head`. Loading
is therefore a prefix mapping followed by `finetune.merge_pretrained` with the neck and head as the fresh part,
which checks every backbone path and shape and reports all mismatches in one error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from resnet_jax import finetune
from resnet_jax.checkpoint import load_variables

Variables = dict[str, Any]
PyTree = Any

BACKBONE = "backbone"  # the module name of the backbone inside SegmentationModel
HEAD_NAMES = ("fpn", "head")  # new when fine-tuning from a classifier: finetune's "head" group
COLLECTIONS = ("params", "batch_stats")


def backbone_variables_from_classifier(
    variables: Mapping[str, Any], classifier_names: Sequence[str] = finetune.DEFAULT_HEAD_NAMES
) -> Variables:
    """A classifier's `{'params', 'batch_stats'}` under the `backbone` prefix, its classifier (`fc`) dropped."""
    return {
        collection: {
            BACKBONE: {
                name: value
                for name, value in (variables.get(collection) or {}).items()
                if name not in classifier_names
            }
        }
        for collection in COLLECTIONS
    }


def classifier_variables_from_segmentation(variables: Mapping[str, Any]) -> Variables:
    """The reverse: a segmentation model's backbone as a headless classifier's variables (`num_classes=0`)."""
    return {
        collection: dict((variables.get(collection) or {}).get(BACKBONE, {}))
        for collection in COLLECTIONS
    }


def merge_pretrained_backbone(
    init_variables: Mapping[str, Any],
    classifier_variables: Mapping[str, Any],
    *,
    pretrained_name: str | None = None,
    model_name: str | None = None,
) -> Variables:
    """The segmentation model's variables with the classifier's backbone and a fresh neck and head.

    Raises `finetune.CheckpointMismatchError` listing every backbone path that is missing, unexpected or
    mis-shaped (e.g. a checkpoint of another architecture).
    """
    return finetune.merge_pretrained(
        init_variables,
        backbone_variables_from_classifier(classifier_variables),
        head_names=HEAD_NAMES,
        pretrained_name=pretrained_name,
        model_name=model_name,
    )


def load_pretrained_backbone(
    init_variables: Mapping[str, Any], path: str, *, model_name: str | None = None
) -> tuple[Variables, dict[str, Any]]:
    """`merge_pretrained_backbone` of the classification checkpoint at `path` (a training workdir of ours or
    a `python -m resnet_jax.convert` checkpoint): `(variables, metadata)`."""
    pretrained, metadata = load_variables(path)
    variables = merge_pretrained_backbone(
        init_variables,
        pretrained,
        pretrained_name=metadata.get("model"),
        model_name=model_name,
    )
    return variables, metadata


def param_groups(params: PyTree) -> PyTree:
    """A tree like `params` with leaves "backbone" or "head" (the neck and head), for `finetune.lr_multipliers`
    (backbone LR multiplier, a frozen backbone) and `optim.create_optimizer(param_labels=...)`."""
    return finetune.param_groups(params, head_names=HEAD_NAMES)
