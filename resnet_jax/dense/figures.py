"""`predictions.png`: for a few canvases, the input, the true label map and the predicted one, side by side.

Drawn with PIL alone (no plotting library needed on a training machine): one row per canvas, each map
coloured with a fixed palette (background black, one colour per class) and scaled up for legibility.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

PREDICTIONS_FILENAME = "predictions.png"


def class_palette(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3): black for class 0 (background), evenly spaced saturated hues for the rest."""
    colours = [(0.0, 0.0, 0.0)] + [
        colorsys.hsv_to_rgb(k / max(num_classes - 1, 1), 0.85, 1.0) for k in range(num_classes - 1)
    ]
    return np.round(np.asarray(colours) * 255).astype(np.uint8)


def prediction_grid(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    scale: int = 3,
    gap: int = 4,
) -> np.ndarray:
    """uint8 RGB grid: a row per canvas of [input, truth, prediction], each `scale`x enlarged, `gap` px apart.

    `images` uint8 (N, H, W, 3) as the dataset gives them (not normalized); `labels`, `predictions` int (N, H, W).
    """
    if not images.shape[:3] == labels.shape == predictions.shape:
        raise ValueError(
            f"images {images.shape}, labels {labels.shape} and predictions {predictions.shape} differ"
        )
    palette = class_palette(num_classes)
    count, height, width = labels.shape
    cell_h, cell_w = height * scale, width * scale
    grid = np.full((count * cell_h + (count + 1) * gap, 3 * cell_w + 4 * gap, 3), 255, np.uint8)
    for row in range(count):
        panels = (
            images[row],
            palette[np.clip(labels[row], 0, num_classes - 1)],
            palette[np.clip(predictions[row], 0, num_classes - 1)],
        )
        top = gap + row * (cell_h + gap)
        for column, panel in enumerate(panels):
            left = gap + column * (cell_w + gap)
            enlarged = np.kron(panel, np.ones((scale, scale, 1), np.uint8))
            grid[top : top + cell_h, left : left + cell_w] = enlarged
    return grid


def write_predictions(
    path: str,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
) -> None:
    """Writes `prediction_grid(...)` as a PNG at `path`."""
    Image.fromarray(prediction_grid(images, labels, predictions, num_classes)).save(path)
