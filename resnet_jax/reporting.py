"""What a training run shows: metrics files (JSONL, TensorBoard), a progress bar, and PNG curves.

Everything here runs on the host, after metrics have been fetched from the devices, and only the main
process writes: the trainer constructs `MetricWriter(workdir, enabled=jax.process_index() == 0)` and
`ProgressBar(..., enabled=jax.process_index() == 0)`, so other processes print and write nothing.

TensorBoard event files are written with the `tensorboard` package's own writer and protos; TensorFlow is
not needed (and not imported). Metric names in TensorBoard are the keys of `metrics.jsonl`.
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

METRICS_FILENAME = "metrics.jsonl"
CONFIG_FILENAME = "config.json"
CURVES_FILENAME = "curves.png"
TENSORBOARD_DIRNAME = "tensorboard"


def _to_float(name: str, value: Any) -> float:
    """A Python float from a Python/numpy/jax scalar (a 0-d or 1-element array); anything else is an error."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
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


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}`; works for dicts and ml_collections ConfigDicts."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            value = value.to_dict() if hasattr(value, "to_dict") else value
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _json_safe(value: Any) -> Any:
    """Config values as JSON: tuples to lists, numpy scalars to Python, other objects to their repr."""
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        value = value.to_dict() if hasattr(value, "to_dict") else value
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


class MetricWriter:
    """Writes scalar metrics to `<workdir>/metrics.jsonl` and to TensorBoard in `<workdir>/tensorboard/`.

    One JSON object per `write` call, `{"step": step, name: value, ...}`, appended, so a resumed run
    continues the same file (steps that are logged again after a resume appear twice; readers such as
    `load_metrics` keep the last value). With `enabled=False` (processes other than 0) every method is a
    no-op and nothing is created on disk.
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
        bools, numbers and strings: other values (tuples, None) are shown as their JSON text.
        """
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary
        from tensorboard.plugins.text import summary_v2 as text_summary

        config_json = _json_safe(config)
        with open(os.path.join(self.workdir, CONFIG_FILENAME), "w", encoding="utf-8") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
            f.write("\n")

        flat = _flatten(config_json)
        hparams = {
            key: (value if isinstance(value, bool | int | float | str) else json.dumps(value))
            for key, value in flat.items()
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


class ProgressBar:
    """A tqdm bar for the main process: steps done/total, images/s, ETA, and the latest loss.

    Off (every method a no-op) with `enabled=False` and when stderr is not a terminal, so log files and
    CI output stay free of carriage-return noise. `images_per_step` is the global batch size: the bar
    shows the measured step rate times it as `img/s`. `initial` is the step a resumed run starts at.
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        desc: str = "train",
        initial: int = 0,
        images_per_step: int | None = None,
        file: Any = None,
    ):
        self.images_per_step = images_per_step
        file = sys.stderr if file is None else file
        self.enabled = enabled and _isatty(file)
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=50)
        if not self.enabled:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            file=file,
            dynamic_ncols=True,
            # Rate and ETA from a moving average of recent steps: in an overall average the first
            # (compiling) step would dominate the ETA for a long time.
            smoothing=0.1,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` steps; `postfix` values (e.g. `loss=...`) are shown after the bar."""
        if not self.enabled:
            return
        self._bar.update(n)
        self._recent.append((time.perf_counter(), self._bar.n))
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        if self.images_per_step and t1 > t0:
            # Over the last updates only, so the first (compiling) step soon stops counting.
            self._postfix["img/s"] = f"{(n1 - n0) * self.images_per_step / (t1 - t0):,.0f}"
        for key, value in postfix.items():
            try:
                self._postfix[key] = f"{_to_float(key, value):.4g}"
            except TypeError:
                self._postfix[key] = str(value)
        # The loss is fetched from the devices only every few steps: keep showing the last one between.
        if self._postfix:
            self._bar.set_postfix(self._postfix, refresh=False)

    def write(self, message: str) -> None:
        """Prints a line without breaking the bar (falls back to plain print when the bar is off)."""
        if self.enabled:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled and self._bar is not None:
            self._bar.close()
            self._bar = None
            self.enabled = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def load_metrics(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads a `metrics.jsonl` into `{name: (steps, values)}`, sorted by step.

    A step logged more than once (a resumed run re-logs steps after its last checkpoint) keeps its
    last value; null (non-finite) values and lines that do not parse (a run killed mid-write) are skipped.
    """
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or "step" not in record:
                continue
            step = int(record["step"])
            for name, value in record.items():
                if name == "step" or not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                series.setdefault(name, {})[step] = float(value)
    result = {}
    for name, by_step in series.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        result[name] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return result


# (panel, metric, legend suffix, line style) for every curve the plot can hold; missing ones are skipped.
_CURVES = (
    ("loss", "train_loss", "train", "-"),
    ("loss", "eval_loss", "eval", "--"),
    ("accuracy", "train_accuracy", "train", "-"),
    ("accuracy", "eval_accuracy", "eval", "--"),
    ("accuracy", "eval_top5_accuracy", "eval top-5", ":"),
)


def plot_curves(
    metrics_paths: Sequence[str] | str,
    out_png: str,
    labels: Sequence[str] | None = None,
) -> None:
    """Draws loss and accuracy vs step (train solid, eval dashed) for one or more runs into a PNG.

    Each run gets one color; runs are labelled by `labels` or by their workdir's name. Curves a run
    has not logged yet (no eval so far) are left out; a run with no metrics at all draws empty panels
    that say so, so the call never fails mid-training.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    paths = [metrics_paths] if isinstance(metrics_paths, str) else list(metrics_paths)
    if labels is None:
        labels = [_run_label(p) for p in paths]
    elif len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} metrics files")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = {"loss": axes[0], "accuracy": axes[1]}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {name: 0 for name in panels}
    for run, (path, label) in enumerate(zip(paths, labels, strict=True)):
        series = load_metrics(path) if os.path.exists(path) else {}
        for panel, metric, suffix, style in _CURVES:
            if metric not in series:
                continue
            steps, values = series[metric]
            name = f"{label} {suffix}" if len(paths) > 1 else suffix
            # A single eval point is invisible as a line: mark evals so early curves show.
            marker = "o" if metric.startswith("eval") and len(steps) < 30 else None
            panels[panel].plot(
                steps,
                values,
                style,
                color=colors[run % len(colors)],
                marker=marker,
                markersize=3,
                label=name,
            )
            drawn[panel] += 1
    for panel, ax in panels.items():
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        if drawn[panel]:
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5, 0.5, f"no {panel} logged yet", ha="center", va="center", transform=ax.transAxes
            )
    if len(paths) == 1:
        fig.suptitle(labels[0])
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(out_dir, exist_ok=True)
    # Write then rename, so a reader (or a browser refreshing the file) never sees half a PNG.
    tmp = f"{out_png}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


def _run_label(metrics_path: str) -> str:
    """`runs/resnet20/metrics.jsonl` -> `resnet20`."""
    path = os.path.abspath(metrics_path)
    if os.path.basename(path) == METRICS_FILENAME:
        path = os.path.dirname(path)
    return os.path.basename(path)


def format_metrics(step: int, metrics: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """One log line, e.g. `step 500: train_loss 0.1234, eval_accuracy 0.9812`."""
    names = list(keys) if keys is not None else list(metrics)
    parts = [f"{k} {_to_float(k, metrics[k]):.4g}" for k in names if k in metrics]
    return f"step {int(step)}: " + ", ".join(parts)
