"""Checkpoints, in five modules:

- `variables`: a model's `{'params', 'batch_stats'}` on their own. `save_variables` writes a variables
  checkpoint (what `python -m resnet_jax.convert` produces); `load_variables` reads the variables from one, or
  from a training workdir's latest (or given) step. Needs Orbax only, so conversion, prediction and
  fine-tuning never import Grain.
- `checkpointer`: `TrainingCheckpointer`, the trainer's Orbax `CheckpointManager` for the whole run (TrainState
  and config; the data position is the step): save, preserve, resume.
- `resume`: `restore_newest_usable`, what a run resumes from: the newest usable checkpoint, damaged ones moved
  aside to `checkpoints/unusable/`, a TrainState that does not fit reported as a short tree diff.
- `config_changes`: the saved config against the new one on resume: `REFUSED_CHANGES` (changes that break
  the state or the data position) raise one line, the rest are logged.
- `preemption`: `PreemptionWatcher` (SIGTERM as a flag in a single process) and `preemption_message`.

This package re-exports only the variables I/O; import the trainer's parts from their modules, e.g.
`from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer`.
"""

from __future__ import annotations

from resnet_jax.checkpoint.variables import load_variables, save_variables

__all__ = ["load_variables", "save_variables"]
