"""Orbax checkpoints: model variables on their own (conversion, fine-tuning) and the trainer's state.

Two kinds of checkpoint live here.

A *variables checkpoint* is one Orbax directory holding `variables` ({'params', 'batch_stats'}) and a small
JSON `metadata` item ({'model': name, 'num_classes': n, ...}). `python -m resnet_jax.convert` writes one; the
trainer can start or fine-tune from it (`config.init_from`).

A *training checkpoint* is what `TrainingCheckpointer` writes under `<workdir>/checkpoints/<step>/`: the
TrainState pytree (`state`), the Grain data iterator position (`data`, one JSON file per process) and the run's
config (`config`). Resuming from it continues the run as if it had never stopped: same parameters, optimizer
state, step, and the exact next batch.

`load_variables` reads params + batch_stats from either kind, so fine-tuning does not care where a backbone
came from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

Variables = dict[str, Any]
PyTree = Any

CHECKPOINTS_SUBDIR = "checkpoints"
BEST_METRIC = "eval_accuracy"

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Variables checkpoints
# ---------------------------------------------------------------------------------------------------------------


def save_variables(path: str, variables: Variables, metadata: dict[str, Any]) -> None:
    """Writes `variables` and `metadata` as an Orbax checkpoint at `path` (which must not exist)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new path or remove it first")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            ocp.args.Composite(
                variables=ocp.args.StandardSave(variables),
                metadata=ocp.args.JsonSave(metadata),
            ),
        )


def load_variables(path: str, step: int | None = None) -> tuple[Variables, dict[str, Any]]:
    """Reads `{'params', 'batch_stats'}` as numpy arrays from any checkpoint: `(variables, metadata)`.

    `path` is one of
      - a variables checkpoint (written by `save_variables` / `python -m resnet_jax.convert`);
      - a training workdir, or its `checkpoints/` directory: the latest complete training checkpoint is read
        (or `step`), without needing a TrainState to restore into; the optimizer state is not read at all.

    `metadata` holds at least `model` and `num_classes` when the source knows them (for a training checkpoint:
    from its saved config, `num_classes` falling back to the classifier's width), plus `step` and `config` for a
    training checkpoint.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "variables")):
        if step is not None:
            raise ValueError(f"{path} is a variables checkpoint; it has no steps (got step={step})")
        return _load_variables_checkpoint(path)
    checkpoints_dir = _training_checkpoints_dir(path)
    if checkpoints_dir is None:
        raise FileNotFoundError(
            f"{path} is neither a resnet_jax variables checkpoint (no 'variables' item inside) nor a training "
            f"workdir with complete checkpoints (no '{CHECKPOINTS_SUBDIR}/<step>' inside); write one with "
            "`python -m resnet_jax.convert` or `python train.py --workdir ...`"
        )
    return _load_training_variables(checkpoints_dir, step)


def _load_variables_checkpoint(path: str) -> tuple[Variables, dict[str, Any]]:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            path,
            ocp.args.Composite(
                variables=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()
            ),
        )
    variables = jax.tree.map(np.asarray, restored["variables"])
    return variables, dict(restored["metadata"] or {})


def _training_checkpoints_dir(path: str) -> str | None:
    """`path` itself or `path/checkpoints`, whichever holds at least one finalized step."""
    for candidate in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
        if os.path.isdir(candidate) and ocp.utils.checkpoint_steps(candidate):
            return candidate
    return None


def _load_training_variables(
    checkpoints_dir: str, step: int | None
) -> tuple[Variables, dict[str, Any]]:
    steps = sorted(ocp.utils.checkpoint_steps(checkpoints_dir))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"no complete checkpoint for step {step} in {checkpoints_dir}: {steps}"
        )
    step_dir = os.path.join(checkpoints_dir, str(step))
    # PyTreeCheckpointHandler reads what StandardSave wrote (same format) and, unlike the standard handler,
    # restores a sub-tree: the optimizer state (2-3x the params) is never read.
    # Every item is named (data and metrics are not read) so that Orbax does not warn about unknown items.
    handler = ocp.CompositeCheckpointHandler(
        state=ocp.PyTreeCheckpointHandler(),
        config=ocp.JsonCheckpointHandler(),
        data=grain_checkpoint.CheckpointHandler(),
        metrics=ocp.JsonCheckpointHandler(),
    )
    with ocp.Checkpointer(handler) as checkpointer:
        tree = checkpointer.metadata(step_dir).item_metadata["state"].tree
        wanted = {
            name: tree[name] for name in ("params", "batch_stats") if tree.get(name) is not None
        }
        if "params" not in wanted:
            raise ValueError(f"{step_dir} holds no 'params' in its state item")
        restored = checkpointer.restore(
            step_dir,
            ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted),
                    restore_args=jax.tree.map(
                        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted
                    ),
                    partial_restore=True,
                ),
                config=ocp.args.JsonRestore(),
            ),
        )
    variables = {"params": restored["state"]["params"]}
    variables["batch_stats"] = restored["state"].get("batch_stats") or {}
    config = dict(restored["config"] or {})
    metadata: dict[str, Any] = {"step": step, "config": config, "model": config.get("model")}
    num_classes = config.get("num_classes")
    fc = variables["params"].get("fc")
    if num_classes is None and fc is not None:
        num_classes = int(fc["kernel"].shape[-1])
    metadata["num_classes"] = num_classes
    return variables, metadata


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------------------


def abstract_like(tree: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct` leaves (with shardings) for a pytree of arrays: a restore target."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(leaf, tree)


def _jsonable(value: Any) -> Any:
    """The config as plain JSON (tuples become lists; anything exotic becomes its repr)."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    return json.loads(json.dumps(value, default=repr))


class TrainingCheckpointer:
    """Saves and restores a training run under `<workdir>/checkpoints` with one Orbax `CheckpointManager`.

    Each checkpoint `<workdir>/checkpoints/<step>/` holds three items, written by every process:
      - `state`: the TrainState pytree (Orbax writes each shard once; restores onto the target's shardings);
      - `data`: the Grain iterator state, one `process_<i>-of-<n>.json` per process;
      - `config`: the run's config as JSON (what `load_variables` reads the model name from).

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the write finishes
    in a background thread while training continues. Commits are atomic: a step directory is written under a
    temporary name and renamed when complete, so a save cut short (kill -9, lost node) is never mistaken for a
    checkpoint; the temporary directory it leaves is deleted when the next run opens the directory.

    Preservation: the latest `max_to_keep` checkpoints, plus the `keep_best` ones with the highest
    `eval_accuracy` among those saved with eval metrics.

    Preemption: `reached_preemption(step)` is True once the job has been told to stop. After
    `jax.distributed.initialize` JAX's preemption sync service catches SIGTERM and all processes agree on the
    step; in a single process without it, a SIGTERM handler installed here sets the flag (otherwise SIGTERM would
    kill the process before it could save).
    """

    def __init__(
        self,
        workdir: str,
        *,
        save_every_steps: int,
        max_to_keep: int = 3,
        keep_best: int = 1,
        best_metric: str = BEST_METRIC,
        config: Mapping[str, Any] | None = None,
        async_save: bool = True,
        handle_sigterm: bool = True,
    ) -> None:
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}")
        if max_to_keep < 1:
            raise ValueError(
                f"max_to_keep must be >= 1 (the latest is what resumes), got {max_to_keep}"
            )
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_SUBDIR)
        self.save_every_steps = save_every_steps
        self.best_metric = best_metric
        self._config = _jsonable(config) if config is not None else None

        def score(metrics: Mapping[str, Any]) -> float:
            # Checkpoints saved without eval metrics rank below every evaluated one.
            return float(metrics.get(best_metric, -math.inf))

        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_best > 0:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=score,
                    reverse=False,  # ascending: the last `keep_best` are the highest scores
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        # The save decision is ours (`save`): Orbax's default policy would also save the first step it sees.
        # `best_fn` is set beside the policy because only then does Orbax write each checkpoint's metrics to
        # disk, which the BestN policy needs to rank checkpoints saved before a restart.
        options = ocp.CheckpointManagerOptions(
            best_fn=score,
            best_mode="max",
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            handler_registry=_handler_registry(),
        )
        self._watcher = PreemptionWatcher() if handle_sigterm else None

    # -- queries ----------------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, ascending."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the highest `best_metric`, or None when no checkpoint has it."""
        scored = [
            (float(metrics[self.best_metric]), step)
            for step in self._manager.all_steps()
            if self.best_metric in (metrics := self._manager.metrics(step) or {})
        ]
        return max(scored)[1] if scored else None

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with `step` (empty when it was saved without any)."""
        return dict(self._manager.metrics(step) or {})

    # -- save / restore ---------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        data_iterator: Any | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (and the iterator position) as step `step` if it is due; returns whether it saved.

        Due means: `step` is a multiple of `save_every_steps`, or a preemption was signalled, or `force`. A step
        that already has a checkpoint is not saved twice (so a final `force=True` save is always safe). Every
        process must call this with the same `step`. `metrics` (host floats) are kept with the checkpoint; those
        holding `best_metric` rank it for the keep-best policy.
        """
        if step in self._manager.all_steps():
            return False
        due = step % self.save_every_steps == 0 or self.reached_preemption(step)
        if not (due or force):
            return False
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
        if self._config is not None:
            items["config"] = ocp.args.JsonSave(self._config)
        saved_metrics = {name: float(value) for name, value in (metrics or {}).items()}
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=saved_metrics, force=True
        )

    def restore(self, step: int, target_state: PyTree, data_iterator: Any | None = None) -> PyTree:
        """Restores step `step` onto `target_state`'s structure, dtypes and shardings.

        `target_state` may hold arrays (e.g. the freshly initialized state, which is the usual way to get the
        shardings right on every host) or `jax.ShapeDtypeStruct`s. `data_iterator`, when given, is moved to the
        saved position in place (this process's own state file).
        """
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_like(target_state))}
        if data_iterator is not None:
            self._check_data_processes(step)
            items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def _check_data_processes(self, step: int) -> None:
        """Each process restores its own iterator file: the process count must be the one that saved."""
        data_dir = os.path.join(self.directory, str(step), "data")
        if not os.path.isdir(data_dir):
            return
        counts = {
            name.rsplit("-of-", 1)[1].removesuffix(".json")
            for name in os.listdir(data_dir)
            if name.startswith("process_") and "-of-" in name
        }
        if counts and counts != {str(jax.process_count())}:
            raise ValueError(
                f"checkpoint {step} in {self.directory} was written by {', '.join(sorted(counts))} "
                f"process(es) and this run has {jax.process_count()}: the data position is per process, "
                "so resume with the same number of processes (or fine-tune from it with config.init_from)"
            )

    def restore_latest(
        self, target_state: PyTree, data_iterator: Any | None = None
    ) -> PyTree | None:
        """`restore` of the newest complete checkpoint, or None when there is none (a fresh run)."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, target_state, data_iterator)

    def saved_config(self, step: int | None = None) -> dict[str, Any] | None:
        """The config saved with `step` (default: the latest), or None."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    # -- preemption and lifetime --------------------------------------------------------------------------------

    def reached_preemption(self, step: int) -> bool:
        """True once the job must stop: save at `step` (`save(..., force=True)`) and exit.

        Multi-process: JAX's preemption sync point, True on every process at the same step. Single process:
        also our SIGTERM flag.
        """
        return self._manager.reached_preemption(step) or self._sigterm_requested()

    def _sigterm_requested(self) -> bool:
        return self._watcher is not None and self._watcher.requested

    def wait_until_finished(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, releases the manager and restores the previous SIGTERM handler."""
        self._manager.wait_until_finished()
        self._manager.close()
        if self._watcher is not None:
            self._watcher.uninstall()
            self._watcher = None

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Names each item's handler up front, so a fresh manager can read metadata of items it did not write."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("data", grain_checkpoint.CheckpointSave, grain_checkpoint.CheckpointHandler)
    registry.add("data", grain_checkpoint.CheckpointRestore, grain_checkpoint.CheckpointHandler)
    registry.add("config", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("config", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


# ---------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------


def _preemption_service_active() -> bool:
    """Whether `jax.distributed` runs JAX's preemption sync service (which owns SIGTERM then)."""
    try:
        from jax._src import distributed  # noqa: PLC0415 (private, so imported where it is needed)
    except ImportError:
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatcher:
    """Turns SIGTERM into a flag (`requested`) in a single process, so the loop can save and exit cleanly.

    Installed only when JAX's preemption service is not running (no `jax.distributed`): with it, JAX already
    handles SIGTERM and `CheckpointManager.reached_preemption` makes every process stop at the same step, which a
    per-process flag could not guarantee. The handler must run in the main thread (Python's rule); elsewhere
    the watcher stays inactive.
    """

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._previous_handler: Any = None
        self.installed = False
        if _preemption_service_active():
            return
        if jax.process_count() > 1:
            _log.warning(
                "multi-process run without JAX's preemption service: SIGTERM is not handled gracefully"
            )
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        if not self._requested.is_set():
            # A signal handler must not block: logging here only formats and writes one line.
            _log.warning("SIGTERM received: finishing the current step, then saving and exiting")
        self._requested.set()

    @property
    def requested(self) -> bool:
        """True once SIGTERM has arrived."""
        return self._requested.is_set()

    def uninstall(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self.installed = False


def preemption_message(step: int, workdir: str) -> str:
    """The log line a preempted run ends with."""
    return (
        f"preempted at step {step}; rerun the same command to resume from "
        f"{os.path.join(os.path.abspath(workdir), CHECKPOINTS_SUBDIR)}"
    )


__all__ = [
    "PreemptionWatcher",
    "TrainingCheckpointer",
    "abstract_like",
    "load_variables",
    "preemption_message",
    "save_variables",
]
