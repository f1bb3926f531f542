"""Draws loss and accuracy curves from one or more runs' `metrics.jsonl` into a PNG.

    python -m resnet_jax.plot runs/default/metrics.jsonl --out curves.png
    python -m resnet_jax.plot runs/a runs/b --labels sgd adamw --out compare.png   # workdirs work too

The trainer writes the same figure to `<workdir>/curves.png` at each evaluation and at the end
(`MetricWriter.plot_curves`). Colours stand for what was measured (train, eval, ...) in both panels;
line styles tell runs apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax.reporting import METRICS_FILENAME

# (panel, metric, legend name) of every curve the plot can hold; curves a run has not logged are skipped.
CURVES = (
    ("loss", "train_loss", "train"),
    ("loss", "eval_loss", "eval"),
    ("loss", "eval_ema_loss", "eval EMA"),
    ("accuracy", "train_accuracy", "train"),
    ("accuracy", "eval_accuracy", "eval"),
    ("accuracy", "eval_ema_accuracy", "eval EMA"),
    ("accuracy", "eval_top5_accuracy", "eval top-5"),
)
# One colour per legend name, the same in both panels and for every run.
COLORS = {
    "train": "tab:blue",
    "eval": "tab:orange",
    "eval EMA": "tab:red",
    "eval top-5": "tab:green",
}
RUN_LINE_STYLES = ("-", "--", ":", "-.")
PANELS = ("loss", "accuracy")


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


def _run_label(metrics_path: str) -> str:
    """`runs/resnet20/metrics.jsonl` -> `resnet20`."""
    path = os.path.abspath(metrics_path)
    if os.path.basename(path) == METRICS_FILENAME:
        path = os.path.dirname(path)
    return os.path.basename(path)


def _draw_run(
    panels: dict[str, Any], series: dict[str, tuple[np.ndarray, np.ndarray]], label: str, style: str
) -> set[str]:
    """Draws one run's curves into the panels; returns the panels it drew in."""
    drawn = set()
    for panel, metric, name in CURVES:
        if metric not in series:
            continue
        steps, values = series[metric]
        # A single eval point is invisible as a line: mark evals so early curves show.
        marker = "o" if metric.startswith("eval") and len(steps) < 30 else None
        panels[panel].plot(
            steps,
            values,
            style,
            color=COLORS[name],
            marker=marker,
            markersize=3,
            label=f"{label} {name}" if label else name,
        )
        drawn.add(panel)
    return drawn


def _label_panel(ax: Any, panel: str, has_curves: bool) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(panel)
    ax.set_title(panel)
    ax.grid(True, alpha=0.3)
    if has_curves:
        ax.legend(fontsize="small")
    else:
        ax.text(
            0.5, 0.5, f"no {panel} logged yet", ha="center", va="center", transform=ax.transAxes
        )


def _save_png(fig: Any, out_png: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    # Write then rename, so a reader (or a browser refreshing the file) never sees half a PNG.
    tmp = f"{out_png}.tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out_png)


def plot_curves(
    metrics_paths: Sequence[str] | str,
    out_png: str,
    labels: Sequence[str] | None = None,
) -> None:
    """Draws loss and accuracy vs step for one or more runs into a PNG.

    Colours are what was measured (train blue, eval orange, ...); with several runs each has its own line
    style and legend label (`labels`, or its workdir's name). Curves a run has not logged yet (no eval so
    far) are left out; a run with no metrics at all draws empty panels that say so, so the call never fails
    mid-training.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    paths = [metrics_paths] if isinstance(metrics_paths, str) else list(metrics_paths)
    if labels is None:
        labels = [_run_label(p) for p in paths]
    elif len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} metrics files")

    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 4.5))
    panels = dict(zip(PANELS, axes, strict=True))
    drawn: set[str] = set()
    for run, (path, label) in enumerate(zip(paths, labels, strict=True)):
        series = load_metrics(path) if os.path.exists(path) else {}
        style = RUN_LINE_STYLES[run % len(RUN_LINE_STYLES)]
        drawn |= _draw_run(panels, series, label if len(paths) > 1 else "", style)
    for panel, ax in panels.items():
        _label_panel(ax, panel, panel in drawn)
    if len(paths) == 1:
        fig.suptitle(labels[0])
    fig.tight_layout()
    try:
        _save_png(fig, out_png)
    finally:
        plt.close(fig)


def _metrics_path(path: str) -> str:
    """A workdir stands for its `metrics.jsonl`."""
    return os.path.join(path, METRICS_FILENAME) if os.path.isdir(path) else path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.plot",
        description="Plot training/eval loss and accuracy vs step for one or more runs.",
    )
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files or training workdirs")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    args = parser.parse_args(argv)

    paths = [_metrics_path(p) for p in args.metrics]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"error: no metrics file at {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.labels is not None and len(args.labels) != len(paths):
        print(
            f"error: --labels got {len(args.labels)} labels for {len(paths)} runs", file=sys.stderr
        )
        return 2
    plot_curves(paths, args.out, labels=args.labels)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
