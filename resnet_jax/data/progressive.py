"""Progressive resizing (FFCV's ResNet-50 recipe): the training resolution as a pure function of the step.

The side of global batch k is `ResolutionSchedule.size_at(k)`: `min_size` up to the start epoch, then a
linear ramp to `image_size` at the end epoch, rounded to a multiple of `multiple`, then `image_size`. The
epoch is the whole epoch batch k belongs to (k // steps_per_epoch), as FFCV evaluates its schedule once per
epoch. Being a function of the step alone, every process agrees on it, and a resumed run continues the ramp
where it stopped.

In the pipeline the resize is the last thing to know the step: `TrainPreprocess` with a recipe whose
`resize_later` is set (config.progressive_resize_min_size > 0) decodes each record (and draws its crop
box) in the stream, and `AtTrainResolution`, called by `stream.TrainBatches` on each row of global batch k,
finishes it at the size of the batch it lands in. An undecodable record's replacement therefore gets the
size of the batch it fills, whichever position it was read from. Each new size compiles the train step once
more (jit and pmap cache one program per input shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from resnet_jax.data.transforms import TrainPreprocess


@dataclasses.dataclass(frozen=True)
class ResolutionSchedule:
    """FFCV's `get_resolution(epoch)`, with the step as the clock."""

    min_size: int
    image_size: int
    start_epoch: float
    end_epoch: float
    multiple: int
    steps_per_epoch: int

    def __post_init__(self):
        if not 0 < self.min_size <= self.image_size:
            raise ValueError(
                f"progressive resizing from {self.min_size} px must start at a size in (0, "
                f"image_size={self.image_size}]; lower progressive_resize_min_size"
            )
        if self.steps_per_epoch <= 0 or self.multiple <= 0:
            raise ValueError(f"steps_per_epoch and multiple must be positive in {self}")

    @classmethod
    def from_config(cls, config: Any, steps_per_epoch: int) -> ResolutionSchedule | None:
        """The schedule of a config's progressive_resize_* keys; None when progressive resizing is off."""
        if config.progressive_resize_min_size <= 0:
            return None
        start_epoch, end_epoch = config.progressive_resize_epochs
        return cls(
            min_size=config.progressive_resize_min_size,
            image_size=config.image_size,
            start_epoch=float(start_epoch),
            end_epoch=float(end_epoch),
            multiple=config.progressive_resize_multiple,
            steps_per_epoch=steps_per_epoch,
        )

    def size_at(self, step: int) -> int:
        """The image side of global batch `step` (0-based: the batch training step step + 1 takes)."""
        epoch = step // self.steps_per_epoch
        if epoch <= self.start_epoch:
            return self.min_size
        if epoch >= self.end_epoch:
            return self.image_size
        fraction = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        size = self.min_size + fraction * (self.image_size - self.min_size)
        rounded = int(np.round(size / self.multiple)) * self.multiple
        return min(max(rounded, self.min_size), self.image_size)

    def sizes(self, num_steps: int) -> dict[int, int]:
        """{first step (1-based training step) at which a size is used: size}, over steps 1..num_steps."""
        changes: dict[int, int] = {}
        previous = None
        for epoch_start in range(0, num_steps, self.steps_per_epoch):
            size = self.size_at(epoch_start)
            if size != previous:
                changes[epoch_start + 1] = previous = size
        return changes


class AtTrainResolution:
    """Finishes a decoded training row at the size of the global batch it lands in."""

    def __init__(self, preprocess: TrainPreprocess, schedule: ResolutionSchedule):
        if not preprocess.resize_later:
            raise ValueError(
                "AtTrainResolution needs a TrainPreprocess whose recipe has resize_later"
            )
        self.preprocess = preprocess
        self.schedule = schedule

    def __call__(self, element: dict[str, Any], batch_index: int) -> dict[str, np.ndarray]:
        size = self.schedule.size_at(batch_index)
        image = self.preprocess.finish(element["decoded"], size, element["rng"])
        return {"image": image, "label": element["label"]}


def finisher(
    preprocess: TrainPreprocess, schedule: ResolutionSchedule | None
) -> AtTrainResolution | None:
    """What `stream.TrainBatches` calls on each row of batch k to finish it at that batch's size; None
    when `schedule` is None (no progressive resizing: `preprocess` finished every record itself)."""
    return None if schedule is None else AtTrainResolution(preprocess, schedule)


def describe_sizes(config: Any, steps_per_epoch: int, num_steps: int) -> str:
    """The run's image sizes for its summary line: "32x32" by default; with progressive resizing the step
    at which each train size starts, and the eval size where it differs (eval_image_size)."""
    size, eval_size = config.image_size, config.eval_image_size or config.image_size
    text = f"{size}x{size}"
    schedule = ResolutionSchedule.from_config(config, steps_per_epoch)
    if schedule is not None:
        starts = schedule.sizes(num_steps).items()
        text += f" (progressive resizing: {', '.join(f'{s} px from step {k}' for k, s in starts)})"
    if eval_size != size:
        text += f" train, eval at {eval_size}x{eval_size}"
    return text
