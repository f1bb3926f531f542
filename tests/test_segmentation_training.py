"""The segmentation task through `train.py`: fine-tuning from a classifier, resume, predictions.png, and an
exact mIoU on 2 devices equal to one device's on the same weights.

Tiny sizes (16 px canvases, 8-channel FPN and head, a few steps) so that compiling dominates; each CLI run
is a subprocess with its own simulated devices.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import checkpoint, train_state
from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer
from resnet_jax.config import ConfigError, validate_config
from resnet_jax.dense.figures import PREDICTIONS_FILENAME
from resnet_jax.models import create_model

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG_FILE = os.path.join(REPO, "configs", "segmentation_digits.py")

TINY = {
    "canvas_size": 16,
    "image_size": 16,
    "canvas_digit_sizes": (6, 8),
    "canvas_train_examples": 16,
    "canvas_eval_examples": 5,  # with eval batches of 4: a second batch of 1 canvas and 3 padding rows
    "fpn_channels": 8,
    "head_channels": 8,
    "batch_size": 4,
    "eval_batch_size": 4,
    "warmup_epochs": 0.0,
    "log_every_steps": 2,
    "eval_every_steps": 2,
    "checkpoint_every_steps": 2,
}


def tiny_config(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("segmentation_digits", CONFIG_FILE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config()
    config.update({**TINY, **overrides})
    return config


def subprocess_env(num_devices: int) -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} "
        "--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def run_train(workdir, overrides: dict, num_devices: int = 1) -> subprocess.CompletedProcess:
    flags = [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
    return subprocess.run(
        [sys.executable, "train.py", f"--config={CONFIG_FILE}", f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=subprocess_env(num_devices),
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def save_classifier(path) -> dict:
    """A cifar_resnet20 digits classifier's variables, written as a converted checkpoint is."""
    model = create_model("cifar_resnet20", num_classes=10)
    variables = jax.device_get(train_state.init_variables(model, jax.random.key(7), 16))
    checkpoint.save_variables(str(path), variables, {"model": "cifar_resnet20", "num_classes": 10})
    return variables


def test_train_py_fine_tunes_a_frozen_backbone_resumes_and_draws_predictions(tmp_path):
    pretrained = save_classifier(tmp_path / "classifier")
    workdir = tmp_path / "seg"
    options = {"init_from": tmp_path / "classifier", "finetune_mode": "linear_probe"}
    result = run_train(workdir, {**options, "num_train_steps": 4})
    assert result.returncode == 0, result.stderr[-5000:]
    assert "backbone restored, new FPN neck and segmentation head" in result.stderr

    # Resumed from its step-4 checkpoint, not from the classifier again.
    result = run_train(workdir, {**options, "num_train_steps": 6})
    assert result.returncode == 0, result.stderr[-5000:]
    assert "resuming from step 4" in result.stderr
    assert "backbone restored" not in result.stderr

    records = read_metrics(workdir)
    evals = [r for r in records if "eval_mean_iou" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for record in evals:
        assert 0.0 <= record["eval_mean_iou"] <= record["eval_pixel_accuracy"] <= 1.0
        # Exact over the 5 validation canvases: a whole number of their 5 * 16 * 16 pixels.
        pixels = record["eval_pixel_accuracy"] * 5 * 256
        assert abs(pixels - round(pixels)) < 1e-6
    assert [r["step"] for r in records if "test_mean_iou" in r] == [4, 6]
    assert [r["step"] for r in records if "train_pixel_accuracy" in r] == [2, 4, 6]

    # A linear probe leaves the classifier's backbone bit-identical; the neck and head trained.
    variables, metadata = checkpoint.load_variables(str(workdir))
    assert metadata["step"] == 6
    for collection in ("params", "batch_stats"):
        expected = {k: v for k, v in pretrained[collection].items() if k != "fc"}
        jax.tree.map(np.testing.assert_array_equal, variables[collection]["backbone"], expected)
    assert set(variables["params"]) == {"backbone", "fpn", "head"}

    # Checkpoints ranked by the config's best_metric.
    manager = TrainingCheckpointer(
        str(workdir), save_every_steps=1, best_metric="eval_mean_iou", handle_sigterm=False
    )
    try:
        best = manager.best_step()
    finally:
        manager.close()
    assert best == max(evals, key=lambda r: r["eval_mean_iou"])["step"]

    # predictions.png: a row of (input, truth, prediction) for each of the 5 validation canvases.
    picture = np.asarray(Image.open(workdir / PREDICTIONS_FILENAME))
    scale, gap = 3, 4
    assert picture.shape == (5 * 16 * scale + 6 * gap, 3 * 16 * scale + 4 * gap, 3)
    assert os.path.getsize(workdir / "curves.png") > 0


ONE_DEVICE_EVAL = r"""
import json, sys
import jax, numpy as np
from resnet_jax import checkpoint, data, train_state
from resnet_jax.dense import canvases, task
from resnet_jax.dense.metrics import summarize_dense_eval
from resnet_jax.metrics import evaluate
from resnet_jax.parallel import DataParallel
sys.path.insert(0, sys.argv[3])
from test_segmentation_training import tiny_config

config = tiny_config(**json.loads(sys.argv[2]))
variables, metadata = checkpoint.load_variables(sys.argv[1])
model = task.create_model_from_config(config, canvases.NUM_CLASSES)
data_parallel = DataParallel("shard_map", devices=jax.devices()[:1])
_, eval_fns = task.compile_steps(
    config, data_parallel, model, tx=None, learning_rate_fn=None, trainable_mask=None
)
state = data_parallel.replicate(train_state.TrainState(
    step=np.int32(metadata["step"]), params=variables["params"],
    batch_stats=variables["batch_stats"], opt_state=()))
batches = data.create_eval_batches(
    config, process_index=0, process_count=1, local_batch_size=config.eval_batch_size)
print(json.dumps(evaluate(eval_fns, state, data_parallel, batches, summarize=summarize_dense_eval)))
"""


def test_two_devices_give_the_exact_mean_iou_of_one_device_on_the_same_weights(tmp_path):
    workdir = tmp_path / "seg2"
    result = run_train(workdir, {"num_train_steps": 2}, num_devices=2)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "on 2 devices" in result.stderr
    (logged,) = [r for r in read_metrics(workdir) if "eval_mean_iou" in r]

    # The same step-2 weights on one device, 2 canvases per batch as each of the 2 devices had, under
    # the same XLA flags (a subprocess like the run's).
    overrides = json.dumps({"num_train_steps": 2, "eval_batch_size": 2})
    result = subprocess.run(
        [sys.executable, "-c", ONE_DEVICE_EVAL, str(workdir), overrides, os.path.dirname(__file__)],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["eval_mean_iou"] == logged["eval_mean_iou"]
    assert results["eval_pixel_accuracy"] == logged["eval_pixel_accuracy"]
    np.testing.assert_allclose(results["eval_loss"], logged["eval_loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "classification"}, "config.task='classification' cannot train on"),
        ({"dataset": "digits"}, "config.task='segmentation' cannot train on"),
        ({"image_size": 32}, "config.image_size=32 differs from config.canvas_size=16"),
        ({"augment": "cifar"}, "config.augment='cifar' is a classification option"),
        ({"label_smoothing": 0.1}, "config.label_smoothing=0.1 is a classification option"),
        ({"mixup_alpha": 0.2}, "config.mixup_alpha=0.2 is a classification option"),
        ({"best_metric": "eval_accuracy"}, "config.best_metric='eval_accuracy' is not an eval"),
        ({"best_metric": "eval_ema_mean_iou"}, "choose one of ['eval_mean_iou'"),
    ],
)
def test_segmentation_keys_that_disagree_are_one_line_naming_them(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config(**overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_recipe_validates_and_its_ema_metric_is_allowed_with_ema():
    validate_config(tiny_config())
    validate_config(tiny_config(ema_decay=0.99, best_metric="eval_ema_mean_iou"))
