"""The segmentation task's pieces for the shared trainer, as functions of the config.

`training.py` and `run_setup.py` dispatch on `config.task == "segmentation"` to these (the integration plan);
each mirrors its classification counterpart so the loop, checkpoints, metrics and curves stay one copy:
the model (`create_model_from_config`), the compiled steps (`compile_steps`) and the picture
(`write_predictions_png`). The canvases are the data pipeline's dataset "digit_canvases" (read with the
trainer's own order, sharding, resume and eval masks), and the eval sums are summarized by
`dense.metrics.summarize_dense_eval` after `resnet_jax.metrics.accumulate`, as classification's are.

Config keys read beyond the classification ones: fpn_channels, head_channels, head_norm; the data pipeline
reads canvas_digit_sizes, canvas_train_examples, canvas_eval_examples (canvas_size = image_size).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import data, finetune
from resnet_jax.dense import figures
from resnet_jax.dense import steps as dense_steps
from resnet_jax.dense.fpn import SegmentationModel
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel


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


def write_predictions_png(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: SegmentationModel,
    variables: dict[str, Any],
    count: int = 6,
) -> str:
    """`<workdir>/predictions.png` for the first `count` validation canvases, as the trainer's eval reads
    them (`data.create_eval_batches`), predicted on one device with host `variables` (`{'params',
    'batch_stats'}`); returns its path."""
    batch = next(
        data.create_eval_batches(config, process_index=0, process_count=1, local_batch_size=count)
    )
    shown = int(batch["mask"].sum())
    source = data.dataset_spec(config).source("eval")
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, batch["image"][:shown])
    path = os.path.join(workdir, figures.PREDICTIONS_FILENAME)
    figures.write_predictions(
        path,
        np.stack([source[i]["image"] for i in range(shown)]),
        batch["label"][:shown],
        np.asarray(jnp.argmax(logits, axis=-1)),
        model.num_classes,
    )
    return path
