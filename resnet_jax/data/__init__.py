"""Datasets and the Grain input pipeline.

Three kinds of source behind one pipeline (`config.dataset`):
- "digits": scikit-learn's 1,797 handwritten digits, bundled and offline (train 1,437 / test 360, fixed split);
- "folder:/path/to/root": a folder of images, root/<class>/<image> (or root/train/... and root/val/...);
- any other string: a TFDS dataset prepared as ArrayRecord (`python -m resnet_jax.data.prepare NAME`).

The trainer uses `dataset_info`, `create_train_iterator` and `create_eval_batches`; see `pipeline` for the
config keys and guarantees (determinism, per-process shards, checkpointable iterator state, exact eval).
"""

from resnet_jax.data.pipeline import (
    DatasetInfo,
    create_eval_batches,
    create_train_iterator,
    dataset_info,
    num_eval_batches,
)
from resnet_jax.data.sources import DataError

__all__ = [
    "DataError",
    "DatasetInfo",
    "create_eval_batches",
    "create_train_iterator",
    "dataset_info",
    "num_eval_batches",
]
