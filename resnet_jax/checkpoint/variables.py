"""Variables checkpoints: write `{'params', 'batch_stats'}` with metadata, read them from any checkpoint.

A *variables checkpoint* is one Orbax directory holding `variables` ({'params', 'batch_stats'}) and a small
JSON `metadata` item ({'model': name, 'num_classes': n, ...}). `python -m resnet_jax.convert` writes one; the
trainer can start or fine-tune from it (`config.init_from`).

`load_variables` also reads the params and batch_stats of a training workdir's checkpoint (written by
`TrainingCheckpointer`), so fine-tuning, prediction and export do not care where a model came from. That
reading needs Orbax only: the Grain iterator state in a training checkpoint is never touched.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

Variables = dict[str, Any]

_log = logging.getLogger(__name__)

# The layout of a training workdir: `<workdir>/checkpoints/<step>/{state,config,data,metrics}`. Written by
# `TrainingCheckpointer`, read here.
CHECKPOINTS_SUBDIR = "checkpoints"
STATE_ITEM = "state"
CONFIG_ITEM = "config"


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
    checkpoints_dir = training_checkpoints_dir(path)
    if checkpoints_dir is None:
        raise FileNotFoundError(
            f"{path} is neither a resnet_jax variables checkpoint (no 'variables' item inside) nor a training "
            f"workdir with complete checkpoints (no '{CHECKPOINTS_SUBDIR}/<step>' inside); write one with "
            "`python -m resnet_jax.convert` or `python train.py --workdir ...`"
        )
    return _load_training_variables(checkpoints_dir, step)


def training_checkpoints_dir(path: str) -> str | None:
    """`path/checkpoints` or `path` itself, whichever holds at least one finalized step; else None."""
    for candidate in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
        if os.path.isdir(candidate) and ocp.utils.checkpoint_steps(candidate):
            return candidate
    return None


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


def _load_training_variables(
    checkpoints_dir: str, step: int | None
) -> tuple[Variables, dict[str, Any]]:
    """Step `step`, or the newest step that reads: a damaged newest checkpoint (a run killed by a full disk,
    a truncated copy) is skipped with a one-line warning, never moved or deleted (readers do not touch a
    workdir; the next training run moves it aside)."""
    steps = sorted(ocp.utils.checkpoint_steps(checkpoints_dir))
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {checkpoints_dir}: {steps}"
            )
        return _read_training_step(checkpoints_dir, step)
    tried = []
    for candidate in reversed(steps):
        try:
            return _read_training_step(checkpoints_dir, candidate)
        except Exception as e:  # Orbax and TensorStore raise many kinds for damaged files
            reason = str(e).split("\n", 1)[0][:160]
            tried.append(f"step {candidate} ({type(e).__name__}: {reason})")
            _log.warning(
                "checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                candidate,
                checkpoints_dir,
                type(e).__name__,
                reason,
            )
    raise FileNotFoundError(
        f"no readable checkpoint in {checkpoints_dir}: tried {'; '.join(tried)}"
    )


def _read_training_step(checkpoints_dir: str, step: int) -> tuple[Variables, dict[str, Any]]:
    step_dir = os.path.join(checkpoints_dir, str(step))
    variables = _read_params_and_batch_stats(os.path.join(step_dir, STATE_ITEM))
    config = _read_json_item(os.path.join(step_dir, CONFIG_ITEM))
    num_classes = config.get("num_classes")
    fc = variables["params"].get("fc")
    if num_classes is None and fc is not None:
        num_classes = int(fc["kernel"].shape[-1])
    metadata = {"step": step, "config": config, "model": config.get("model")}
    metadata["num_classes"] = num_classes
    return variables, metadata


def _read_params_and_batch_stats(state_dir: str) -> Variables:
    """The `params` and `batch_stats` sub-trees of a saved TrainState, as numpy arrays.

    The state item is read on its own, with the PyTree handler (same format as what StandardSave wrote): unlike
    the standard handler it restores a sub-tree, so the optimizer state (2-3x the params) is never read, and
    unlike a composite restore of the step it never looks at the other items (the Grain iterator state).
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(state_dir)).tree
        wanted = {
            name: tree[name] for name in ("params", "batch_stats") if tree.get(name) is not None
        }
        if "params" not in wanted:
            raise ValueError(f"{state_dir} holds no 'params'")
        restored = handler.restore(
            epath.Path(state_dir),
            args=ocp.args.PyTreeRestore(
                item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted),
                restore_args=jax.tree.map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted
                ),
                partial_restore=True,
            ),
        )
    finally:
        handler.close()
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}


def _read_json_item(item_dir: str) -> dict[str, Any]:
    """A JSON item of a checkpoint step (e.g. the run's config), or {} when the step has none."""
    if not os.path.isdir(item_dir):
        return {}
    return dict(ocp.JsonCheckpointHandler().restore(epath.Path(item_dir)) or {})
