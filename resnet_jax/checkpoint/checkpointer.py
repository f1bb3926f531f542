"""Training checkpoints: the whole run state under `<workdir>/checkpoints/<step>/`, saved and resumed.

What the trainer's `TrainingCheckpointer` writes: the TrainState pytree (`state`) and the run's config
(`config`). Resuming from it continues the run as if it had never stopped: same parameters, optimizer state,
step, and the exact next batch, since the data position is the global step (`resnet_jax.data.stream`) and
needs no item of its own. A Grain iterator position (`data`, one JSON file per process) is written only when
`save` is given a `data_iterator`, as older trainers did; checkpoints that have one still restore, and the item
is ignored when `restore` gets no `data_iterator`. To read only a backbone's params and batch_stats from such a
checkpoint, use `resnet_jax.checkpoint.load_variables` (no Grain needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from resnet_jax.checkpoint.preemption import PreemptionWatcher
from resnet_jax.checkpoint.variables import CHECKPOINTS_SUBDIR, CONFIG_ITEM, STATE_ITEM
from resnet_jax.config import base_config, to_json

PyTree = Any

DATA_ITEM = "data"
# Checkpoints that cannot be resumed from are moved here (`<step>.<reason>`), never deleted. Orbax's manager
# only counts directories named by a step number, so it ignores this one.
UNUSABLE_SUBDIR = "unusable"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint is intact but cannot resume this run (another model, optimizer, ...).

    Unlike a damaged checkpoint it is never moved aside: every older checkpoint of the run would fail the same
    way, and the fix is in the command, not on disk.
    """


def abstract_like(tree: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct` leaves (with shardings) for a pytree of arrays: a restore target."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(leaf, tree)


class TrainingCheckpointer:
    """Saves and restores a training run under `<workdir>/checkpoints` with one Orbax `CheckpointManager`.

    Each checkpoint `<workdir>/checkpoints/<step>/` holds these items, written by every process:
      - `state`: the TrainState pytree (Orbax writes each shard once; restores onto the target's shardings);
      - `config`: the run's config as JSON (what `load_variables` reads the model name from);
      - `data`, only when `save` is given a `data_iterator` (the trainer passes none: its data position is the
        step): the Grain iterator state, one `process_<i>-of-<n>.json` per process. Older checkpoints that
        have one still restore; it is ignored when `restore` gets no `data_iterator`.

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the write finishes
    in a background thread while training continues. Commits are atomic: a step directory is written under a
    temporary name and renamed when complete, so a save cut short (kill -9, lost node) is never mistaken for a
    checkpoint; the temporary directory it leaves is deleted when the next run opens the directory.

    Preservation: the latest `max_to_keep` checkpoints, plus the `keep_best` ones with the highest
    `best_metric` (the run's `config.best_metric`: eval_accuracy, eval_mean_iou, ...) among those saved with
    eval metrics.

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
        best_metric: str = base_config().best_metric,
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
        self._config = to_json(config) if config is not None else None

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

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def saved_state_paths(self, step: int) -> list[str]:
        """The leaf paths (`params/fc/kernel`) of the saved TrainState, from `state/_METADATA` alone.

        No array file is opened, so damaged array files cannot get in the way (the restore finds those).
        Raises OSError or ValueError when `_METADATA` is missing or garbled.
        """
        path = os.path.join(self.step_directory(step), STATE_ITEM, "_METADATA")
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["tree_metadata"].values()
        return [
            "/".join(str(key["key"]) for key in entry["key_metadata"])
            for entry in entries
            if entry["value_metadata"].get("value_type")
            != "None"  # ema_params without EMA: no leaf
        ]

    def saved_state_metadata(self, step: int) -> PyTree:
        """The saved TrainState's tree of `ArrayMetadata` (global shapes, dtypes). Reads every array's header,
        so it raises on damaged array files."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            return handler.metadata(epath.Path(self.step_directory(step), STATE_ITEM)).tree
        finally:
            handler.close()

    def data_file(self, step: int) -> str:
        """This process's Grain iterator state file in checkpoint `step`."""
        return os.path.join(
            self.step_directory(step),
            DATA_ITEM,
            f"process_{jax.process_index()}-of-{jax.process_count()}.json",
        )

    def move_aside(self, step: int, reason: str) -> str:
        """Moves checkpoint `step` to `<directory>/unusable/<step>.<reason>` and returns that path.

        Never deletes anything: the files stay for a person to inspect. Multi-process: every process calls
        this; process 0 alone renames, the others wait for it, and every process's manager forgets the step.
        """
        unusable = os.path.join(self.directory, UNUSABLE_SUBDIR)
        destination = os.path.join(unusable, f"{step}.{reason}")
        suffix = 1
        # The same step can go bad twice (resumed from an older one, damaged again).
        while os.path.exists(destination):
            suffix += 1
            destination = os.path.join(unusable, f"{step}.{reason}.{suffix}")
        if jax.process_count() > 1:  # every process has named the destination before it exists
            multihost_utils.sync_global_devices(f"resnet_jax: moving checkpoint {step} aside")
        if jax.process_index() == 0:
            os.makedirs(unusable, exist_ok=True)
            os.rename(self.step_directory(step), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"resnet_jax: checkpoint {step} moved aside")
        self._manager.reload()
        return destination

    # -- save / restore ---------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        data_iterator: Any | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (and `data_iterator`'s position, if any) as step `step` if due; returns whether it did.

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
        items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain_checkpoint.CheckpointSave(data_iterator)
        if self._config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(self._config)
        saved_metrics = {name: float(value) for name, value in (metrics or {}).items()}
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=saved_metrics, force=True
        )

    def restore(self, step: int, target_state: PyTree, data_iterator: Any | None = None) -> PyTree:
        """Restores step `step` onto `target_state`'s structure, dtypes and shardings.

        `target_state` may hold arrays (e.g. the freshly initialized state, which is the usual way to get the
        shardings right on every host) or `jax.ShapeDtypeStruct`s. `data_iterator`, when given, is moved to the
        saved position in place (this process's own file of the `data` item); when None, a `data` item is
        ignored, so a checkpoint that has one restores on any number of processes.
        """
        items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardRestore(abstract_like(target_state))}
        if data_iterator is not None:
            self.check_data_processes(step)
            items[DATA_ITEM] = grain_checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM]

    def check_data_processes(self, step: int) -> None:
        """With a `data_iterator`, each process restores its own iterator file: the process count must be the
        one that saved. Checkpoints without a `data` item (the trainer's) pass on any count.

        Raises IncompatibleCheckpointError otherwise (not a damaged checkpoint: every step has the same count).
        """
        data_dir = os.path.join(self.directory, str(step), DATA_ITEM)
        if not os.path.isdir(data_dir):
            return
        counts = {
            name.rsplit("-of-", 1)[1].removesuffix(".json")
            for name in os.listdir(data_dir)
            if name.startswith("process_") and "-of-" in name
        }
        if counts and counts != {str(jax.process_count())}:
            raise IncompatibleCheckpointError(
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
            step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
        )
        return restored[CONFIG_ITEM]

    # -- preemption and lifetime --------------------------------------------------------------------------------

    def reached_preemption(self, step: int) -> bool:
        """True once the job must stop: save at `step` (`save(..., force=True)`) and exit.

        Multi-process: JAX's preemption sync point, True on every process at the same step. Single process:
        also our SIGTERM flag.
        """
        return self._manager.reached_preemption(step) or self._sigterm_requested()

    def _sigterm_requested(self) -> bool:
        return self._watcher is not None and self._watcher.requested()

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
    state_handler = _state_handler()
    registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
    registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
    registry.add(DATA_ITEM, grain_checkpoint.CheckpointSave, grain_checkpoint.CheckpointHandler)
    registry.add(DATA_ITEM, grain_checkpoint.CheckpointRestore, grain_checkpoint.CheckpointHandler)
    registry.add(CONFIG_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add(CONFIG_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


def _state_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's handler for the TrainState; on CPU, one that writes each replicated array whole.

    Orbax's default replica-parallel write (it turns it off itself on GPU) splits every array replicated over N
    devices into N slices, each device writing one. Each slice is a small XLA program compiled in the saving
    process, for every array shape and device: on CPU, where all devices share one host memory, that costs
    seconds of compiling per process (more with more devices) and writes no faster. The checkpoint holds the same
    arrays either way, and restoring does not depend on how they were written.
    """
    handler = ocp.StandardCheckpointHandler()
    if jax.default_backend() != "cpu":
        return handler
    try:
        # Orbax internals (no public hook): an Orbax that moves them gets its default handler, not a crash.
        from orbax.checkpoint._src.metadata import array_metadata_store

        array_handler = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
        )
    except (ImportError, AttributeError, TypeError):
        return handler
    if not hasattr(handler, "_impl"):
        return handler
    type_handlers = ocp.type_handlers.create_type_handler_registry(
        *(
            (
                type_,
                array_handler if type_ is jax.Array else ocp.type_handlers.get_type_handler(type_),
            )
            for type_ in ocp.type_handlers.supported_types()
        )
    )
    # StandardCheckpointHandler delegates to a PyTreeCheckpointHandler it builds with these arguments and takes
    # no type handler registry of its own (orbax-checkpoint 0.12, as pinned; the default ArrayHandler is built
    # with an array metadata store, which orbax does not export).
    handler._impl = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=type_handlers
    )
    return handler
