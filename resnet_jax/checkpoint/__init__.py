"""Checkpoints, in three modules:

- `variables`: a model's `{'params', 'batch_stats'}` on their own. `save_variables` writes a variables
  checkpoint (what `python -m resnet_jax.convert` produces); `load_variables` reads the variables from one, or
  from a training workdir's latest (or given) step. Needs Orbax only, so conversion, prediction and
  fine-tuning never import Grain.
- `checkpointer`: `TrainingCheckpointer`, the trainer's Orbax `CheckpointManager` for the whole run (TrainState,
  Grain iterator position, config): save, preserve, resume.
- `preemption`: `PreemptionWatcher` (SIGTERM as a flag in a single process) and `preemption_message`.

This package re-exports only the variables I/O; import the trainer's parts from their modules, e.g.
`from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer`.
"""

from __future__ import annotations

from typing import Any

from resnet_jax.checkpoint.variables import load_variables, save_variables

__all__ = ["load_variables", "save_variables"]

# TEMPORARY, until training.py and its tests import from the submodules (see the docstring): these names
# lived here before the split. Resolved lazily, so `import resnet_jax.checkpoint` still never imports Grain.
_MOVED = {
    "TrainingCheckpointer": "resnet_jax.checkpoint.checkpointer",
    "abstract_like": "resnet_jax.checkpoint.checkpointer",
    "PreemptionWatcher": "resnet_jax.checkpoint.preemption",
    "preemption_message": "resnet_jax.checkpoint.preemption",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
