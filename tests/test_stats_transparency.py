"""The estimated normalization statistics see transparent pixels as training does: over ALPHA_BACKGROUND."""

import io

import numpy as np
from PIL import Image

from resnet_jax.data import sources, transforms


class _PngSource(sources.Source):
    """Two 8x8 PNGs: opaque mid-grey, and fully transparent with black hidden colour."""

    def __init__(self):
        grey = Image.new("RGB", (8, 8), (128, 128, 128))
        hidden_black = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
        self._records = []
        for image in (grey, hidden_black):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._records.append({"image": buffer.getvalue(), "label": np.int32(0), "path": ""})

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[index]


def test_estimated_mean_composites_transparency_over_the_training_background():
    mean, std = sources.estimate_stats(_PngSource())
    # Training decodes the transparent image as white (255), so the mean of the two is (128 + 255) / 2 / 255.
    white = np.asarray(transforms.ALPHA_BACKGROUND) / 255.0
    expected = (128 / 255 + white) / 2
    np.testing.assert_allclose(mean, expected, atol=1e-9)
    np.testing.assert_allclose(std, np.abs(white - 128 / 255) / 2, atol=1e-6)
