"""What a training run writes as it goes: metrics files (JSONL, TensorBoard), a progress bar, log lines.

Everything here runs on the host, after metrics have been fetched from the devices, and only the main
process writes: the trainer constructs `MetricWriter(workdir, enabled=jax.process_index() == 0)` and
`progress_bar(..., enabled=jax.process_index() == 0)`, so other processes print and write nothing.

TensorBoard event files are written with the `tensorboard` package's own writer and protos; TensorFlow is
not needed (and not imported). Metric names in TensorBoard are the keys of `metrics.jsonl`. TensorBoard and
matplotlib (`resnet_jax.plot`, for curves.png) are imported only when something is written, so importing this
module stays light.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import numpy as np
import tqdm
from flax import traverse_util

from resnet_jax.config import to_json

METRICS_FILENAME = "metrics.jsonl"
CONFIG_FILENAME = "config.json"
CURVES_FILENAME = "curves.png"
TENSORBOARD_DIRNAME = "tensorboard"


def _to_float(name: str, value: Any) -> float:
    """A Python float from a Python/numpy/jax scalar (a 0-d or 1-element array); anything else is an error."""
    if isinstance(value, int | float):  # Python scalars, bool included (numpy's go below)
        return float(value)
    array = np.asarray(value)  # fetches a jax.Array from its device
    # dtype kinds: bool, int, uint, float, complex; bfloat16 (ml_dtypes) reports "V" but is a float.
    is_numeric = array.dtype.kind in "biuf" or array.dtype.name == "bfloat16"
    if array.size != 1 or not is_numeric:
        raise TypeError(
            f"metric {name!r} must be a real scalar; got {type(value).__name__} "
            f"of shape {array.shape} and dtype {array.dtype}"
        )
    scalar = array.reshape(())[()]
    if array.dtype.kind in "fV" and array.dtype.itemsize < 8:
        # The shortest decimal that round-trips the float32/bf16 value: 0.02, not 0.019999999552965164.
        return float(str(scalar))
    return float(scalar)


class MetricWriter:
    """Writes scalar metrics to `<workdir>/metrics.jsonl` and to TensorBoard in `<workdir>/tensorboard/`.

    One JSON object per `write` call, `{"step": step, name: value, ...}`, appended, so a resumed run
    continues the same file (steps that are logged again after a resume appear twice; readers such as
    `resnet_jax.plot.load_metrics` keep the last value). With `enabled=False` (processes other than 0)
    every method is a no-op and nothing is created on disk.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        # Imported here so that processes that never write do not pay for TensorBoard's import.
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(workdir, exist_ok=True)
        # Line-buffered: each record reaches the file when written, so `tail -f`, `plot` and a crash
        # all see every logged step.
        self._jsonl = open(
            os.path.join(workdir, METRICS_FILENAME), "a", buffering=1, encoding="utf-8"
        )
        # flush_secs bounds how stale TensorBoard can be while training; `flush()` forces it.
        self._events = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIRNAME), flush_secs=30)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, METRICS_FILENAME)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar `metrics` (Python, numpy or jax scalars) at `step`."""
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        step = int(step)
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        # JSON has no NaN/Infinity; write them as null so every line stays parseable by strict readers.
        record = {"step": step}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def write_hparams(self, config: Mapping[str, Any]) -> None:
        """Saves `config` as `<workdir>/config.json` and as TensorBoard text and HParams summaries.

        Nested keys are flattened with dots (`optimizer.momentum`). The HParams plugin takes only
        bools, numbers and strings: other values (lists, None) are shown as their JSON text.
        """
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary
        from tensorboard.plugins.text import summary_v2 as text_summary

        config_json = to_json(config)
        with open(os.path.join(self.workdir, CONFIG_FILENAME), "w", encoding="utf-8") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
            f.write("\n")

        hparams = {
            key: (value if isinstance(value, bool | int | float | str) else json.dumps(value))
            for key, value in traverse_util.flatten_dict(config_json, sep=".").items()
        }
        table = "| key | value |\n|---|---|\n" + "".join(
            f"| {key} | `{hparams[key]}` |\n" for key in sorted(hparams)
        )
        now = time.time()
        for summary in (
            text_summary.text_pb("config", table),
            hparams_summary.hparams_pb(hparams, start_time_secs=now),
        ):
            self._events.add_event(event_pb2.Event(wall_time=now, step=0, summary=summary))
        self.flush()

    def plot_curves(self, out_png: str | None = None) -> str | None:
        """Flushes and redraws this run's loss/accuracy curves, by default to `<workdir>/curves.png`.

        The trainer calls this after each evaluation and at the end. Returns the PNG's path (None
        when disabled).
        """
        if not self.enabled:
            return None
        from resnet_jax.plot import plot_curves  # matplotlib: only when drawing

        out_png = os.path.join(self.workdir, CURVES_FILENAME) if out_png is None else out_png
        self.flush()
        plot_curves(self.metrics_path, out_png)
        return out_png

    def flush(self) -> None:
        """Makes everything written so far visible to readers (TensorBoard, `plot_curves`)."""
        if not self.enabled:
            return
        self._jsonl.flush()
        self._events.flush()

    def close(self) -> None:
        if not self.enabled or self._jsonl is None:
            return
        self.flush()
        self._jsonl.close()
        self._events.close()
        self._jsonl = None
        self._events = None
        self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _ImagesPerSecondBar(tqdm.tqdm):
    """A tqdm bar over steps that also shows images/s: its (smoothed) step rate times the global batch."""

    def __init__(self, *args: Any, images_per_step: int, **kwargs: Any):
        self.images_per_step = images_per_step  # before tqdm's __init__, which already renders
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        rate = values.get("rate")
        if rate is None and values.get(
            "elapsed"
        ):  # no smoothed rate yet: the average, as tqdm shows
            rate = (values["n"] - values["initial"]) / values["elapsed"]
        values["images_per_s"] = f"{rate * self.images_per_step:,.0f}" if rate else "?"
        return values


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int,
    *,
    enabled: bool,
    desc: str,
    initial: int = 0,
    images_per_step: int | None = None,
    file: TextIO | None = None,
) -> tqdm.tqdm:
    """A tqdm bar over steps: done/total, steps/s, ETA, and images/s when `images_per_step` is given.

    Disabled (`bar.disable`, every method a no-op) when not `enabled` or when `file` (default stderr) is not
    a terminal, so log files and CI output stay free of carriage-return noise. `initial` is the step a
    resumed run starts at; `images_per_step` is the global batch size. Postfix values (`bar.set_postfix(
    loss=...)`) stay shown until replaced.
    """
    file = sys.stderr if file is None else file
    options: dict[str, Any] = dict(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        file=file,
        dynamic_ncols=True,
        disable=not (enabled and _is_terminal(file)),
        # Rate and ETA from a moving average: in an overall average the first (compiling) step would
        # dominate the ETA for a long time.
        smoothing=0.1,
    )
    if images_per_step is None:
        return tqdm.tqdm(**options)
    return _ImagesPerSecondBar(
        **options,
        images_per_step=images_per_step,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
        "[{elapsed}<{remaining}, {rate_fmt}, {images_per_s} img/s{postfix}]",
    )


def format_metrics(step: int, metrics: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """One log line, e.g. `step 500: train_loss 0.1234, eval_accuracy 0.9812`."""
    names = list(keys) if keys is not None else list(metrics)
    parts = [f"{k} {_to_float(k, metrics[k]):.4g}" for k in names if k in metrics]
    return f"step {int(step)}: " + ", ".join(parts)
