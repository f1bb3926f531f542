"""Top-k predictions of a checkpoint on image files.

    python -m resnet_jax.predict --checkpoint ckpt/resnet50_tv cat.jpg dog.png --top_k 5
    python -m resnet_jax.predict --checkpoint runs/default digit.png        # a training workdir

The checkpoint is anything `resnet_jax.checkpoint.load_variables` reads: a variables checkpoint
(`python -m resnet_jax.convert` writes one from torchvision weights) or a training workdir.

Preprocessing. A training workdir's images go through the trainer's own eval transform for its dataset
(its resize/crop and its mean/std). Otherwise images are preprocessed as torchvision evaluates: resize
the shorter side to `image_size / crop_fraction` (256 for 224), center-crop `image_size`, scale to
[0, 1], normalize with the ImageNet mean and std; the flags (or metadata keys `image_size`,
`crop_fraction`, `normalization`: a name or `{"mean": [...], "std": [...]}`) change that.

Class names: the metadata's `class_names`, else the training dataset's, else the ImageNet names when
the head has 1000 outputs, else class indices. Transparent pixels are composited over white.

A missing, unreadable or corrupt image, or one over `--max_image_pixels`, gets one error line (stderr)
and exit code 1; the other images are still predicted. A bad checkpoint, model or flag: exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet_jax import host_memory, steps
from resnet_jax.config import base_config
from resnet_jax.data import DataError, dataset_info, eval_preprocessor, transforms
from resnet_jax.data.pipeline import normalization_stats
from resnet_jax.models import CIFAR_MODELS, create_model, list_models
from resnet_jax.tree_diff import diff_variables

# Per-channel (mean, std) of pixel / 255 by name; "none" leaves pixels in [0, 1].
NORMALIZATIONS: dict[str, tuple[Sequence[float], Sequence[float]]] = {
    "imagenet": (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
IMAGENET_CROP_FRACTION = transforms.EVAL_CROP_FRACTION
# PIL refuses an image over twice Image.MAX_IMAGE_PIXELS as a possible decompression bomb (it only warns
# between one and two times), so this default refuses nothing that PIL itself would decode.
DEFAULT_MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# What shows through transparent pixels (white): the one conversion training and evaluation also use.
ALPHA_BACKGROUND = transforms.ALPHA_BACKGROUND
composite_alpha = transforms.composite_alpha

# (class index, class name, probability), most probable first.
Prediction = list[tuple[int, str, float]]


class PredictError(Exception):
    """A problem with the user's input (file, model name, checkpoint); the CLI prints it without a traceback."""


def load_image(
    path: str,
    image_size: int,
    crop_fraction: float = IMAGENET_CROP_FRACTION,
    normalization: str | Mapping[str, Sequence[float]] = "imagenet",
    channels: int = 3,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Reads one image file as a float32 `(image_size, image_size, channels)` array, ready for the model.

    As torchvision's eval transform: resize the shorter side to `int(image_size / crop_fraction)`
    (bilinear, antialiased), center-crop, scale to [0, 1], subtract mean and divide by std.
    `normalization` is a name of NORMALIZATIONS or `{"mean": [...], "std": [...]}`. Transparency is
    composited over ALPHA_BACKGROUND. Raises PredictError, naming the file and why, for a missing or
    unreadable file or one over `max_image_pixels` (0: no limit).
    """
    mean, std = _mean_std(normalization)
    mode = "L" if channels == 1 else "RGB"

    def decode(image: Image.Image) -> np.ndarray:
        # Decoded in full here, so the crop is torchvision's exactly (no reduced-size JPEG decoding).
        image = composite_alpha(image).convert(mode)
        return transforms.resize_and_center_crop(image, image_size, crop_fraction, mode=mode)

    pixels = read_image(path, decode, max_image_pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return transforms.normalize(pixels, mean[:channels], std[:channels])


def read_image(
    path: str,
    decode: Callable[[Image.Image], np.ndarray],
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """`decode(image)` of the file opened lazily, once its header shows at most `max_image_pixels`
    (0: no limit). A missing, unreadable, corrupt or too large file: a PredictError naming it and why."""
    if not os.path.isfile(path):
        raise PredictError(f"no image file at {path}")
    # PIL's global limit is lifted meanwhile: ours applies instead, and its error states the limit.
    saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_image_pixels and width * height > max_image_pixels:
                raise PredictError(
                    f"{path} is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_image_pixels:,} (a guard against decompression bombs); to read it pass "
                    f"--max_image_pixels {width * height} or more (0: no limit)"
                )
            return decode(image)
    except UnidentifiedImageError:
        raise PredictError(f"cannot read {path} as an image: not a format PIL recognizes") from None
    except transforms.UNDECODABLE_IMAGE_ERRORS as e:
        reason = str(e) or type(e).__name__
        raise PredictError(f"cannot read {path} as an image: {reason}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def _mean_std(
    normalization: str | Mapping[str, Sequence[float]],
) -> tuple[Sequence[float], Sequence[float]]:
    if isinstance(normalization, Mapping):
        return tuple(normalization["mean"]), tuple(normalization["std"])
    if normalization not in NORMALIZATIONS:
        raise PredictError(
            f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[normalization]


def class_names_for(num_classes: int, class_names: Sequence[str] | None = None) -> list[str] | None:
    """The names to show: the given ones, else ImageNet's for a 1000-way head, else None (indices)."""
    if class_names is not None:
        if len(class_names) != num_classes:
            raise PredictError(
                f"{len(class_names)} class names for a head with {num_classes} classes"
            )
        return list(class_names)
    if num_classes == 1000:
        from resnet_jax.imagenet_classes import IMAGENET_CLASSES

        return list(IMAGENET_CLASSES)
    return None


def _head_shape(variables: Mapping[str, Any]) -> tuple[int, int]:
    """(num_classes, in_channels) read from the checkpoint's own parameters."""
    params = variables.get("params", {})
    if "fc" not in params:
        raise PredictError("the checkpoint has no classifier ('fc'): it is a feature extractor")
    num_classes = int(np.shape(params["fc"]["bias"])[0])
    in_channels = int(np.shape(params["stem_conv"]["kernel"])[2])  # HWIO
    return num_classes, in_channels


def _check_variables_fit(model: Any, variables: Mapping[str, Any], model_name: str) -> None:
    """One error naming the mismatched entries, instead of a shape error deep inside `apply`."""
    image = jnp.zeros((1, 32, 32, model.in_channels), jnp.float32)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), image))
    diff = diff_variables(expected, variables)
    if diff:
        raise PredictError(
            diff.format(
                f"the checkpoint's variables do not fit {model_name}",
                hint="pass the --model the checkpoint was trained as",
            )
        )


def predict(
    variables: Mapping[str, Any],
    model_name: str,
    images: np.ndarray,
    top_k: int = 5,
    class_names: Sequence[str] | None = None,
    batch_size: int = 32,
    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> list[Prediction]:
    """Top-`top_k` classes for each image of a preprocessed batch `(N, H, W, C)` (see `load_image`).

    uint8 images are normalized with `pixel_stats` (mean, std) in the compiled function as eval steps do.
    Returns one list per image of `(class_index, class_name, probability)`, most probable first.
    Names come from `class_names`, else ImageNet's for 1000 classes, else the index as a string.
    """
    if model_name not in list_models():
        raise PredictError(f"unknown model {model_name!r}; available: {', '.join(list_models())}")
    images = np.asarray(images)
    images = images if images.dtype == np.uint8 else images.astype(np.float32)
    if images.ndim != 4:
        raise PredictError(f"expected a batch of images (N, H, W, C), got shape {images.shape}")
    num_classes, in_channels = _head_shape(variables)
    model = create_model(model_name, num_classes=num_classes, in_channels=in_channels)
    _check_variables_fit(model, variables, model_name)
    names = class_names_for(num_classes, class_names)
    top_k = min(top_k, num_classes)
    model_variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}

    @jax.jit
    def probabilities(x: jax.Array) -> jax.Array:
        x = steps.normalize_images(x, *(pixel_stats or (None, None)))
        return jax.nn.softmax(model.apply(model_variables, x, train=False), axis=-1)

    results = []
    for start in range(0, len(images), batch_size):
        probs = np.asarray(probabilities(images[start : start + batch_size]))
        for row in probs:
            top = np.argsort(-row, kind="stable")[:top_k]
            results.append(
                [(int(i), names[i] if names else str(int(i)), float(row[i])) for i in top]
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.predict",
        description="Print the top-k classes with probabilities for image files (transparent pixels "
        "composited over white). An unreadable file gets an error line and exit code 1; the others are "
        "still predicted.",
    )
    parser.add_argument("images", nargs="+", help="image files (anything PIL reads)")
    parser.add_argument("--checkpoint", required=True, help="variables checkpoint or workdir")
    parser.add_argument("--model", default=None, help="model name (default: from the checkpoint)")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument(
        "--image_size", type=int, default=None, help="crop size (default: checkpoint's, else 224)"
    )
    parser.add_argument(
        "--crop_fraction",
        type=float,
        default=None,
        help="crop / resize ratio (default 224/256; 1.0 for CIFAR models: resize only)",
    )
    parser.add_argument(
        "--normalization",
        default=None,
        choices=sorted(NORMALIZATIONS),
        help="pixel statistics (default: the checkpoint's, else imagenet)",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse larger images, a guard against decompression bombs (default: where PIL "
        "refuses, %(default)s; 0: no limit)",
    )
    args = parser.parse_args(argv)
    try:
        lines, failures = _run(args)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _training_config(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A training run's saved config (JSON) over `base_config()`, so keys the run predates have defaults."""
    return ml_collections.ConfigDict({**base_config().to_dict(), **saved})


def training_eval_preprocessor(
    config: Mapping[str, Any],
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    host_normalize: bool = True,
) -> Callable[[str], np.ndarray]:
    """The trainer's own eval transform for a saved training `config`: its resize/crop and its mean/std.

    A model trained here expects exactly what its evaluation fed it (e.g. the digits' own statistics,
    a whole-image resize for small-image recipes), so a training checkpoint is preprocessed by the data
    package rather than by `load_image`'s torchvision defaults. Files are read as by `read_image`, and
    transparency is composited over ALPHA_BACKGROUND as `load_image` does.
    """
    preprocessor = eval_preprocessor(_training_config(config), host_normalize=host_normalize)

    def load(path: str) -> np.ndarray:
        def decode(image: Image.Image) -> np.ndarray:
            # The encoded bytes, as the trainer's eval reads them (a JPEG's reduced-size decoding and
            # transparency over ALPHA_BACKGROUND included).
            with open(path, "rb") as f:
                return preprocessor.preprocess(f.read())

        return read_image(path, decode, max_image_pixels)

    return load


def _dataset_class_names(config: Mapping[str, Any]) -> list[str] | None:
    """The class names of a saved training config's dataset, or None when it is not readable here."""
    try:
        return list(dataset_info(_training_config(config)).class_names)
    except (DataError, OSError, ValueError):
        return None


def _image_loader(
    args: argparse.Namespace, model_name: str, metadata: Mapping[str, Any], in_channels: int
) -> tuple[Callable[[str], np.ndarray], Any]:
    """(loader, pixel_stats for `predict`): the training run's eval transform (uint8, and its dataset's
    (mean, std)) when the checkpoint has one and no flag overrides it, else torchvision's eval transform
    (normalized floats, None) with the flags' (or metadata's, or the model family's) settings."""
    config = metadata.get("config") or {}
    preprocessing_flags = (args.image_size, args.crop_fraction, args.normalization)
    if config.get("dataset") and all(flag is None for flag in preprocessing_flags):
        try:
            # uint8, as the trainer's eval batches: `predict` normalizes them as its eval step did.
            stats = normalization_stats(_training_config(config))
            return training_eval_preprocessor(config, args.max_image_pixels, False), stats
        except (ImportError, OSError, ValueError) as e:
            raise PredictError(
                f"cannot rebuild the eval transform of dataset {config['dataset']!r} ({e}); "
                "pass --image_size, --crop_fraction and --normalization"
            ) from None
    is_cifar = model_name in CIFAR_MODELS
    image_size = args.image_size or metadata.get("image_size") or (32 if is_cifar else 224)
    crop_fraction = args.crop_fraction or metadata.get("crop_fraction")
    crop_fraction = crop_fraction or (1.0 if is_cifar else IMAGENET_CROP_FRACTION)
    normalization = args.normalization or metadata.get("normalization") or "imagenet"

    def load(path: str) -> np.ndarray:
        return load_image(
            path, image_size, crop_fraction, normalization, in_channels, args.max_image_pixels
        )

    return load, None


def _load_checkpoint(args: argparse.Namespace) -> tuple[Mapping[str, Any], dict[str, Any], str]:
    """(variables, metadata, model name) of `--checkpoint`, checked against the flags."""
    from resnet_jax.checkpoint import load_variables

    if args.top_k < 1:
        raise PredictError(f"--top_k must be at least 1, got {args.top_k}")
    if args.max_image_pixels < 0:
        raise PredictError(
            f"--max_image_pixels must be >= 0 (0: none), got {args.max_image_pixels}"
        )
    if args.model is not None and args.model not in list_models():
        raise PredictError(f"unknown model {args.model!r}; available: {', '.join(list_models())}")
    if not os.path.exists(args.checkpoint):
        raise PredictError(f"no checkpoint at {args.checkpoint}")
    try:
        variables, metadata = load_variables(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(str(e)) from None

    model_name = args.model or metadata.get("model")
    if model_name is None:
        raise PredictError("the checkpoint does not name its model; pass --model")
    if args.model and metadata.get("model") not in (None, args.model):
        raise PredictError(
            f"the checkpoint holds {metadata['model']!r} but --model is {args.model!r}"
        )
    return variables, metadata, model_name


def _run(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(the output lines: each readable image's top-k, in the given order; one error per unreadable image).

    Raises PredictError for what stops every image: the checkpoint, the model or a flag.
    """
    variables, metadata, model_name = _load_checkpoint(args)
    config = metadata.get("config") or {}  # present for training checkpoints
    class_names = metadata.get("class_names")
    if class_names is None and config.get("dataset"):
        class_names = _dataset_class_names(config)
    load, stats = _image_loader(args, model_name, metadata, _head_shape(variables)[1])
    readable, images, failures = [], [], []
    for path in args.images:
        try:
            images.append(load(path))
            readable.append(path)
        except PredictError as e:
            failures.append(str(e))
    if not images:
        return [], failures
    results = predict(
        variables, model_name, np.stack(images), args.top_k, class_names, pixel_stats=stats
    )
    lines = []
    for path, prediction in zip(readable, results, strict=True):
        lines.append(path)
        for rank, (index, name, prob) in enumerate(prediction, start=1):
            label = f"{name} (class {index})" if name != str(index) else f"class {index}"
            lines.append(f"  {rank}. {prob:7.2%}  {label}")
    return lines, failures


if __name__ == "__main__":
    host_memory.retain_freed_memory()  # the command owns its process; main() alone leaves it as it is
    sys.exit(main())
