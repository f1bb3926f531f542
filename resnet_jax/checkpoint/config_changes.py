"""Config changes on resume: what changed between the config saved with a checkpoint and the new run's.

`config_changes` compares the two (as JSON values); `REFUSED_CHANGES` lists the keys whose change makes the
checkpoint unusable (they change the TrainState's structure or what its values mean, or what the data position
means), and every other change is allowed and logged. `check_config_change` raises a one-line
`IncompatibleCheckpointError` naming each refused change and why. `resume.restore_newest_usable` calls it
before anything is restored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from resnet_jax.checkpoint.checkpointer import IncompatibleCheckpointError

_ABSENT = "(absent)"


def _is_on(value: Any) -> bool:
    return bool(value)


def _changed_since_it_existed(old: Any, new: Any) -> bool:
    """A change, unless the checkpoint predates the key (then the run did not use it)."""
    return old != _ABSENT and old != new


# key -> (does this change break the checkpoint?, why). The TrainState's structure follows the model, the
# number of classes (from the dataset), the optimizer, EMA on/off, gradient clipping on/off and the
# fine-tuning parameter groups; the dataset and the global batch size define the data position (the step).
# The task picks the model (classifier or FPN segmenter) and the data; the canvas keys define the canvases
# (a checkpoint from before a key existed was a classification run: only the task rule applies to it).
# Everything else (learning rate, schedule, length, logging, compute dtype: the state stays float32, image
# size: the classifier follows a global pool, parallelism, BN sync) leaves the checkpoint usable.
REFUSED_CHANGES: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "model": (lambda old, new: old != new, "the checkpoint holds that model's parameters"),
    "dataset": (
        lambda old, new: old != new,
        "the classifier and the data position belong to that dataset",
    ),
    "batch_size": (
        lambda old, new: old != new,
        "the data position is the step, and a step of another global batch is other examples",
    ),
    "optimizer": (
        lambda old, new: old != new,
        "the optimizer state (momentum, Adam moments) is that optimizer's",
    ),
    "ema_decay": (
        lambda old, new: _is_on(old) != _is_on(new),
        "EMA on/off changes what the training state holds",
    ),
    "grad_clip_norm": (
        lambda old, new: _is_on(old) != _is_on(new),
        "clipping on/off changes the optimizer state's structure",
    ),
    "finetune_mode": (
        lambda old, new: old != new,
        "it changes BatchNorm's mode and the optimizer's parameter groups",
    ),
    "task": (
        lambda old, new: (old if old != _ABSENT else "classification") != new,
        "it changes the model (classifier or segmenter) and the data",
    ),
    **{
        key: (_changed_since_it_existed, "the canvases and the data position belong to it")
        for key in ("canvas_size", "canvas_digit_sizes", "canvas_train_examples")
    },
}


@dataclasses.dataclass(frozen=True)
class ConfigChanges:
    """Keys whose value differs between the checkpoint's config and the new one: `key: (old, new)`."""

    changed: dict[str, tuple[Any, Any]]

    def refused(self) -> list[str]:
        return [
            key
            for key, (old, new) in self.changed.items()
            if key in REFUSED_CHANGES and REFUSED_CHANGES[key][0](old, new)
        ]

    def describe(self, keys: list[str] | None = None) -> str:
        """`learning_rate 0.1 -> 0.05, num_epochs 10.0 -> 20.0`."""
        keys = list(self.changed) if keys is None else keys
        return ", ".join(
            f"{key} {self.changed[key][0]!r} -> {self.changed[key][1]!r}" for key in keys
        )


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> ConfigChanges:
    """The keys that differ, in the new config's order (JSON values: tuples and lists compare equal)."""
    saved, new = _jsonable(saved), _jsonable(new)
    changed = {
        key: (saved.get(key, _ABSENT), new.get(key, _ABSENT))
        for key in [*new, *(k for k in saved if k not in new)]
        if saved.get(key, _ABSENT) != new.get(key, _ABSENT)
    }
    return ConfigChanges(changed)


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=repr))


def check_config_change(
    saved: Mapping[str, Any], new: Mapping[str, Any], where: str
) -> ConfigChanges:
    """Raises IncompatibleCheckpointError (one line) for a refused change; returns all the changes."""
    changes = config_changes(saved, new)
    if refused := changes.refused():
        reasons = "; ".join(
            f"config.{key} changed {changes.changed[key][0]!r} -> {changes.changed[key][1]!r} "
            f"({REFUSED_CHANGES[key][1]})"
            for key in refused
        )
        raise IncompatibleCheckpointError(
            f"cannot resume {where}: {reasons}. Set it back to resume, or use a new --workdir "
            "(config.init_from=<this workdir> fine-tunes from its weights)"
        )
    return changes
