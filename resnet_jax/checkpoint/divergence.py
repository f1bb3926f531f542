"""After a run diverges: set aside the checkpoints whose weights had already blown up, so a rerun can recover.

Saving only finite states (`training._Run.save`) is not enough. A diverging run passes through states whose
values are all finite but so large that no learning rate trains them back (seen: a loss of 1.7e15 at the
checkpoint before the NaN). Resuming from one of those with a lower learning rate diverges again, so the advice
"lower learning_rate and rerun" could not work until the user deleted checkpoints by hand.

The rule: a checkpoint is judged by the loss its own weights gave on the next training step (the step right
after it was saved, or right after the run resumed from it). When the run stops on a non-finite value, every
kept checkpoint of this run whose next-step loss was non-finite or above `exploded_loss_bound` is moved aside
(`TrainingCheckpointer.move_aside`, never deleted), and the rerun resumes from the newest one left, or from
scratch when none is. Checkpoints the run did not judge (older runs' best checkpoints) are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer

DIVERGED_REASON = "diverged"
# Cross-entropy of a uniform guess over C classes is ln C; a model still learning never averages ten times
# worse than guessing (a true class given probability ~e^-23 on average for 10 classes), while a diverged one
# reads 1e3 to 1e16. A bound on the absolute loss, unlike one relative to the run's lowest loss, does not
# fire on the noise of a nearly-converged run whose per-batch loss swings between 0.001 and 0.1.
EXPLODED_LOSS_FACTOR = 10.0


def exploded_loss_bound(num_classes: int) -> float:
    """The training loss above which a checkpoint's weights count as diverged: 10 x ln(num_classes)."""
    return EXPLODED_LOSS_FACTOR * math.log(max(num_classes, 2))


def set_aside_diverged(
    checkpointer: TrainingCheckpointer, next_step_losses: Mapping[int, float], bound: float
) -> str:
    """Moves aside the kept checkpoints whose next-step loss is non-finite or above `bound`; returns one
    sentence saying what was moved and what a rerun resumes from.

    `next_step_losses`: checkpoint step -> the training loss of the step after it (the same on every process,
    so every process moves the same checkpoints; `move_aside` is collective).
    """
    kept = set(checkpointer.all_steps())
    diverged = sorted(
        (step, loss)
        for step, loss in next_step_losses.items()
        if step in kept and not (math.isfinite(loss) and loss <= bound)
    )
    moved = [checkpointer.move_aside(step, DIVERGED_REASON) for step, _ in diverged]
    newest = checkpointer.latest_step()
    resumes = (
        f"the newest good checkpoint, step {newest} in {checkpointer.directory}, is kept and a rerun "
        "resumes from it"
        if newest is not None
        else "no checkpoint is left, so a rerun starts from scratch"
    )
    if not moved:
        return resumes
    losses = ", ".join(f"step {step}: {loss:.3g}" for step, loss in diverged)
    return (
        f"checkpoint(s) {', '.join(str(step) for step, _ in diverged)} had already diverged (the loss "
        f"their weights gave on the next step, {losses}, is above {bound:.3g} = "
        f"{EXPLODED_LOSS_FACTOR:g} x ln(classes)) and were moved aside to "
        f"{moved[0].rsplit('/', 1)[0]}; {resumes}"
    )
