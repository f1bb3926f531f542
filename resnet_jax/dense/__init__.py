"""Dense prediction on ResNet backbones: an FPN segmentation model, its steps and metrics, digit canvases."""

from resnet_jax.dense.canvases import DigitCanvases
from resnet_jax.dense.fpn import FPN, SegmentationHead, SegmentationModel
from resnet_jax.dense.metrics import mean_iou, summarize_dense_eval
from resnet_jax.dense.pretrained import (
    backbone_variables_from_classifier,
    classifier_variables_from_segmentation,
    load_pretrained_backbone,
    merge_pretrained_backbone,
    param_groups,
)

__all__ = [
    "FPN",
    "DigitCanvases",
    "SegmentationHead",
    "SegmentationModel",
    "backbone_variables_from_classifier",
    "classifier_variables_from_segmentation",
    "load_pretrained_backbone",
    "mean_iou",
    "merge_pretrained_backbone",
    "param_groups",
    "summarize_dense_eval",
]
