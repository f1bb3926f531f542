"""The training loop: `train_and_evaluate(config, workdir)` wires data, model, optimizer, steps and devices.

Layering: models know nothing of training, steps.py knows nothing of devices, parallel.py knows nothing of
ResNets; this module is the only place that knows all of them. `train.py` only parses flags and calls it.

`base_config()` lists every config key the trainer, the data pipeline and checkpointing read, with its
default; recipes in `configs/` start from it and override. A key not in it is an error (a typo in a config
file or a `--config.key=value` flag must not be silently ignored).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import finetune, optim, reporting, steps
from resnet_jax.config import ConfigError, validate_config
from resnet_jax.checkpoint import TrainingCheckpointer, preemption_message
from resnet_jax.models import ResNet, create_model, list_models
from resnet_jax.parallel import DATA_AXIS, DataParallel
from resnet_jax.summary import log_model_summary
from resnet_jax.train_state import TrainState, create_train_state, init_variables

_log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model_from_config(config: ml_collections.ConfigDict, num_classes: int) -> ResNet:
    """The model the step applies: synced BN means BatchNorm reduces over the `data` axis."""
    return create_model(
        config.model,
        num_classes=num_classes,
        dtype=DTYPES[config.dtype],
        zero_init_residual=config.zero_init_residual,
        bn_axis_name=DATA_AXIS if config.bn_sync else None,
        **finetune.model_options(config.finetune_mode),
    )


def _data():
    # Imported on use: the trainer's building blocks (and their tests) do not need the input pipeline.
    from resnet_jax import data

    return data


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; nothing from that step on was saved."""


class _TrainMetrics:
    """Per-step metrics kept on the devices until they are needed, then checked and averaged on the host.

    Fetching every step would make the host wait for the devices each step; fetching only at log and
    checkpoint steps keeps the devices busy. Every step's loss and gradient norm are still checked, so a
    non-finite value is reported with the exact step that produced it.
    """

    def __init__(self, dp: DataParallel):
        self._dp = dp
        self._on_device: list[tuple[int, dict[str, jax.Array]]] = []
        self._on_host: list[tuple[int, dict[str, float]]] = []

    def append(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._on_device.append((step, metrics))

    def check_finite(self) -> None:
        """Fetches pending metrics; raises NonFiniteLossError at the first step with NaN/Inf."""
        if not self._on_device:
            return
        fetched = self._dp.fetch([m for _, m in self._on_device])
        for (step, _), metrics in zip(self._on_device, fetched, strict=True):
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                raise NonFiniteLossError(
                    f"non-finite training loss or gradient at step {step} (loss "
                    f"{float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}); stopping. "
                    "Lower learning_rate, add warmup_epochs or grad_clip_norm. No checkpoint was written "
                    f"from step {step} on."
                )
            self._on_host.append((step, {k: float(v) for k, v in metrics.items()}))
        self._on_device = []

    def summary(self) -> dict[str, float]:
        """Means over the steps since the last summary (learning_rate: the latest), as train_* metrics."""
        self.check_finite()
        if not self._on_host:
            return {}
        names = self._on_host[0][1].keys()
        summary = {
            f"train_{name}": float(np.mean([m[name] for _, m in self._on_host]))
            for name in names
            if name != "learning_rate"
        }
        summary["learning_rate"] = self._on_host[-1][1]["learning_rate"]
        self._on_host = []
        return summary


def _state_to_save(dp: DataParallel, state: TrainState) -> TrainState:
    """What the checkpoint holds: shard_map's replicated global arrays as they are (Orbax writes each
    shard once); pmap's stacked per-device copies reduced to one host copy."""
    return state if dp.parallelism == "shard_map" else dp.unreplicate(state)


def _start_from_pretrained(
    config: ml_collections.ConfigDict, dp: DataParallel, state: TrainState, tx: Any
) -> TrainState:
    """Step 0 with `config.init_from`'s backbone under `state`'s fresh classifier, a new optimizer state."""
    fresh = dp.unreplicate(state)
    try:
        variables, metadata = finetune.load_pretrained(
            {"params": fresh.params, "batch_stats": fresh.batch_stats},
            config.init_from,
            model_name=config.model,
        )
    except (FileNotFoundError, finetune.CheckpointMismatchError) as e:
        raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
    _log.info(
        "fine-tuning (%s) from %s (%s, %s classes, step %s): backbone restored, new classifier",
        config.finetune_mode,
        config.init_from,
        metadata.get("model"),
        metadata.get("num_classes"),
        metadata.get("step", "-"),
    )
    # Merged on the host and placed with `replicate`: inside `init_state`'s jit the pretrained arrays
    # would become constants of the compiled program.
    return dp.replicate(
        jax.device_get(create_train_state(variables, tx, use_ema=config.ema_decay > 0))
    )


def evaluate(
    eval_fns: dict[str, Any],
    state: TrainState,
    dp: DataParallel,
    batches: Iterator[dict[str, np.ndarray]],
    progress: reporting.ProgressBar | None = None,
) -> dict[str, float]:
    """Exact metrics of every `eval_fns[prefix]` over one pass of `batches` (each process's padded,
    masked share of the split), as `{f"{prefix}_{name}": value}`. The split is read and placed once,
    however many functions (the model, its EMA) evaluate it."""
    sums: dict[str, list] = {prefix: [] for prefix in eval_fns}
    for batch in batches:
        device_batch = dp.shard_batch(batch)
        for prefix, eval_fn in eval_fns.items():
            sums[prefix].append(eval_fn(state, device_batch))
        if progress is not None:
            progress.update(1)
    results = {}
    for prefix, fetched in dp.fetch(sums).items():
        # Accumulated in float64 on the host so that long splits lose nothing to float32 rounding.
        totals = {name: math.fsum(float(s[name]) for s in fetched) for name in steps.EVAL_SUM_NAMES}
        results.update(
            {f"{prefix}_{name}": value for name, value in steps.summarize_eval(totals).items()}
        )
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` with logs in `workdir`; returns the final metrics (train_*, eval_*).

    Every process runs this; each reads only its share of the data, and only process 0 writes logs.
    """
    validate_config(config)
    data = _data()
    info = data.dataset_info(config)
    dp = DataParallel(config.parallelism)
    try:
        local_batch_size = dp.check_batch_size(config.batch_size)
        local_eval_batch_size = dp.check_batch_size(config.eval_batch_size or config.batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    steps_per_epoch = info.num_train_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {info.num_train_examples} training examples"
        )
    num_steps = optim.total_train_steps(config, steps_per_epoch)
    eval_every = config.eval_every_steps or steps_per_epoch
    checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
    is_main = jax.process_index() == 0

    model = create_model_from_config(config, info.num_classes)
    try:
        learning_rate_fn = optim.create_learning_rate_schedule(config, steps_per_epoch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    param_labels = lr_multipliers = None
    if config.finetune_mode != "full" or config.backbone_lr_multiplier != 1.0:
        # Head vs backbone groups, from the params' structure (eval_shape: no compute).
        abstract = jax.eval_shape(
            lambda: init_variables(model, jax.random.key(config.seed), info.image_size)
        )
        param_labels = finetune.param_groups(abstract["params"])
        lr_multipliers = finetune.lr_multipliers(
            config.finetune_mode, config.backbone_lr_multiplier
        )
    tx = optim.create_optimizer(
        config, learning_rate_fn, param_labels=param_labels, lr_multipliers=lr_multipliers
    )

    def init_state() -> TrainState:
        # The "rbg" generator: compiling model.init with the default threefry takes ~7x longer (33 s vs
        # 4.7 s for cifar_resnet20 on CPU), one threefry per kernel. Same distributions; the stream is
        # deterministic for a seed on a given backend (not guaranteed identical across backends).
        rng = jax.random.key(config.seed, impl="rbg")
        variables = init_variables(model, rng, info.image_size)
        return create_train_state(variables, tx, use_ema=config.ema_decay > 0)

    state = dp.init_state(init_state)
    train_iter = data.create_train_iterator(
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_batch_size=local_batch_size,
        seed=config.seed,
    )
    checkpointer = TrainingCheckpointer(
        workdir,
        save_every_steps=checkpoint_every,
        max_to_keep=config.checkpoints_to_keep,
        keep_best=config.best_checkpoints_to_keep,
        config=config.to_dict(),
    )
    # Resuming: the latest checkpoint's state and the data iterator's position; else fine-tuning from
    # config.init_from (only on a fresh start: a resumed fine-tune continues from its own checkpoint).
    try:
        restored = checkpointer.restore_latest(_state_to_save(dp, state), train_iter)
        if restored is not None:
            state = restored if dp.parallelism == "shard_map" else dp.replicate(restored)
        elif config.init_from:
            state = _start_from_pretrained(config, dp, state, tx)
    except BaseException as e:
        # Closing removes the checkpointer's SIGTERM handler and stops Orbax's threads; a process that
        # goes on (a notebook, a test) must not keep them.
        checkpointer.close()
        if isinstance(e, ValueError) and not isinstance(e, ConfigError):
            raise ConfigError(f"cannot resume from {workdir}: {e}") from e
        raise
    start_step = int(dp.fetch(state.step))

    train_fn = dp.compile(
        functools.partial(
            steps.train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=learning_rate_fn,
            label_smoothing=config.label_smoothing,
            ema_decay=config.ema_decay,
            axis_name=DATA_AXIS,
        ),
        donate_state=True,
    )
    eval_fns = {
        "eval": dp.compile(
            functools.partial(steps.eval_step, apply_fn=model.apply, axis_name=DATA_AXIS),
            donate_state=False,
        )
    }
    if config.ema_decay > 0:
        eval_fns["eval_ema"] = dp.compile(
            functools.partial(
                steps.eval_step, apply_fn=model.apply, use_ema=True, axis_name=DATA_AXIS
            ),
            donate_state=False,
        )

    writer = reporting.MetricWriter(workdir, enabled=is_main)
    writer.write_hparams(config.to_dict())
    progress = reporting.ProgressBar(
        num_steps,
        enabled=is_main,
        desc="train",
        initial=start_step,
        images_per_step=config.batch_size,
    )
    if is_main:
        log_model_summary(config.model, info.image_size, info.num_classes, log=_log.info)
        _log.info(
            "%s on %s: %d examples, %d classes, %dx%d; %d steps of global batch %d (%d per device on %d "
            "devices, %d process(es)), %s, %s BN",
            config.model,
            config.dataset,
            info.num_train_examples,
            info.num_classes,
            info.image_size,
            info.image_size,
            num_steps,
            config.batch_size,
            config.batch_size // dp.num_devices,
            dp.num_devices,
            jax.process_count(),
            config.parallelism,
            "synced" if config.bn_sync else "per-device",
        )

    def run_eval(step: int) -> dict[str, float]:
        batches = data.create_eval_batches(
            config,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            local_batch_size=local_eval_batch_size,
        )
        eval_progress = reporting.ProgressBar(
            data.num_eval_batches(
                info.num_eval_examples, jax.process_count(), local_eval_batch_size
            ),
            enabled=is_main,
            desc="eval",
        )
        try:
            results = evaluate(eval_fns, state, dp, batches, eval_progress)
        finally:
            eval_progress.close()
        writer.write(step, results)
        writer.plot_curves()  # <workdir>/curves.png, redrawn at every eval
        if is_main:
            progress.write(reporting.format_metrics(step, results))
        return results

    train_metrics = _TrainMetrics(dp)
    final: dict[str, float] = {}
    timer_start, timer_step = time.perf_counter(), start_step
    try:
        for step in range(start_step + 1, num_steps + 1):
            batch = dp.shard_batch(next(train_iter))
            state, metrics = train_fn(state, batch)
            train_metrics.append(step, metrics)
            progress.update(1)
            is_last = step == num_steps
            if step % config.log_every_steps == 0 or is_last:
                summary = train_metrics.summary()
                elapsed = time.perf_counter() - timer_start
                summary["train_steps_per_second"] = (step - timer_step) / elapsed
                summary["train_examples_per_second"] = (
                    summary["train_steps_per_second"] * config.batch_size
                )
                summary["epoch"] = step / steps_per_epoch
                writer.write(step, summary)
                progress.update(0, loss=summary["train_loss"])
                # Without a bar (stderr is not a terminal, e.g. a log file): one line per log.
                if is_main and not progress.enabled:
                    progress.write(reporting.format_metrics(step, summary))
                final.update(summary)
                timer_start, timer_step = time.perf_counter(), step
            eval_metrics = {}
            if step % eval_every == 0 or is_last:
                eval_metrics = run_eval(step)
                final.update(eval_metrics)
            preempted = checkpointer.reached_preemption(step)
            if step % checkpoint_every == 0 or is_last or preempted:
                # Saved only once every step up to this one had a finite loss and gradient, so a
                # divergence never overwrites the last good checkpoint.
                train_metrics.check_finite()
                checkpointer.save(
                    step,
                    _state_to_save(dp, state),
                    train_iter,
                    metrics=eval_metrics,
                    force=is_last or preempted,
                )
            if preempted:
                checkpointer.wait_until_finished()
                _log.warning(preemption_message(step, workdir))
                break
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
    return final
