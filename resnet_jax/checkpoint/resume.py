"""Resuming a run: the newest checkpoint that is usable, damaged ones moved aside, config changes checked.

`restore_newest_usable` walks the run's checkpoints from the newest. A checkpoint is *damaged* when a file is
missing, truncated or unreadable, or a restored value is not finite: it is moved to
`checkpoints/unusable/<step>.<reason>` (never deleted) with a one-line warning, and the next older one is tried.
A checkpoint is *incompatible* when it is intact but does not fit the run (another model, optimizer or number
of classes): that is an error in the command, not on disk, so nothing is moved and one
`IncompatibleCheckpointError` says what changed. The trainer's checkpoints hold no data position (it is the
global step, see `resnet_jax.data.stream`), so they resume on any number of processes; only an older checkpoint
with a per-process `data` item, restored with a `data_iterator`, needs the number of processes that wrote it.

Config changes are judged before anything is restored (`resnet_jax.checkpoint.config_changes`: refused
changes raise, the others are logged). Whatever the config says, the saved TrainState's structure is also
compared with the new one's before the restore, so a mismatch is reported as a short tree diff instead of
Orbax's traceback.

Several processes agree on every verdict (an all-gather of "could I read it?"), so they all move the same
checkpoint aside (process 0 renames it) and all restore the same step. What each process can check before
the restore (the state's metadata, and its iterator file when a `data_iterator` is restored) is checked that
way; a shard that only one process reads and finds truncated is not: Orbax's restore ends in a barrier the
other processes wait at, so that run stops with Orbax's error instead of falling back.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax.checkpoint.checkpointer import (
    IncompatibleCheckpointError,
    TrainingCheckpointer,
    abstract_like,
)
from resnet_jax.checkpoint.config_changes import ConfigChanges, check_config_change
from resnet_jax.checkpoint.variables import CONFIG_ITEM, STATE_ITEM
from resnet_jax.tree_diff import MAX_LISTED, diff_shapes

PyTree = Any

_log = logging.getLogger(__name__)

# The full path lists of a structure mismatch, when longer than the message shows.
MISMATCH_REPORT = "resume_mismatch.txt"


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint of the run was damaged (each one was moved aside)."""


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def tree_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """`{"opt_state/1/0/trace/fc/kernel": shape}` for a pytree of arrays.

    The paths read like Orbax's saved key paths (field names of dataclasses and named tuples, indices of
    tuples), so a TrainState compares path by path with what `TrainingCheckpointer` reads back.
    """
    return {
        "/".join(_key_name(key) for key in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def check_structure(
    saved_shapes: Mapping[str, tuple[int, ...] | None],
    target_state: PyTree,
    where: str,
    hint: str,
    report_path: str,
) -> None:
    """Raises IncompatibleCheckpointError when the saved TrainState's paths or shapes differ from the target's.

    `saved_shapes` maps each saved path to its shape, or None where only the path is known. The message
    starts with a summary line and the hint, lists at most `MAX_LISTED` paths per kind, and writes the full
    lists to `report_path` when they are longer.
    """
    target = tree_shapes(abstract_like(target_state))
    saved = {
        path: target.get(path, ()) if shape is None else shape
        for path, shape in saved_shapes.items()
    }
    diff = diff_shapes(target, saved)
    if not diff:
        return
    summary = f"cannot resume {where}: its training state does not fit this run's"
    titles = {
        "missing_title": "in this run, not in the checkpoint",
        "unexpected_title": "in the checkpoint, not in this run",
    }
    message = diff.format(summary, hint, **titles)
    if max(len(diff.missing), len(diff.unexpected), len(diff.misshaped)) > MAX_LISTED:
        if jax.process_index() == 0:
            with open(report_path, "w", encoding="utf-8") as f:
                f.write(diff.format(summary, hint, max_listed=1 << 30, **titles) + "\n")
        message += f"\nthe full lists: {report_path}"
    raise IncompatibleCheckpointError(message)


def _agree(problem: str | None) -> str | None:
    """Multi-process: a checkpoint is usable only if every process could read its part of it."""
    if jax.process_count() == 1:
        return problem
    flags = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    if problem is None and flags.any():
        failed = [int(i) for i in np.flatnonzero(flags)]
        return f"process(es) {failed} could not read their part of it (see their logs)"
    return problem


def _readable_problem(checkpointer: TrainingCheckpointer, step: int, data: bool) -> str | None:
    """What is missing or unreadable in checkpoint `step` before any array is read, or None."""
    if not os.path.isfile(os.path.join(checkpointer.step_directory(step), STATE_ITEM, "_METADATA")):
        return "state/_METADATA is missing"
    try:
        checkpointer.saved_state_paths(step)
    except (OSError, ValueError, KeyError, TypeError) as e:  # garbled JSON or another layout
        return f"state/_METADATA is unreadable ({_short(e)})"
    if data:
        checkpointer.check_data_processes(step)  # another process count: an error, not damage
        path = checkpointer.data_file(step)
        relative = os.path.relpath(path, checkpointer.step_directory(step))
        if not os.path.isfile(path):
            return f"the data iterator file {relative} is missing"
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"the data iterator file {relative} is unreadable ({_short(e)})"
    return None


def _short(error: BaseException) -> str:
    """`Type: first line`, at most ~160 characters (TensorStore appends pages of JSON spec)."""
    text = str(error).split("\n", 1)[0].split(" See full TensorStore details", 1)[0]
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _slug(problem: str) -> str:
    """A short directory-name reason for `problem`."""
    for needle, slug in (
        ("_METADATA is missing", "missing-state-metadata"),
        ("_METADATA is unreadable", "bad-state-metadata"),
        ("array file", "bad-state-data"),
        ("data iterator", "bad-data-file"),
        ("non-finite", "non-finite"),
        ("process(es)", "unreadable-on-another-process"),
    ):
        if needle in problem:
            return slug
    return "restore-failed"


def _saved_config(checkpointer: TrainingCheckpointer, step: int) -> dict[str, Any] | None:
    """The config saved with `step`, else the workdir's `config.json` (the previous run's), else None."""
    try:
        if os.path.isdir(os.path.join(checkpointer.step_directory(step), CONFIG_ITEM)):
            if saved := checkpointer.saved_config(step):
                return dict(saved)
    except Exception as e:  # a damaged config item does not stop the state from being restored
        _log.warning("checkpoint %d: its saved config is unreadable (%s)", step, _short(e))
    path = os.path.join(os.path.dirname(checkpointer.directory), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return None


def _check_fits(
    checkpointer: TrainingCheckpointer,
    step: int,
    target_state: PyTree,
    config: Mapping[str, Any] | None,
) -> tuple[ConfigChanges, str]:
    """Raises IncompatibleCheckpointError for a refused config change or saved paths that differ from the
    target's; returns the config changes and the hint a later shape mismatch is worded with."""
    where = f"from checkpoint {step} in {checkpointer.directory}"
    changes = ConfigChanges({})
    saved = _saved_config(checkpointer, step)
    if config is not None and saved is not None:
        changes = check_config_change(saved, config, where)
    hint = (
        f"the config changed since it was written: {changes.describe()}"
        if changes.changed
        else "the code that builds the model or the optimizer changed since it was written"
    )
    hint += "; resume with the config and code that wrote it, or start a new --workdir"
    check_structure(
        dict.fromkeys(checkpointer.saved_state_paths(step)),
        target_state,
        where,
        hint,
        os.path.join(os.path.dirname(checkpointer.directory), MISMATCH_REPORT),
    )
    return changes, hint


def _restore(
    checkpointer: TrainingCheckpointer,
    step: int,
    target_state: PyTree,
    data_iterator: Any | None,
    check: Callable[[PyTree], str | None] | None,
    hint: str,
) -> tuple[str | None, PyTree]:
    """`(None, state)`, or `(why it is unusable, None)` as every process agrees.

    A restore that fails with a storage error (TensorStore, OCDBT) means damage. Any other failure is first
    checked for arrays of another shape (the paths already matched): that is an IncompatibleCheckpointError,
    never a reason to move the checkpoint aside.
    """
    state = None
    try:
        state = checkpointer.restore(step, target_state, data_iterator)
    except (IncompatibleCheckpointError, MemoryError, PermissionError):
        raise  # this run's problem, not the checkpoint's: moving it aside would not help
    # Orbax, TensorStore and Grain raise many kinds of errors for damaged files.
    except Exception as e:
        text = str(e)
        if any(sign in text for sign in ("reading array", "OCDBT", ".zarray")):
            problem = f"an array file in state/ is missing, truncated or corrupt ({_short(e)})"
        else:
            _check_shapes(checkpointer, step, target_state, hint)
            problem = f"restoring it failed ({_short(e)})"
    else:
        problem = check(state) if check is not None else None
    problem = _agree(problem)
    return problem, (state if problem is None else None)


def _check_shapes(
    checkpointer: TrainingCheckpointer, step: int, target_state: PyTree, hint: str
) -> None:
    """Raises IncompatibleCheckpointError when the saved arrays' shapes differ from the target's."""
    try:
        saved = tree_shapes(checkpointer.saved_state_metadata(step))
    except Exception:  # unreadable array headers: damage, judged by the caller
        return
    check_structure(
        saved,
        target_state,
        f"from checkpoint {step} in {checkpointer.directory}",
        hint,
        os.path.join(os.path.dirname(checkpointer.directory), MISMATCH_REPORT),
    )


def _quiet_closed_loop_callbacks() -> None:
    """Drops the noise a restore that failed on a damaged file leaves behind: TensorStore callbacks that later
    reach Orbax's closed event loop ("Exception ignored ... Event loop is closed"), and Orbax read coroutines
    closed while holding the read error. Python would print each as a traceback after the one-line warning that
    already said what happened. Every other unraisable exception still goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        # An Orbax read coroutine of the failed restore, closed while still holding the read error.
        origin = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
        if f"{os.sep}orbax{os.sep}" in origin:
            return
        previous(unraisable)

    hook.quiets_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    # The same read tasks, when garbage-collected with their error unretrieved, are reported by asyncio's
    # logger ("Task exception was never retrieved") rather than by the unraisable hook.
    logging.getLogger("asyncio").addFilter(
        lambda record: "Task exception was never retrieved" not in record.getMessage()
    )


def restore_newest_usable(
    checkpointer: TrainingCheckpointer,
    target_state: PyTree,
    data_iterator: Any | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    check: Callable[[PyTree], str | None] | None = None,
) -> tuple[int, PyTree] | None:
    """`(step, state)` of the newest checkpoint that restores, or None when the run has none (a fresh start).

    Damaged checkpoints (a file missing, truncated or unreadable; `check(state)` returning a problem, e.g.
    non-finite values) are moved aside with a one-line warning each, and the next older one is tried.

    Args:
      checkpointer: the run's checkpointer.
      target_state: what to restore onto (structure, dtypes, shardings), as for `TrainingCheckpointer.restore`.
      data_iterator: moved to the position saved in the checkpoint's per-process `data` item (older
        checkpoints). The trainer passes None and writes no such item (its data position is the step, see
        `resnet_jax.data.stream`); with None, a checkpoint's `data` item is ignored.
      config: the new run's config (JSON values): compared with the checkpoint's before restoring.
      check: returns why a restored state cannot be trained from, or None.

    Raises:
      IncompatibleCheckpointError: a refused config change, a TrainState that does not fit, or (only with a
        `data_iterator`) a `data` item written by another number of processes.
      NoUsableCheckpointError: there were checkpoints and none restored (lists each one tried and why).
    """
    tried: list[str] = []
    _quiet_closed_loop_callbacks()
    while steps := checkpointer.all_steps():
        step = steps[-1]
        problem = _agree(_readable_problem(checkpointer, step, data_iterator is not None))
        if problem is None:
            changes, hint = _check_fits(checkpointer, step, target_state, config)
            problem, state = _restore(checkpointer, step, target_state, data_iterator, check, hint)
            if problem is None:
                if changes.changed:
                    _log.warning(
                        "resuming from step %d with config changes: %s", step, changes.describe()
                    )
                return step, state
        moved_to = checkpointer.move_aside(step, _slug(problem))
        tried.append(f"step {step}: {problem}")
        older = checkpointer.all_steps()
        _log.warning(
            "checkpoint %d is unusable: %s; moved it to %s; %s",
            step,
            problem,
            moved_to,
            f"trying step {older[-1]}" if older else "no older checkpoint is left",
        )
    if tried:
        raise NoUsableCheckpointError(
            f"no usable checkpoint in {checkpointer.directory}: tried {'; '.join(tried)}. Each was moved "
            f"to {os.path.join(checkpointer.directory, 'unusable')}; rerun to start afresh, or restore one "
            "of them by hand"
        )
    return None
