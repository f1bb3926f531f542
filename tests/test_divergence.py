"""`checkpoint.divergence`: which checkpoints a diverged run sets aside, and what it says.

The end-to-end case (a learning rate of 200 through `train.py`, then a sane rerun) is in tests/test_faults.py.
"""

from __future__ import annotations

import math
import os

import numpy as np

from resnet_jax.checkpoint.checkpointer import UNUSABLE_SUBDIR, TrainingCheckpointer
from resnet_jax.checkpoint.divergence import exploded_loss_bound, set_aside_diverged


def _checkpointer_with(tmp_path, steps: list[int]) -> TrainingCheckpointer:
    checkpointer = TrainingCheckpointer(
        str(tmp_path), save_every_steps=1, max_to_keep=10, async_save=False, handle_sigterm=False
    )
    for step in steps:
        assert checkpointer.save(step, {"w": np.full((2,), float(step), np.float32)})
    return checkpointer


def test_the_bound_is_ten_times_the_loss_of_a_uniform_guess():
    assert math.isclose(exploded_loss_bound(10), 10 * math.log(10))
    assert math.isclose(exploded_loss_bound(1000), 10 * math.log(1000))
    assert exploded_loss_bound(1) == exploded_loss_bound(2)  # one class: never a bound of 0


def test_only_judged_checkpoints_above_the_bound_or_non_finite_are_moved_aside(tmp_path):
    with _checkpointer_with(tmp_path, [1, 2, 4, 6, 8]) as checkpointer:
        losses = {
            2: 2.0,
            4: 23.1,
            6: float("nan"),
            8: float("inf"),
        }  # 1: an older run's, not judged
        message = set_aside_diverged(checkpointer, losses, bound=23.0)
        assert checkpointer.all_steps() == [1, 2]
        unusable = os.path.join(checkpointer.directory, UNUSABLE_SUBDIR)
        assert sorted(os.listdir(unusable)) == ["4.diverged", "6.diverged", "8.diverged"]
        assert "checkpoint(s) 4, 6, 8 had already diverged" in message
        assert "step 2 in" in message and "resumes from it" in message


def test_nothing_is_moved_when_every_judged_loss_is_sane(tmp_path):
    with _checkpointer_with(tmp_path, [2, 4]) as checkpointer:
        message = set_aside_diverged(checkpointer, {2: 0.5, 4: 23.0, 6: 1e9}, bound=23.0)
        assert checkpointer.all_steps() == [2, 4]  # 6 is not a kept checkpoint: nothing to move
        assert "moved aside" not in message and "step 4 in" in message


def test_when_every_checkpoint_diverged_the_rerun_starts_from_scratch(tmp_path):
    with _checkpointer_with(tmp_path, [2]) as checkpointer:
        message = set_aside_diverged(checkpointer, {2: 1e15}, bound=23.0)
        assert checkpointer.all_steps() == []
        assert message.endswith("no checkpoint is left, so a rerun starts from scratch")
