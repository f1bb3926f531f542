"""The segmentation task's pieces for the shared trainer, as functions of the config.

`training.py` and `run_setup.py` dispatch on `config.task == "segmentation"` to these (the integration plan);
each mirrors its classification counterpart so the loop, checkpoints, metrics and curves stay one copy:
the model (`create_model_from_config`), the compiled steps (`compile_steps`), the sources
(`canvas_source`), the batch of records (`collate`), eval summaries (`summarize_eval`) and the picture
(`write_predictions_png`).

Config keys read beyond the classification ones: fpn_channels, head_channels, head_norm, canvas_size,
canvas_digit_sizes, canvas_train_examples, canvas_eval_examples.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import finetune
from resnet_jax.dense import canvases, figures, metrics
from resnet_jax.dense import steps as dense_steps
from resnet_jax.dense.fpn import SegmentationModel
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel

TASKS = ("classification", "segmentation")
CANVASES = "digit_canvases"  # the dataset name of resnet_jax.dense.canvases
CANVAS_SEED = (
    0  # the canvases are a fixed dataset: the training seed shuffles them, never redraws them
)


def create_model_from_config(
    config: ml_collections.ConfigDict, num_classes: int, conv: Any = None
) -> SegmentationModel:
    """The FPN segmentation model on `config.model` (headless), BN options as `run_setup` gives a classifier.

    `conv`: the conv implementation of backbone, neck and head (None: `resnet_jax.conv.default_conv()`).
    """
    axis_name = DATA_AXIS if config.bn_sync else None
    dtype = jnp.dtype(config.dtype)
    backbone = create_model(
        config.model,
        num_classes=0,
        dtype=dtype,
        zero_init_residual=config.zero_init_residual,
        bn_axis_name=axis_name,
        **({} if conv is None else {"conv": conv}),
        **finetune.model_options(config.finetune_mode),
    )
    return SegmentationModel(
        backbone=backbone,
        num_classes=num_classes,
        fpn_channels=config.fpn_channels,
        head_channels=config.head_channels,
        head_norm=config.head_norm,
        dtype=dtype,
        bn_axis_name=axis_name,
        conv=conv,
    )


def compile_steps(
    config: ml_collections.ConfigDict,
    data_parallel: DataParallel,
    model: SegmentationModel,
    *,
    tx: Any,
    learning_rate_fn: Callable,
    trainable_mask: Any,
) -> tuple[Callable, dict[str, Callable]]:
    """As `training.compile_steps`: the train step (donating the state) and eval steps by metric prefix."""
    train_fn = data_parallel.compile(
        functools.partial(
            dense_steps.train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=learning_rate_fn,
            ema_decay=config.ema_decay,
            trainable_mask=trainable_mask,
            axis_name=DATA_AXIS,
        ),
        donate_state=True,
    )
    prefixes = {"eval": False, **({"eval_ema": True} if config.ema_decay > 0 else {})}
    eval_fns = {
        prefix: data_parallel.compile(
            functools.partial(
                dense_steps.eval_step,
                apply_fn=model.apply,
                num_classes=model.num_classes,
                use_ema=use_ema,
                axis_name=DATA_AXIS,
            ),
            donate_state=False,
        )
        for prefix, use_ema in prefixes.items()
    }
    return train_fn, eval_fns


def canvas_source(config: ml_collections.ConfigDict, split: str) -> canvases.DigitCanvases:
    """The canvases of `split` ("train", "validation", "test") as the config sizes them."""
    count = config.canvas_train_examples if split == "train" else config.canvas_eval_examples
    return canvases.DigitCanvases(
        split,
        count,
        seed=CANVAS_SEED,
        canvas_size=config.canvas_size,
        digit_sizes=tuple(config.canvas_digit_sizes),
    )


def collate(
    records: Sequence[dict[str, Any]],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Records -> `{'image': float32 normalized (B, H, W, 3), 'label': int32 (B, H, W), 'mask': (B,)}`.

    With `batch_size` larger than the records (an eval split's last batch), zero rows with mask 0 fill it.
    """
    batch_size = batch_size or len(records)
    side = records[0]["label"].shape
    images = np.zeros((batch_size, *side, 3), np.float32)
    labels = np.zeros((batch_size, *side), np.int32)
    mask = np.zeros((batch_size,), np.float32)
    scale = np.asarray(std, np.float32) * 255.0
    for row, record in enumerate(records):
        images[row] = (record["image"].astype(np.float32) - np.asarray(mean) * 255.0) / scale
        labels[row] = record["label"]
        mask[row] = 1.0
    return {"image": images, "label": labels, "mask": mask}


def summarize_eval(batch_sums: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fetched per-batch eval sums -> loss, pixel_accuracy, mean_iou over the split (int64/float64 totals)."""
    return metrics.summarize_dense_eval(metrics.accumulate(batch_sums))


def write_predictions_png(
    workdir: str,
    model: SegmentationModel,
    variables: dict[str, Any],
    source: canvases.DigitCanvases,
    mean: Sequence[float],
    std: Sequence[float],
    count: int = 6,
) -> str:
    """`<workdir>/predictions.png` for the first `count` canvases of `source`, predicted on one device
    with host `variables` (`{'params', 'batch_stats'}`); returns its path."""
    records = [source[i] for i in range(min(count, len(source)))]
    batch = collate(records, mean, std)
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, batch["image"])
    predictions = np.asarray(jnp.argmax(logits, axis=-1))
    path = os.path.join(workdir, figures.PREDICTIONS_FILENAME)
    figures.write_predictions(
        path,
        np.stack([r["image"] for r in records]),
        batch["label"],
        predictions,
        model.num_classes,
    )
    return path
