"""Every bad config value is one line naming the key, never a traceback: the schema's one validation."""

import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from resnet_jax import config as config_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# key -> values the trainer cannot run: a wrong type first, then out-of-range values. Every key of
# base_config() must have a row (checked below), so a new key comes with its validation.
BAD_VALUES = {
    "model": [3, "resnet19"],
    "zero_init_residual": ["yes"],
    "retain_host_memory": ["yes", 1],
    "dtype": [16, "float16"],
    "dataset": [None, ""],
    "data_dir": [7],
    "train_split": [1.5],
    "eval_split": [["test"]],
    "image_size": ["32", 0, -8, 12.5],
    "augment": [1, "random"],
    "crop_padding": ["4", -1],
    "normalization": [None, "per_image"],
    "folder_val_fraction": ["0.1", 0.0, 1.0, 1.5],
    "max_bad_image_fraction": ["1%", -0.1, 1.1],
    "num_workers": ["2", -1],
    "num_read_threads": [1.0, 0],
    "prefetch_buffer_size": ["x", 0],
    "worker_buffer_size": [None, 0],
    "batch_size": ["128", 0, -32, 64.0],
    "eval_batch_size": ["0", -1],
    "num_epochs": ["10", -1.0, float("nan")],
    "num_train_steps": [1.5, "100"],
    "optimizer": [None, "adam"],
    "learning_rate": ["0.1", 0.0, -1.0, float("inf")],
    "momentum": ["0.9", -0.1, 1.0],
    "nesterov": [1],
    "weight_decay": ["1e-4", -1e-4],
    "lars_trust_coefficient": [None, 0.0],
    "adam_b1": ["0.9", 1.0],
    "adam_b2": [None, -0.5],
    "adam_eps": ["1e-8", 0.0],
    "grad_clip_norm": ["1", -1.0],
    "label_smoothing": ["0.1", -0.1, 1.0],
    "ema_decay": ["0.99", 1.0, -0.5],
    "lr_schedule": [0, "linear"],
    "warmup_epochs": ["1", -1.0],
    "lr_decay_epochs": ["abc", ("a", "b"), (30, -1)],
    "lr_decay_steps": [5, (0,)],
    "lr_decay_factor": ["0.1", 0.0, 2.0],
    "parallelism": [None, "dp"],
    "bn_sync": ["True"],
    "seed": [1.5, "0"],
    "log_every_steps": [0, 2.5],
    "eval_every_steps": ["0", -1],
    "checkpoint_every_steps": [None, -5],
    "checkpoints_to_keep": [0, "3"],
    "best_checkpoints_to_keep": [-1, "1"],
    "init_from": [None, 0],
    "dropout_rate": ["0.3", -0.1, 1.0],
    "learning_rate_per_256": ["0.1", -1.0],
    "mixup_alpha": [None, -0.2],
    "cutmix_alpha": ["1", -1.0],
    "mix_prob": ["1", 1.5],
    "switch_prob": [None, -0.5],
    "compilation_cache_dir": [None, 0],
    "finetune_mode": [1, "probe"],
    "backbone_lr_multiplier": ["0.1", -0.5],
    "auto_augment": [None, "autoaugment", True],
    "rand_augment_num_ops": [0, 2.0],
    "rand_augment_magnitude": [-1, 31, "9"],
    "random_erasing_prob": ["0.25", -0.1, 1.5],
    "eval_image_size": [-1, 224.0, "224"],
    "eval_crop_fraction": [0.0, 1.2, "0.875"],
    "progressive_resize_min_size": [-1, 160.0, 64],  # 64: over the default image_size 32
    "progressive_resize_epochs": [(1.0,), (5.0, 2.0), (-1.0, 2.0), "0,10"],
    "progressive_resize_multiple": [0, 32.0],
    "task": ["detection", None],
    "fpn_channels": [0, 32.0],
    "head_channels": [-1, "32"],
    "head_norm": ["layer", None],
    "canvas_size": [0, 48.5],
    "canvas_digit_sizes": [(20, 10), (0, 10), (10,), 12],
    "canvas_train_examples": [0, "4096"],
    "canvas_eval_examples": [-1, 1.5],
    "best_metric": ["accuracy", None, ""],
}


def config_with(key, value) -> ml_collections.ConfigDict:
    # Built from a plain dict, so the value reaches validation whatever its type (a ConfigDict would
    # refuse some at assignment, as config files and flags do).
    values = config_lib.base_config().to_dict()
    values[key] = value
    return ml_collections.ConfigDict(values)


def test_every_key_has_bad_values_in_the_table():
    assert set(BAD_VALUES) == set(config_lib.base_config().keys())


def test_the_base_config_and_every_recipe_are_valid():
    config_lib.validate_config(config_lib.base_config())
    for recipe in sorted(os.listdir(os.path.join(REPO, "configs"))):
        spec = importlib.util.spec_from_file_location(
            "recipe", os.path.join(REPO, "configs", recipe)
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config_lib.validate_config(module.get_config())


@pytest.mark.parametrize(
    "key,value",
    [(key, value) for key, values in BAD_VALUES.items() for value in values],
    ids=lambda v: repr(v)[:20],
)
def test_a_bad_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate_config(config_with(key, value))
    message = str(error.value)
    assert f"config.{key}" in message
    assert "\n" not in message


def test_a_finetune_mode_without_a_checkpoint_is_refused():
    config = config_lib.base_config()
    config.finetune_mode = "linear_probe"
    with pytest.raises(config_lib.ConfigError, match="needs config.init_from"):
        config_lib.validate_config(config)


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "file_body, override, expected",
    [
        ("", "--config.lr_decay_epochs=abc", "config.lr_decay_epochs=('abc',) is invalid"),
        ("", "--config.image_size=abc", "--config.image_size=abc"),
        ("", "--config.learning_rate=-1", "config.learning_rate=-1.0 is invalid"),
        ('    config.batch_size = "abc"\n', "", "TypeError: Could not override field 'batch_size'"),
        ("    config.learning_rat = 0.1\n", "", "unknown config key(s) ['learning_rat']"),
        ("    return (\n", "", "recipe.py, line"),
    ],
    ids=[
        "tuple-override",
        "type-override",
        "range-override",
        "type-in-file",
        "typo-in-file",
        "syntax",
    ],
)
def test_train_py_answers_a_bad_config_with_one_line_and_exit_2(
    tmp_path, file_body, override, expected
):
    config_file = tmp_path / "recipe.py"
    config_file.write_text(
        "from resnet_jax.config import base_config\n\n\ndef get_config():\n"
        "    config = base_config()\n" + file_body + "    return config\n"
    )
    args = [f"--config={config_file}", f"--workdir={tmp_path / 'run'}"]
    result = run_train(args + ([override] if override else []))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
