"""What a run starts from: its sizes, its model, its optimizer and its first state.

`training.train_and_evaluate` calls these in order; each is a function of the config (and what the
previous ones returned), so a notebook can build the same pieces without running the loop.

`config.task` picks the model and what fine-tuning keeps: a classifier (a new `fc` head), or
`resnet_jax.dense`'s segmentation model (the classifier's backbone under a new FPN neck and head).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from resnet_jax import data, finetune, optim
from resnet_jax.checkpoint import load_variables
from resnet_jax.checkpoint.checkpointer import IncompatibleCheckpointError, TrainingCheckpointer
from resnet_jax.checkpoint.resume import NoUsableCheckpointError, restore_newest_usable
from resnet_jax.config import ConfigError, to_json
from resnet_jax.dense import metrics as dense_metrics
from resnet_jax.dense import pretrained as dense_pretrained
from resnet_jax.dense import task as dense_task
from resnet_jax.metrics import Summarize, non_finite_paths
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel
from resnet_jax.steps import summarize_eval
from resnet_jax.train_state import TrainState, create_train_state, init_variables
from resnet_jax.tree_diff import diff_variables

# The full path lists of an init_from mismatch, when longer than the error shows.
INIT_FROM_MISMATCH_REPORT = "init_from_mismatch.txt"

_log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_segmentation(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains `resnet_jax.dense`'s segmentation model (else a classifier)."""
    return config.task == "segmentation"


def create_model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model the step applies: synced BN means BatchNorm reduces over the `data` axis."""
    if is_segmentation(config):
        return dense_task.create_model_from_config(config, num_classes)
    return create_model(
        config.model,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        zero_init_residual=config.zero_init_residual,
        bn_axis_name=DATA_AXIS if config.bn_sync else None,
        **finetune.model_options(config.finetune_mode),
        # Only networks with dropout take the option.
        **({"dropout_rate": config.dropout_rate} if config.dropout_rate > 0 else {}),
    )


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The sizes of a run, derived once from the config, the dataset and the devices."""

    info: data.DatasetInfo
    local_batch_size: int  # this process's rows of each global train batch
    local_eval_batch_size: int
    steps_per_epoch: int
    num_steps: int
    eval_every: int
    checkpoint_every: int


def plan_run(config: ml_collections.ConfigDict, data_parallel: DataParallel) -> RunPlan:
    """Reads the dataset's sizes and checks that the batch sizes fit the devices and the data."""
    info = data.dataset_info(config)
    try:
        local_batch_size = data_parallel.check_batch_size(config.batch_size)
        local_eval_batch_size = data_parallel.check_batch_size(
            config.eval_batch_size or config.batch_size
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    steps_per_epoch = info.num_train_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {info.num_train_examples} training "
            "examples; lower it"
        )
    return RunPlan(
        info=info,
        local_batch_size=local_batch_size,
        local_eval_batch_size=local_eval_batch_size,
        steps_per_epoch=steps_per_epoch,
        num_steps=optim.total_train_steps(config, steps_per_epoch),
        eval_every=config.eval_every_steps or steps_per_epoch,
        checkpoint_every=config.checkpoint_every_steps or steps_per_epoch,
    )


@dataclasses.dataclass(frozen=True)
class Optimization:
    """What the train step needs to update parameters: the schedule, the optimizer and what trains."""

    learning_rate_fn: optax.Schedule
    tx: optax.GradientTransformation
    trainable_mask: Any  # None: every parameter trains (see finetune.trainable_mask)


def create_optimization(
    config: ml_collections.ConfigDict, model: nn.Module, plan: RunPlan
) -> Optimization:
    """The learning-rate schedule and optimizer of `config`, with fine-tuning's parameter groups."""
    try:
        learning_rate_fn = optim.create_learning_rate_schedule(config, plan.steps_per_epoch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.finetune_mode == "full" and config.backbone_lr_multiplier == 1.0:
        return Optimization(
            learning_rate_fn, optim.create_optimizer(config, learning_rate_fn), None
        )
    # Head vs backbone groups, from the params' structure (eval_shape: no compute).
    abstract = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(config.seed), plan.info.image_size)
    )
    groups = dense_pretrained.param_groups if is_segmentation(config) else finetune.param_groups
    labels = groups(abstract["params"])
    multipliers = finetune.lr_multipliers(config.finetune_mode, config.backbone_lr_multiplier)
    tx = optim.create_optimizer(
        config, learning_rate_fn, param_labels=labels, lr_multipliers=multipliers
    )
    return Optimization(learning_rate_fn, tx, finetune.trainable_mask(labels, multipliers))


def eval_summary(config: ml_collections.ConfigDict) -> Summarize:
    """What turns the eval step's accumulated sums into the task's metrics (`metrics.evaluate`)."""
    return dense_metrics.summarize_dense_eval if is_segmentation(config) else summarize_eval


def state_to_save(data_parallel: DataParallel, state: TrainState) -> TrainState:
    """What the checkpoint holds: shard_map's replicated global arrays as they are (Orbax writes each
    shard once); pmap's stacked per-device copies reduced to one host copy."""
    return state if data_parallel.parallelism == "shard_map" else data_parallel.unreplicate(state)


def _write_full_mismatch(
    config: ml_collections.ConfigDict, path: str, fresh_variables: dict[str, Any], message: str
) -> None:
    """The mismatch message with every path listed (the error shows `MAX_LISTED` per kind)."""
    pretrained, _ = load_variables(config.init_from)
    head_names = finetune.DEFAULT_HEAD_NAMES
    if is_segmentation(config):  # the classifier's modules as the segmentation model names them
        pretrained = dense_pretrained.backbone_variables_from_classifier(pretrained)
        head_names = dense_pretrained.HEAD_NAMES
    diff = diff_variables(
        fresh_variables, pretrained, ignore=lambda path: path.split("/")[1] in head_names
    )
    lines = message.splitlines()
    hint = lines[1].removeprefix("hint: ") if lines[1].startswith("hint: ") else ""
    full = diff.format(
        lines[0].rsplit(": ", 1)[0],
        hint,
        missing_title="missing from the checkpoint",
        unexpected_title="unexpected (in the checkpoint, not in the model)",
        max_listed=1 << 30,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(full + "\n")


def _start_from_pretrained(
    config: ml_collections.ConfigDict,
    data_parallel: DataParallel,
    state: TrainState,
    tx: Any,
    workdir: str,
) -> TrainState:
    """Step 0 with `config.init_from`'s backbone under `state`'s fresh classifier, a new optimizer state."""
    fresh = data_parallel.unreplicate(state)
    fresh_variables = {"params": fresh.params, "batch_stats": fresh.batch_stats}
    load = (
        dense_pretrained.load_pretrained_backbone
        if is_segmentation(config)
        else finetune.load_pretrained
    )
    try:
        variables, metadata = load(fresh_variables, config.init_from, model_name=config.model)
    except FileNotFoundError as e:
        raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
    except finetune.CheckpointMismatchError as e:
        message = f"config.init_from={config.init_from!r}: {e}"
        if re.search(r"^  \.\.\. \d+ more$", str(e), re.MULTILINE):
            path = os.path.join(workdir, INIT_FROM_MISMATCH_REPORT)
            if jax.process_index() == 0:
                _write_full_mismatch(config, path, fresh_variables, str(e))
            message += f"\nthe full lists: {path}"
        raise ConfigError(message) from None
    _log.info(
        "fine-tuning (%s) from %s (%s, %s classes, step %s): backbone restored, new %s",
        config.finetune_mode,
        config.init_from,
        metadata.get("model"),
        metadata.get("num_classes"),
        metadata.get("step", "-"),
        "FPN neck and segmentation head" if is_segmentation(config) else "classifier",
    )
    # Merged on the host and placed with `replicate`: inside `init_state`'s jit the pretrained arrays
    # would become constants of the compiled program.
    return data_parallel.replicate(
        jax.device_get(create_train_state(variables, tx, use_ema=config.ema_decay > 0))
    )


def initial_state(
    config: ml_collections.ConfigDict,
    data_parallel: DataParallel,
    model: nn.Module,
    tx: optax.GradientTransformation,
    plan: RunPlan,
    checkpointer: TrainingCheckpointer,
    train_iter: Any,
) -> TrainState:
    """The state to start from: the newest usable checkpoint, else `init_from`'s
    backbone (only on a fresh start: a resumed fine-tune continues from its own checkpoint), else new."""

    def init_state() -> TrainState:
        # The "rbg" generator: compiling model.init with the default threefry is several times slower,
        # one threefry per kernel. Same distributions; the stream is deterministic for a seed on a given
        # backend (not guaranteed identical across backends).
        rng = jax.random.key(config.seed, impl="rbg")
        variables = init_variables(model, rng, plan.info.image_size)
        return create_train_state(variables, tx, use_ema=config.ema_decay > 0)

    state = data_parallel.init_state(init_state)
    try:
        resumed = restore_newest_usable(
            checkpointer,
            state_to_save(data_parallel, state),
            train_iter,
            config=to_json(config),
            check=_non_finite_problem,
        )
    except (IncompatibleCheckpointError, NoUsableCheckpointError) as e:
        raise ConfigError(str(e)) from None
    if resumed is not None:
        _, restored = resumed
        return (
            restored
            if data_parallel.parallelism == "shard_map"
            else data_parallel.replicate(restored)
        )
    if config.init_from:
        workdir = os.path.dirname(checkpointer.directory)
        return _start_from_pretrained(config, data_parallel, state, tx, workdir)
    return state


def _non_finite_problem(state: TrainState) -> str | None:
    """Why a restored state cannot be trained from (a checkpoint written before saves were checked)."""
    if bad := non_finite_paths(state):
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"non-finite values in {', '.join(bad[:3])}{more}"
    return None
