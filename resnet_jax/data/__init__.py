"""Datasets and the Grain input pipeline.

Three kinds of source behind one pipeline (`config.dataset`):
- "digits": scikit-learn's 1,797 handwritten digits, bundled and offline (train 1,293 / validation 144 /
  test 360, fixed stratified splits);
- "folder:/path/to/root": a folder of images, root/<class>/<image> (or root/train/... with root/val/...
  and root/test/...);
- any other string: a TFDS dataset prepared as ArrayRecord (`python -m resnet_jax.data.prepare NAME`).

Modules: `pipeline` (config -> splits -> batches), `stream` (the training order: the same global batches on
any topology), `transforms` (decode, augment, normalize), `sources` (digits, TFDS, held-out shares),
`folder` (image folders), `prepare` (the TFDS preparation command).

The trainer uses `dataset_info`, `create_train_iterator`, `create_eval_batches` and `num_eval_batches`;
`resnet_jax.predict` uses `eval_preprocessor`. See `pipeline` and `stream` for the guarantees (validation apart
from test, global batches independent of processes, devices and workers, the step as the data position, exact
eval).
"""

from resnet_jax.data.pipeline import (
    DatasetInfo,
    DatasetSpec,
    create_eval_batches,
    create_train_iterator,
    dataset_info,
    dataset_spec,
    eval_preprocessor,
    normalization_stats,
    num_eval_batches,
)
from resnet_jax.data.sources import DataError

__all__ = [
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "create_eval_batches",
    "create_train_iterator",
    "dataset_info",
    "dataset_spec",
    "eval_preprocessor",
    "normalization_stats",
    "num_eval_batches",
]
