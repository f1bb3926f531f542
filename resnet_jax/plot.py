"""Draws loss and accuracy curves from one or more runs' `metrics.jsonl` into a PNG.

    python -m resnet_jax.plot runs/default/metrics.jsonl --out curves.png
    python -m resnet_jax.plot runs/a runs/b --labels sgd adamw --out compare.png   # workdirs work too

The trainer writes the same figure to `<workdir>/curves.png` at each evaluation and at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from resnet_jax.reporting import METRICS_FILENAME, plot_curves


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
