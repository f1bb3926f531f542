"""The training loop: `train_and_evaluate(config, workdir)` wires data, model, optimizer, steps and devices.

Layering: models know nothing of training, steps.py knows nothing of devices, parallel.py knows nothing of
ResNets; this module is the only place that knows all of them. `train.py` only parses flags and calls it.
The config schema and its validation live in `resnet_jax.config`; what a run starts from (sizes, model,
optimizer, first state) in `resnet_jax.run_setup`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from resnet_jax import data, optim, reporting, steps
from resnet_jax.checkpoint import divergence
from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer
from resnet_jax.checkpoint.preemption import preemption_message
from resnet_jax.config import ConfigError, to_json, validate_config
from resnet_jax.dense import task as dense_task
from resnet_jax.dense.model_summary import log_run_model_summary
from resnet_jax.metrics import NonFiniteLossError, TrainMetrics, evaluate, non_finite_paths
from resnet_jax.mixing import BatchMixing
from resnet_jax.models import ResNet
from resnet_jax.parallel import DATA_AXIS, DataParallel
from resnet_jax.run_setup import (
    Optimization,
    RunPlan,
    create_model_from_config,
    create_optimization,
    eval_summary,
    initial_state,
    is_segmentation,
    plan_run,
    state_to_save,
)
from resnet_jax.train_state import TrainState

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

_log = logging.getLogger(__name__)


def compile_steps(
    config: ml_collections.ConfigDict,
    data_parallel: DataParallel,
    model: ResNet,
    optimization: Optimization,
) -> tuple[Callable, dict[str, Callable]]:
    """The compiled train step (donating the state) and eval steps by metric prefix (eval, eval_ema)."""
    if is_segmentation(config):
        return dense_task.compile_steps(
            config,
            data_parallel,
            model,
            tx=optimization.tx,
            learning_rate_fn=optimization.learning_rate_fn,
            trainable_mask=optimization.trainable_mask,
        )
    stats = dict(zip(("pixel_mean", "pixel_std"), data.normalization_stats(config), strict=True))
    train_step = functools.partial(steps.train_step, **stats)
    eval_step = functools.partial(steps.eval_step, **stats)
    train_fn = data_parallel.compile(
        functools.partial(
            train_step,  # uint8 batches: the steps normalize them with the dataset's statistics
            apply_fn=model.apply,
            tx=optimization.tx,
            learning_rate_fn=optimization.learning_rate_fn,
            label_smoothing=config.label_smoothing,
            ema_decay=config.ema_decay,
            trainable_mask=optimization.trainable_mask,
            mixing=BatchMixing.from_config(config)
            if config.mixup_alpha > 0 or config.cutmix_alpha > 0
            else None,
            dropout_seed=config.seed if config.dropout_rate > 0 else None,
            axis_name=DATA_AXIS,
        ),
        donate_state=True,
    )
    prefixes = {"eval": False, **({"eval_ema": True} if config.ema_decay > 0 else {})}
    eval_fns = {
        prefix: data_parallel.compile(
            functools.partial(
                eval_step, apply_fn=model.apply, use_ema=use_ema, axis_name=DATA_AXIS
            ),
            donate_state=False,
        )
        for prefix, use_ema in prefixes.items()
    }
    return train_fn, eval_fns


def log_run_summary(
    config: ml_collections.ConfigDict, plan: RunPlan, data_parallel: DataParallel
) -> None:
    """The model summary and one line with the run's sizes, before the first step."""
    info = plan.info
    log_run_model_summary(config, info.image_size, info.num_classes, log=_log.info)  # by task
    _log.info(optim.describe_learning_rate(config))
    _log.info(
        "%s on %s: %d train, %d eval (%s) and %d test examples, %d classes, %s; %d steps of global "
        "batch %d (%d per device on %d devices, %d process(es)), %s, %s BN",
        config.model,
        config.dataset,
        info.num_train_examples,
        info.num_eval_examples,
        info.eval_split,
        info.num_test_examples,
        info.num_classes,
        data.progressive.describe_sizes(config, plan.steps_per_epoch, plan.num_steps),
        plan.num_steps,
        config.batch_size,
        config.batch_size // data_parallel.num_devices,
        data_parallel.num_devices,
        jax.process_count(),
        config.parallelism,
        "synced" if config.bn_sync else "per-device",
    )


@dataclasses.dataclass
class _Run:
    """A run's wiring, built once by `train_and_evaluate`; its methods are the loop's named steps."""

    config: ml_collections.ConfigDict
    workdir: str
    plan: RunPlan
    data_parallel: DataParallel
    checkpointer: TrainingCheckpointer
    writer: reporting.MetricWriter
    progress: Any  # a tqdm bar (disabled on other processes and off a terminal)
    train_iter: Any
    train_fn: Callable
    eval_fns: dict[str, Callable]
    model: Any  # what the steps apply (a ResNet, or dense's SegmentationModel)
    state: TrainState
    is_main: bool
    # checkpoint step -> the (device) loss its weights gave on the next step; judges them after a
    # divergence (`checkpoint.divergence`).
    next_step_losses: dict[int, Any] = dataclasses.field(default_factory=dict)

    def report(self, line: str) -> None:
        """A line for the person watching: above the progress bar, or logged when there is none."""
        if not self.is_main:
            return
        if self.progress.disable:
            _log.info(line)
        else:
            self.progress.write(line)

    def log_train(self, step: int, summary: dict[str, float], seconds: float, steps: int) -> None:
        summary["train_steps_per_second"] = steps / seconds
        summary["train_examples_per_second"] = steps / seconds * self.config.batch_size
        summary["epoch"] = step / self.plan.steps_per_epoch
        self.writer.write(step, summary)
        self.progress.set_postfix(loss=f"{summary['train_loss']:.4f}")
        if self.progress.disable:
            self.report(reporting.format_metrics(step, summary))

    def evaluate(self, step: int, split: str = "eval") -> dict[str, float]:
        """Exact metrics of the eval (validation) split as eval_*, or of the test split as test_*."""
        process_index, process_count = jax.process_index(), jax.process_count()
        batches = data.create_eval_batches(
            self.config,
            process_index=process_index,
            process_count=process_count,
            local_batch_size=self.plan.local_eval_batch_size,
            split=split,
            uint8_images=True,
        )
        info = self.plan.info
        total = data.num_eval_batches(
            info.num_eval_examples if split == "eval" else info.num_test_examples,
            process_count,
            self.plan.local_eval_batch_size,
        )
        with contextlib.closing(
            reporting.progress_bar(total, enabled=self.is_main, desc=split)
        ) as bar:
            results = evaluate(
                self.eval_fns,
                self.state,
                self.data_parallel,
                batches,
                lambda: bar.update(1),
                summarize=eval_summary(self.config),
            )
        if split == "test":  # eval_loss -> test_loss, eval_ema_accuracy -> test_ema_accuracy
            results = {"test" + name.removeprefix("eval"): value for name, value in results.items()}
        self.writer.write(step, results)
        self.writer.plot_curves()  # <workdir>/curves.png, redrawn at every eval
        self.report(reporting.format_metrics(step, results))
        if is_segmentation(self.config) and split == "eval" and step == self.plan.num_steps:
            self.write_predictions()
        return results

    def write_predictions(self) -> None:
        """`<workdir>/predictions.png`: input, truth and prediction for a few validation canvases."""
        if self.is_main:
            state = self.data_parallel.unreplicate(self.state)
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            path = dense_task.write_predictions_png(
                self.config, self.workdir, self.model, variables
            )
            self.report(f"predictions of the last step's model: {path}")

    def save(self, step: int, eval_metrics: dict[str, float], force: bool) -> bool:
        """Checkpoints the state (returns whether it saved), only if every value in it is finite: a
        checkpoint that cannot be trained from must never replace a good one."""
        if bad := non_finite_paths(self.state):
            raise NonFiniteLossError(
                f"non-finite values in the training state at step {step} ({', '.join(bad[:5])}"
                f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}); stopped, not saved"
            )
        # No data item: the data position is the step (`data.stream`), the same on any topology.
        return self.checkpointer.save(
            step,
            state_to_save(self.data_parallel, self.state),
            None,
            metrics=eval_metrics,
            force=force,
        )


def _train_loop(run: _Run, start_step: int) -> dict[str, float]:
    """Steps `start_step + 1 .. num_steps`: train, log, evaluate and checkpoint on their schedules."""
    config, plan = run.config, run.plan
    train_metrics = TrainMetrics(run.data_parallel)
    final: dict[str, float] = {}
    timer_start, timer_step = time.perf_counter(), start_step
    last_saved, batches = start_step, run.data_parallel.device_batches(run.train_iter)
    for step in range(start_step + 1, plan.num_steps + 1):
        batch = next(batches)
        run.state, metrics = run.train_fn(run.state, batch)
        train_metrics.append(step, metrics)
        if step == last_saved + 1:
            run.next_step_losses[last_saved] = metrics["loss"]
        run.progress.update(1)
        is_last = step == plan.num_steps
        if step % config.log_every_steps == 0 or is_last:
            summary = train_metrics.summary()
            run.log_train(step, summary, time.perf_counter() - timer_start, step - timer_step)
            final.update(summary)
            timer_start, timer_step = time.perf_counter(), step
        eval_metrics = {}
        if step % plan.eval_every == 0 or is_last:
            eval_metrics = run.evaluate(step)
            final.update(eval_metrics)
        preempted = run.checkpointer.reached_preemption(step)
        if step % plan.checkpoint_every == 0 or is_last or preempted:
            # Saved only once every step up to this one had a finite loss and gradient, so a
            # divergence never overwrites the last good checkpoint.
            train_metrics.check_finite()
            if run.save(step, eval_metrics, force=is_last or preempted):
                last_saved = step
        if is_last and plan.info.num_test_examples:
            # After the last save: the test split is reported, never used to rank checkpoints.
            final.update(run.evaluate(step, split="test"))
        if preempted:
            run.checkpointer.wait_until_finished()
            _log.warning(preemption_message(step, run.workdir))
            break
    return final


def check_resume_batch_size(
    config: ml_collections.ConfigDict, checkpointer: TrainingCheckpointer
) -> None:
    """Refuses, in one line, to resume across a change of the global batch size: the data position is
    the step, and a step of another batch size is other examples."""
    step = checkpointer.latest_step()
    if step is None:
        return
    try:
        saved = checkpointer.saved_config(step) or {}
    except Exception:  # a damaged config item: the resume's fallback judges that checkpoint
        return
    saved_batch_size = saved.get("batch_size")
    if saved_batch_size is not None and saved_batch_size != config.batch_size:
        raise ConfigError(
            f"cannot resume from checkpoint {step} in {checkpointer.directory}: it was trained with "
            f"global batch_size={saved_batch_size} and this run has batch_size={config.batch_size} (the "
            f"data position is the step, so another batch size would read other examples); set "
            f"--config.batch_size={saved_batch_size} to resume, or use a new --workdir "
            "(config.init_from=<this workdir> fine-tunes from its weights)"
        )


def train_batches_from(
    config: ml_collections.ConfigDict, checkpointer: TrainingCheckpointer, start_step: int
) -> Any:
    """This process's training batches from global step `start_step` on: the data position is the step,
    so a resumed run (on any topology with the same global batch) reads the uninterrupted run's batches."""
    if start_step > 0:
        _log.info(
            "resuming from step %d (checkpoint %s)",
            start_step,
            checkpointer.step_directory(start_step),
        )
    return data.create_train_iterator(
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        uint8_images=True,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` with logs in `workdir`; returns the final metrics (train_*, eval_*, test_*).

    eval_* are the validation split's (evaluated on schedule; they rank the checkpoints); test_* are the
    test split's, evaluated once after the last step when the dataset has one.

    Every process runs this; each reads only its share of the data, and only process 0 writes logs.
    Whatever way it ends (done, preempted, an error), the checkpointer, the metric writer and the
    progress bar are closed and the SIGTERM handler is restored.
    """
    validate_config(config)
    data_parallel = DataParallel(config.parallelism)
    plan = plan_run(config, data_parallel)
    model = create_model_from_config(config, plan.info.num_classes)
    optimization = create_optimization(config, model, plan)
    is_main = jax.process_index() == 0

    with contextlib.ExitStack() as cleanup:
        checkpointer = cleanup.enter_context(
            TrainingCheckpointer(
                workdir,
                save_every_steps=plan.checkpoint_every,
                max_to_keep=config.checkpoints_to_keep,
                keep_best=config.best_checkpoints_to_keep,
                best_metric=config.best_metric,
                config=to_json(config),
            )
        )
        check_resume_batch_size(config, checkpointer)
        state = initial_state(
            config, data_parallel, model, optimization.tx, plan, checkpointer, None
        )
        start_step = int(data_parallel.unreplicate(state.step))
        train_iter = train_batches_from(config, checkpointer, start_step)
        train_fn, eval_fns = compile_steps(config, data_parallel, model, optimization)
        writer = cleanup.enter_context(
            contextlib.closing(reporting.MetricWriter(workdir, enabled=is_main))
        )
        writer.write_hparams(config.to_dict())
        if is_main:
            log_run_summary(config, plan, data_parallel)
        progress = cleanup.enter_context(
            contextlib.closing(
                reporting.progress_bar(
                    plan.num_steps,
                    enabled=is_main,
                    desc="train",
                    initial=start_step,
                    images_per_step=config.batch_size,
                )
            )
        )
        run = _Run(
            config=config,
            workdir=workdir,
            plan=plan,
            data_parallel=data_parallel,
            checkpointer=checkpointer,
            writer=writer,
            progress=progress,
            train_iter=train_iter,
            train_fn=train_fn,
            eval_fns=eval_fns,
            model=model,
            state=state,
            is_main=is_main,
        )
        try:
            return _train_loop(run, start_step)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; {_after_divergence(run)}") from None


def _after_divergence(run: _Run) -> str:
    """Sets aside the checkpoints whose weights had diverged; says what is kept and how to rerun."""
    run.checkpointer.wait_until_finished()
    losses = {
        step: float(run.data_parallel.unreplicate(loss))
        for step, loss in run.next_step_losses.items()
    }
    bound = divergence.exploded_loss_bound(run.plan.info.num_classes)
    kept = divergence.set_aside_diverged(run.checkpointer, losses, bound)
    return f"{kept}. Lower learning_rate, add warmup_epochs or grad_clip_norm, then rerun"
