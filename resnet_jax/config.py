"""The config schema: every key the trainer reads, its default and meaning, and the one validation.

Recipes in `configs/` start from `base_config()` and override values; they cannot add keys (a typo in a
config file or a `--config.key=value` flag must not be silently ignored). This module is cheap to import:
configs load it without pulling in the trainer, Orbax, Grain or TensorBoard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from resnet_jax.parallel import PARALLELISMS

# The choices of each enumerated key; the modules that act on them import these names (PARALLELISMS is
# parallel.py's own).
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("imagenet", "cifar", "none")
NORMALIZATIONS = ("dataset", "imagenet")
FINETUNE_MODES = ("full", "frozen_bn", "linear_probe")
AUTO_AUGMENTS = ("none", "trivial_augment", "rand_augment")
TASKS = ("classification", "segmentation")
HEAD_NORMS = ("group", "batch")


def base_config() -> ml_collections.ConfigDict:
    """Every config key, with its default. Recipes override values; they cannot add keys."""
    config = ml_collections.ConfigDict()
    _add_model_and_data_keys(config)
    _add_optimization_keys(config)
    _add_run_keys(config)
    return config


def _add_model_and_data_keys(config: ml_collections.ConfigDict) -> None:
    placeholder = ml_collections.config_dict.placeholder
    # Model.
    config.model = "cifar_resnet20"  # a name of resnet_jax.list_models()
    config.zero_init_residual = False  # last BN scale of each block starts at 0 (Goyal et al. 2017)
    config.dtype = "float32"  # compute dtype (params, BN statistics and the loss stay float32)
    config.dropout_rate = 0.0  # networks with dropout only (wide_resnet28_10: the paper's 0.3)
    # JAX's persistent compilation cache: a second run of the same command skips XLA's compilation of
    # every step that took over a second to compile. "" turns it off.
    config.compilation_cache_dir = "~/.cache/resnet_jax/jax_compilation_cache"
    # CPU runs: glibc's malloc keeps the memory XLA frees after each step instead of returning it to the OS
    # and page-faulting it back in (resnet_jax.host_memory: resnet18 at 32 px, ~28 ms of kernel time per
    # 70-90 ms step). False leaves malloc as it is. GPU and TPU runs never change it.
    config.retain_host_memory = True

    # Data (resnet_jax.data).
    config.dataset = "digits"  # "digits" (bundled, offline), "folder:/path/to/root", or a TFDS name
    config.data_dir = placeholder(str)  # TFDS data_dir; None = TFDS's default
    # None: the dataset's own splits. eval_split is the validation split (evaluated during training; it
    # ranks checkpoints); the test split is evaluated once at the end (test_*). digits: train 1,293 /
    # validation 144 / test 360; folders: val/ or validation/, else folder_val_fraction of train held out
    # by path hash, plus test/ if present; TFDS: its validation split (no test), else 10% of train held
    # out by index hash, plus test. Naming eval_split evaluates on that split, with no separate test.
    config.train_split = placeholder(str)
    config.eval_split = placeholder(str)
    config.image_size = 32  # model input height = width; images are resized to it
    # "imagenet" (random-resized crop + flip) | "cifar" (pad-crop + flip) | "none";
    # None: "none" for digits, "cifar" for datasets of images up to 64 px, else "imagenet".
    config.augment = placeholder(str)
    config.crop_padding = 4  # "cifar" augmentation: pixels of zero padding before the random crop
    config.normalization = "dataset"  # "dataset" (its own mean/std) | "imagenet" (torchvision's)
    # Recipe augmentations (torchvision's "how to train state-of-the-art models"), all off by default.
    # auto_augment: after the crop and flip, one of AUTO_AUGMENTS (TrivialAugmentWide, RandAugment).
    config.auto_augment = "none"
    config.rand_augment_num_ops = 2  # RandAugment: ops per image ...
    config.rand_augment_magnitude = 9  # ... and their magnitude bin, 0..30 (torchvision's 31 bins)
    config.random_erasing_prob = 0.0  # chance of erasing a random box, after normalization
    # Eval resolution (FixRes): 0 = image_size. "imagenet" eval resizes to eval_image_size /
    # eval_crop_fraction, then center-crops eval_image_size (torchvision's 232 -> 224 is 224, 224/232).
    config.eval_image_size = 0
    config.eval_crop_fraction = 0.875
    # Progressive resizing (FFCV's ResNet-50 recipe): 0 = off; else the train resolution ramps linearly
    # from this size at progressive_resize_epochs[0] to image_size at progressive_resize_epochs[1], in
    # multiples of progressive_resize_multiple (one compiled train step per resolution).
    config.progressive_resize_min_size = 0
    config.progressive_resize_epochs = (0.0, 0.0)
    config.progressive_resize_multiple = 32
    config.folder_val_fraction = 0.1  # "folder:" without val/: share held out by path hash
    config.max_bad_image_fraction = 0.01  # "folder:": fail if more images than this are unreadable
    config.num_workers = 0  # Grain worker processes; 0 = in the main process
    config.num_read_threads = 16  # decoding threads in process (capped at the cores); 1 per worker
    config.prefetch_buffer_size = 500  # records read ahead per process
    config.worker_buffer_size = 2  # batches each Grain worker keeps ready


def _add_optimization_keys(config: ml_collections.ConfigDict) -> None:
    # Length and batch.
    config.batch_size = 128  # global, over all devices and processes
    config.eval_batch_size = 0  # global; 0 = batch_size
    config.num_epochs = 10.0
    config.num_train_steps = -1  # > 0 overrides num_epochs

    # Optimizer (resnet_jax.optim).
    config.optimizer = "sgd"  # one of OPTIMIZERS
    config.learning_rate = 0.1  # peak, unless learning_rate_per_256 > 0
    # > 0: the peak is this x the run's global batch_size / 256 (the linear scaling rule, applied at run
    # time, so --config.batch_size=... rescales it); the resolved rate is logged.
    config.learning_rate_per_256 = 0.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4  # on kernels only, never BN parameters or biases
    config.lars_trust_coefficient = 0.001
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
    config.label_smoothing = 0.0
    # Mixup / CutMix over the global batch (torchvision's semantics, timm's probabilities); 0 = off.
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.mix_prob = 1.0  # probability that a batch is mixed (when an alpha > 0)
    config.switch_prob = 0.5  # both alphas > 0: probability of CutMix rather than mixup
    config.ema_decay = (
        0.0  # > 0: keep an EMA of params and BN statistics, also evaluated (eval_ema_*)
    )

    # Learning-rate schedule.
    config.lr_schedule = "cosine"  # one of LR_SCHEDULES, after linear warmup
    config.warmup_epochs = 0.0
    config.lr_decay_epochs = ()  # "step": boundaries in epochs ...
    config.lr_decay_steps = ()  # ... or in steps (exactly one of the two)
    config.lr_decay_factor = 0.1


def _add_run_keys(config: ml_collections.ConfigDict) -> None:
    # Devices.
    config.parallelism = "shard_map"  # "shard_map" (jit over a global mesh) | "pmap"
    config.bn_sync = True  # BN statistics over the global batch; False: per device (no all-reduce)

    # Loop, logging, checkpoints.
    config.seed = 0
    config.log_every_steps = 50
    config.eval_every_steps = 0  # 0 = once per epoch
    config.checkpoint_every_steps = 0  # 0 = once per epoch
    config.checkpoints_to_keep = 3  # the latest N checkpoints (a run resumes from the newest) ...
    config.best_checkpoints_to_keep = 1  # ... plus the N with the best best_metric

    # Fine-tuning (resnet_jax.finetune): start from a checkpoint's backbone under a new classifier.
    # init_from: a training workdir or a `python -m resnet_jax.convert` checkpoint; "" = from scratch.
    config.init_from = ""
    # "full" | "frozen_bn" (BN normalizes with running statistics) | "linear_probe" (only the head trains).
    config.finetune_mode = "full"
    config.backbone_lr_multiplier = 1.0  # every non-classifier parameter's lr / the head's lr

    # Task (resnet_jax.dense for "segmentation": an FPN over C2..C5 and a per-pixel head).
    config.task = "classification"  # one of TASKS
    config.fpn_channels = 32  # segmentation: FPN width
    config.head_channels = 32  # segmentation: per-level conv width of the head
    config.head_norm = "group"  # segmentation head's norm: "group" (no state) | "batch"
    # dataset "digit_canvases": scikit-learn digits pasted on canvases, per-pixel labels.
    config.canvas_size = 48  # canvas side (= image_size)
    config.canvas_digit_sizes = (10, 20)  # digit side range in px
    config.canvas_train_examples = 4096
    config.canvas_eval_examples = 512  # validation and test canvases each
    # The eval metric that ranks checkpoints (best_checkpoints_to_keep); higher is better.
    config.best_metric = "eval_accuracy"


class ConfigError(ValueError):
    """The config names an unknown key or a value the trainer cannot run."""


def to_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists; anything exotic becomes its repr).

    What `config.json`, the checkpoints and TensorBoard's hparams record, so all three agree.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=repr))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# key -> (test, what the value must be). One table, so every rule is visible at once and each error
# names the key, the value and what is allowed.
def _choice(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {list(choices)}"


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_number(v) and v >= low), f"a number >= {low:g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v > 0), "an integer > 0"


def _int_in(low: int, high: float = math.inf, note: str = "") -> tuple[Callable[[Any], bool], str]:
    allowed = f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high}]"
    return (lambda v: _is_int(v) and low <= v <= high), allowed + note


def _ordered_pair(
    element: Callable[[Any], bool], allowed: str
) -> tuple[Callable[[Any], bool], str]:
    def valid(v: Any) -> bool:
        return isinstance(v, tuple | list) and len(v) == 2 and all(map(element, v)) and v[0] <= v[1]

    return valid, allowed


def _fraction(upper_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    if upper_open:
        return (lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"
    return (lambda v: _is_number(v) and 0 <= v <= 1), "a number in [0, 1]"


def _of_type(kind: type, name: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, kind) and not (kind is int and isinstance(v, bool))), name


def _optional_string() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or isinstance(v, str)), "a string, or None for the default"


def _boundaries() -> tuple[Callable[[Any], bool], str]:
    def valid(v: Any) -> bool:
        return isinstance(v, tuple | list) and all(_is_number(b) and b > 0 for b in v)

    return valid, "a tuple of positive numbers, e.g. (30, 60, 80)"


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": _of_type(str, "a model name"),
    "dataset": ((lambda v: isinstance(v, str) and v != ""), "a dataset name or folder:/path"),
    "data_dir": _optional_string(),
    "train_split": _optional_string(),
    "eval_split": _optional_string(),
    "init_from": _of_type(str, 'a path, or "" to train from scratch'),
    "compilation_cache_dir": _of_type(
        str, 'a directory, or "" for no persistent compilation cache'
    ),
    "zero_init_residual": _of_type(bool, "True or False"),
    "retain_host_memory": _of_type(bool, "True or False"),
    "nesterov": _of_type(bool, "True or False"),
    "bn_sync": _of_type(bool, "True or False"),
    "seed": _of_type(int, "an integer"),
    "num_train_steps": _of_type(int, "an integer (> 0 overrides num_epochs)"),
    "lr_decay_epochs": _boundaries(),
    "lr_decay_steps": _boundaries(),
    "dtype": _choice(DTYPES),
    "optimizer": _choice(OPTIMIZERS),
    "lr_schedule": _choice(LR_SCHEDULES),
    "normalization": _choice(NORMALIZATIONS),
    "parallelism": _choice(PARALLELISMS),
    "finetune_mode": _choice(FINETUNE_MODES),
    "image_size": _positive_int(),
    "batch_size": _positive_int(),
    "log_every_steps": _positive_int(),
    "checkpoints_to_keep": _positive_int(),
    "crop_padding": _at_least(0),
    "eval_batch_size": _at_least(0),
    "num_workers": _at_least(0),
    "num_read_threads": _positive_int(),
    "prefetch_buffer_size": _positive_int(),
    "worker_buffer_size": _positive_int(),
    "num_epochs": _at_least(0),
    "eval_every_steps": _at_least(0),
    "checkpoint_every_steps": _at_least(0),
    "best_checkpoints_to_keep": _at_least(0),
    "learning_rate": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
    "momentum": _fraction(upper_open=True),
    "weight_decay": _at_least(0),
    "lars_trust_coefficient": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
    "adam_b1": _fraction(upper_open=True),
    "adam_b2": _fraction(upper_open=True),
    "adam_eps": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
    "grad_clip_norm": _at_least(0),
    "label_smoothing": _fraction(upper_open=True),
    "ema_decay": _fraction(upper_open=True),
    "warmup_epochs": _at_least(0),
    "lr_decay_factor": ((lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "folder_val_fraction": ((lambda v: _is_number(v) and 0 < v < 1), "a number in (0, 1)"),
    "max_bad_image_fraction": _fraction(),
    "backbone_lr_multiplier": _at_least(0),
    "dropout_rate": _fraction(upper_open=True),
    "learning_rate_per_256": _at_least(0),
    "mixup_alpha": _at_least(0),
    "cutmix_alpha": _at_least(0),
    "mix_prob": _fraction(),
    "switch_prob": _fraction(),
    "auto_augment": _choice(AUTO_AUGMENTS),
    "rand_augment_num_ops": _positive_int(),
    "rand_augment_magnitude": _int_in(0, 30),
    "random_erasing_prob": _fraction(),
    "eval_image_size": _int_in(0, note=" (0 = image_size)"),
    "eval_crop_fraction": ((lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "progressive_resize_min_size": _int_in(0, note=" (0 = off)"),
    "progressive_resize_epochs": _ordered_pair(
        lambda e: _is_number(e) and e >= 0, "a pair (start_epoch, end_epoch) with 0 <= start <= end"
    ),
    "progressive_resize_multiple": _positive_int(),
    "task": _choice(TASKS),
    "fpn_channels": _positive_int(),
    "head_channels": _positive_int(),
    "head_norm": _choice(HEAD_NORMS),
    "canvas_size": _positive_int(),
    "canvas_digit_sizes": _ordered_pair(
        lambda e: _is_int(e) and e > 0, "a pair (smallest, largest) of positive integers"
    ),
    "canvas_train_examples": _positive_int(),
    "canvas_eval_examples": _positive_int(),
    "best_metric": (
        (lambda v: isinstance(v, str) and v.startswith("eval_")),
        'the name of an eval metric, e.g. "eval_accuracy" or "eval_mean_iou"',
    ),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first unknown key or value the trainer cannot run, and what is allowed."""
    # Imported here so that importing this module (every config file does) stays light.
    from resnet_jax.models import list_models

    known = set(base_config().keys())
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; the keys are those of resnet_jax.config.base_config()"
        )
    missing = sorted(known - set(config.keys()))
    if missing:
        raise ConfigError(
            f"config lacks key(s) {missing}; start from resnet_jax.config.base_config()"
        )
    for key, (valid, allowed) in _RULES.items():
        if not valid(config[key]):
            raise ConfigError(f"config.{key}={config[key]!r} is invalid; it must be {allowed}")
    if config.model not in list_models():
        raise ConfigError(
            f"config.model={config.model!r} is not a model; choose one of {', '.join(list_models())}"
        )
    if config.augment is not None and config.augment not in AUGMENTS:
        raise ConfigError(
            f"config.augment={config.augment!r} is invalid; it must be one of {list(AUGMENTS)} "
            "or None (the dataset's default)"
        )
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("set config.num_epochs > 0 or config.num_train_steps > 0")
    if (size := config.progressive_resize_min_size) > config.image_size:
        raise ConfigError(f"config.progressive_resize_min_size={size} > image_size; lower it")
    if config.finetune_mode != "full" and not config.init_from:
        raise ConfigError(
            f"config.finetune_mode={config.finetune_mode!r} needs config.init_from (a checkpoint to "
            "fine-tune); set it, or use finetune_mode='full' to train from scratch"
        )
    _check_task(config)


TASK_METRICS = {  # the eval metrics of each task that can rank checkpoints (higher is better)
    "classification": ("accuracy", "top5_accuracy"),
    "segmentation": ("mean_iou", "pixel_accuracy"),
}
# Classification options the segmentation task does not apply: left at their defaults (augment: or "none").
CLASSIFICATION_ONLY = "augment auto_augment random_erasing_prob label_smoothing mixup_alpha cutmix_alpha dropout_rate progressive_resize_min_size eval_image_size"


def _check_task(config: ml_collections.ConfigDict) -> None:
    """The keys that must agree with `config.task`: dataset, input size, options and best_metric."""
    segmentation, defaults = config.task == "segmentation", base_config()
    if segmentation != (config.dataset == "digit_canvases"):
        raise ConfigError(
            f"config.task={config.task!r} cannot train on config.dataset={config.dataset!r}: task "
            "'segmentation' needs dataset 'digit_canvases' (per-pixel labels), others 'classification'"
        )
    if segmentation and config.image_size != config.canvas_size:
        raise ConfigError(
            f"config.image_size={config.image_size} differs from config.canvas_size="
            f"{config.canvas_size}: the canvas is the model input; set both to the same size"
        )
    for key in CLASSIFICATION_ONLY.split() if segmentation else ():
        if config[key] not in (defaults[key], "none"):
            raise ConfigError(
                f"config.{key}={config[key]!r} is a classification option that task 'segmentation' "
                f"does not apply (it would have to move the label map too); leave it {defaults[key]!r}"
            )
    prefixes = ("eval_", "eval_ema_") if config.ema_decay > 0 else ("eval_",)
    allowed = [prefix + name for prefix in prefixes for name in TASK_METRICS[config.task]]
    if config.best_metric not in allowed:
        raise ConfigError(
            f"config.best_metric={config.best_metric!r} is not an eval metric of task "
            f"{config.task!r}; choose one of {allowed}"
        )
