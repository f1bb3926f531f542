"""Prepare a TFDS dataset as ArrayRecord, once, before training: `python -m resnet_jax.data.prepare NAME`.

Training reads datasets with `tfds.data_source`, which needs the ArrayRecord file format and never downloads.
Building most image datasets (cifar10, imagenet2012, imagenette, ...) needs TensorFlow to encode the images, so
this command lives behind the `prepare` extra: `pip install .[prepare]`.

    python -m resnet_jax.data.prepare cifar10 --data_dir ~/tensorflow_datasets
    python -m resnet_jax.data.prepare imagenette/320px-v2 --data_dir /data/tfds

ImageNet (imagenet2012) cannot be downloaded automatically: register at https://image-net.org, download
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into a folder, and pass it as --manual_dir:

    python -m resnet_jax.data.prepare imagenet2012 --data_dir /data/tfds --manual_dir /data/imagenet_tars

Then train with `--config.dataset=imagenet2012 --config.data_dir=/data/tfds`.
"""

from __future__ import annotations

import importlib.util
import sys

from absl import app, flags, logging

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir",
    None,
    "Folder holding manually downloaded files (imagenet2012: the two ILSVRC2012 tars).",
)

MISSING_TENSORFLOW = (
    "Preparing TFDS datasets needs TensorFlow, which is not installed. Install the prepare extra: "
    "`pip install .[prepare]` (or `pip install tensorflow-cpu`), then rerun this command. Training itself does not "
    "need TensorFlow."
)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Downloads (or reads from manual_dir) and writes `name` as ArrayRecord; returns the dataset's directory."""
    if importlib.util.find_spec("tensorflow") is None:
        raise SystemExit(MISSING_TENSORFLOW)
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=download_config)
    logging.info("Prepared %s in %s: %s", name, builder.data_dir, dict(builder.info.splits))
    return str(builder.data_dir)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError(
            "usage: python -m resnet_jax.data.prepare NAME [--data_dir DIR] [--manual_dir DIR]"
        )
    print(prepare(argv[1], _DATA_DIR.value, _MANUAL_DIR.value))


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
