"""The segmentation task through the trainer: fine-tuning from a classifier, resume, predictions.png, best
checkpoint by mIoU, and an exact mIoU on 2 devices equal to one device's on the same weights.

Compiling dominates, so everything is tiny (16 px canvases, a 3-block backbone, 8-channel FPN and head, a
constant learning rate so the resumed run's steps compile to the programs the first run cached, 4 steps) and
the trainer runs in one subprocess (its own 2 simulated devices); the config checks run in this process.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import checkpoint, models, train_state
from resnet_jax.checkpoint.checkpointer import IncompatibleCheckpointError, TrainingCheckpointer
from resnet_jax.checkpoint.config_changes import check_config_change, config_changes
from resnet_jax.config import ConfigError, base_config, validate_config
from resnet_jax.dense.figures import PREDICTIONS_FILENAME

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG_FILE = os.path.join(REPO, "configs", "segmentation_digits.py")
# The suite's persistent compilation cache (conftest.py).
CACHE_DIR = os.path.join(REPO, ".jax_cache")

# The paper's 6n+2-layer CIFAR net with n = 1 (3 basic blocks, C2..C4 as cifar_resnet20's): compiles in
# about a third of cifar_resnet20's time. Not a library name: the subprocess adds it to the model table.
TINY_BACKBONE = "cifar_resnet8"
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
    "lr_schedule": "constant",  # num_train_steps 2 -> 4 on resume leaves the compiled train step unchanged
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
        # XLA's own conv compiles in about half the time of the CPU matmul forms (measured here); the forms'
        # equivalence is tested in test_conv*.py, this file tests the segmentation task around them.
        RESNET_JAX_CONV_FORM="lax",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def save_classifier(path) -> dict:
    """A TINY_BACKBONE digits classifier's variables, written as a converted checkpoint is."""
    model = models.cifar_resnet(8)(num_classes=10)
    # Jitted: op by op, init costs more than a compile.
    init = jax.jit(train_state.init_variables, static_argnums=(0, 2))
    variables = jax.device_get(init(model, jax.random.key(7), 16))
    checkpoint.save_variables(str(path), variables, {"model": TINY_BACKBONE, "num_classes": 10})
    return variables


# One process on 2 simulated devices: the trainer fine-tunes a linear probe from the classifier to step 2,
# is run again to step 4 (a resume), and then the step-4 weights are evaluated on one device with the same
# per-device eval batch of 2 canvases, under the same XLA flags. Both trainer calls go through
# `training.train_and_evaluate` with the recipe's config (what train.py calls after parsing flags); the
# second one's compiles come from the persistent compilation cache the first one filled.
TRAIN_RESUME_AND_EVALUATE = r"""
import json, logging, sys
import jax
sys.path.insert(0, sys.argv[3])
from test_segmentation_training import TINY_BACKBONE, tiny_config
from resnet_jax import checkpoint, data, models, train_state, training
from resnet_jax.dense import canvases, task
from resnet_jax.dense.metrics import summarize_dense_eval
from resnet_jax.metrics import evaluate
from resnet_jax.parallel import DataParallel

models.MODELS[TINY_BACKBONE] = models.cifar_resnet(8)
logging.getLogger("resnet_jax").setLevel(logging.INFO)  # the trainer's lines, as train.py shows them
workdir, options = sys.argv[1], json.loads(sys.argv[2])
jax.config.update("jax_compilation_cache_dir", options["compilation_cache_dir"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
training.train_and_evaluate(tiny_config(**options, num_train_steps=2), workdir)
logged = training.train_and_evaluate(tiny_config(**options, num_train_steps=4), workdir)

config = tiny_config(**options, num_train_steps=4, eval_batch_size=2)
variables, metadata = checkpoint.load_variables(workdir)
model = task.create_model_from_config(config, canvases.NUM_CLASSES)
data_parallel = DataParallel("shard_map", devices=jax.devices()[:1])
_, eval_fns = task.compile_steps(
    config, data_parallel, model, tx=None, learning_rate_fn=None, trainable_mask=None
)
state = data_parallel.replicate(train_state.TrainState(
    step=jax.numpy.int32(metadata["step"]), params=variables["params"],
    batch_stats=variables["batch_stats"], opt_state=()))
batches = data.create_eval_batches(
    config, process_index=0, process_count=1, local_batch_size=config.eval_batch_size)
one_device = evaluate(eval_fns, state, data_parallel, batches, summarize=summarize_dense_eval)
print(json.dumps({"logged": logged, "one_device": one_device}))
"""


def test_fine_tunes_a_frozen_backbone_on_2_devices_resumes_draws_and_matches_1_device_miou(
    tmp_path,
):
    pretrained = save_classifier(tmp_path / "classifier")
    workdir = tmp_path / "seg"
    options = {
        "model": TINY_BACKBONE,
        "init_from": str(tmp_path / "classifier"),
        "finetune_mode": "linear_probe",
        "compilation_cache_dir": CACHE_DIR,
    }
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_RESUME_AND_EVALUATE, str(workdir), json.dumps(options)]
        + [os.path.dirname(os.path.abspath(__file__))],
        cwd=REPO,
        env=subprocess_env(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "on 2 devices" in result.stderr
    # The first call starts from the classifier's backbone; the second resumes from its step-2 checkpoint.
    assert result.stderr.count("backbone restored, new FPN neck and segmentation head") == 1
    assert "resuming from step 2" in result.stderr
    assert result.stderr.index("backbone restored") < result.stderr.index("resuming from step 2")

    records = read_metrics(workdir)
    evals = [r for r in records if "eval_mean_iou" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert 0.0 <= record["eval_mean_iou"] <= record["eval_pixel_accuracy"] <= 1.0
        # Exact over the 5 validation canvases: a whole number of their 5 * 16 * 16 pixels.
        pixels = record["eval_pixel_accuracy"] * 5 * 256
        assert abs(pixels - round(pixels)) < 1e-6
    assert [r["step"] for r in records if "test_mean_iou" in r] == [2, 4]
    assert [r["step"] for r in records if "train_pixel_accuracy" in r] == [2, 4]

    # The step-4 weights on 1 device give the mIoU the 2-device run logged, exactly (confusion counts).
    results = json.loads(result.stdout.strip().splitlines()[-1])
    logged, one_device = results["logged"], results["one_device"]
    assert logged["eval_mean_iou"] == evals[-1]["eval_mean_iou"]
    assert one_device["eval_mean_iou"] == logged["eval_mean_iou"]
    assert one_device["eval_pixel_accuracy"] == logged["eval_pixel_accuracy"]
    np.testing.assert_allclose(one_device["eval_loss"], logged["eval_loss"], rtol=1e-5)

    # A linear probe leaves the classifier's backbone bit-identical; the neck and head trained.
    variables, metadata = checkpoint.load_variables(str(workdir))
    assert metadata["step"] == 4
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


NEVER_SAVED = object()  # the checkpoint predates the key


@pytest.mark.parametrize(
    "key, old, new",
    [
        ("task", "classification", "segmentation"),
        ("task", NEVER_SAVED, "segmentation"),  # from before the key: a classifier's checkpoint
        ("canvas_size", 32, 48),
        ("canvas_digit_sizes", (12, 20), (14, 18)),
        ("canvas_train_examples", 2048, 256),
    ],
)
def test_resuming_after_a_change_of_task_or_canvases_is_refused_in_one_line(key, old, new):
    saved = tiny_config().to_dict()
    if old is NEVER_SAVED:
        del saved[key]
    else:
        saved[key] = old
    with pytest.raises(IncompatibleCheckpointError) as error:
        check_config_change(saved, {**saved, key: new}, "from step 4")
    message = str(error.value)
    assert f"config.{key} changed " in message and "\n" not in message
    assert changes_refused({**saved, "canvas_eval_examples": 7}, saved) == []  # eval only: allowed


def changes_refused(saved: dict, new: dict) -> list[str]:
    return check_config_change(saved, new, "from step 4").refused()


def test_a_checkpoint_from_before_the_task_and_canvas_keys_resumes_a_classification_run():
    new = base_config().to_dict()
    saved = {k: v for k, v in new.items() if not k.startswith("canvas_") and k != "task"}
    assert "canvas_size" in config_changes(saved, new).changed
    assert changes_refused(saved, new) == []
