"""Dense prediction: FPN shapes on every backbone, mIoU by hand, the digit canvases, the dense steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from background import finish, stop
from flax import linen as nn

from resnet_jax import finetune, list_models, optim, train_state
from resnet_jax.config import base_config
from resnet_jax.data.sources import DigitsSource
from resnet_jax.dense import canvases, metrics, pretrained
from resnet_jax.dense import steps as dense_steps
from resnet_jax.dense.fpn import FPN, SegmentationModel, stage_names
from resnet_jax.metrics import accumulate
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel

# -- the model ------------------------------------------------------------------------------------


def _shallow_backbone(name: str, **options):
    """`name` with one block per stage: every variant's stem, block, widths and groups; depth changes no shape."""
    depth = len(create_model(name, num_classes=0, conv=nn.Conv).stage_sizes)
    return create_model(name, num_classes=0, stage_sizes=(1,) * depth, conv=nn.Conv, **options)


def _stage_strides(backbone) -> list[int]:
    # The CIFAR stem keeps the input resolution (stages at strides 1, 2, 4); the others reduce by 4 first.
    first = 1 if backbone.stem == "cifar" else 4
    return [first * 2**stage for stage in range(len(backbone.stage_sizes))]


@pytest.mark.parametrize("name", list_models())
def test_fpn_levels_and_logits_have_the_right_shapes_for_every_backbone(name):
    backbone = _shallow_backbone(name)
    model = SegmentationModel(
        backbone=backbone, num_classes=11, fpn_channels=16, head_channels=16, conv=nn.Conv
    )
    images = jnp.zeros((2, 64, 64, 3))
    logits, variables = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0),
            images,
            capture_intermediates=lambda module, method: (
                isinstance(module, FPN) and method == "__call__"
            ),
        )
    )
    (pyramid,) = variables["intermediates"]["fpn"]["__call__"]
    strides = _stage_strides(backbone)
    assert list(pyramid) == [f"stage{s + 1}" for s in range(len(strides))]
    for (level, shape), stride in zip(pyramid.items(), strides, strict=True):
        assert shape.shape == (2, -(-64 // stride), -(-64 // stride), 16), level
    assert logits.shape == (2, 64, 64, 11) and logits.dtype == jnp.float32
    assert set(variables["params"]) == {"backbone", "fpn", "head"}


def test_fpn_rejects_a_single_level_and_a_backbone_with_a_classifier():
    with pytest.raises(ValueError, match="at least two stage outputs"):
        stage_names({"stem": None, "stage1": None, "pooled": None})
    model = SegmentationModel(backbone=create_model("resnet18", num_classes=10), num_classes=3)
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_fpn_top_down_path_adds_the_coarser_level_upsampled_by_nearest():
    # Identity-like 1x1 laterals and 3x3 outputs that pass the centre tap: P_fine = C_fine + up(C_coarse).
    features = {"stage1": jnp.arange(16.0).reshape(1, 4, 4, 1), "stage2": jnp.ones((1, 2, 2, 1))}
    features["stage2"] = (
        features["stage2"] * jnp.asarray([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
    )
    fpn = FPN(channels=1, conv=nn.Conv)
    variables = fpn.init(jax.random.key(0), features)
    params = jax.tree.map(jnp.zeros_like, variables["params"])
    for name in params:
        kernel = params[name]["kernel"]
        center = (kernel.shape[0] // 2, kernel.shape[1] // 2, 0, 0)
        params[name]["kernel"] = kernel.at[center].set(1.0)
    pyramid = fpn.apply({"params": params}, features)
    upsampled = np.kron(np.asarray([[1.0, 2.0], [3.0, 4.0]]), np.ones((2, 2)))
    np.testing.assert_allclose(
        pyramid["stage1"][0, :, :, 0], np.arange(16.0).reshape(4, 4) + upsampled
    )
    np.testing.assert_allclose(pyramid["stage2"][0, :, :, 0], [[1.0, 2.0], [3.0, 4.0]])


# -- backbone from a classifier -------------------------------------------------------------------


def _tiny_backbone(num_classes=0, **options):
    return create_model(
        "cifar_resnet20",
        num_classes=num_classes,
        stage_sizes=(1, 1),
        stage_widths=(8, 16),
        conv=nn.Conv,
        **options,
    )


def _tiny_segmentation_model(**backbone_options):
    return SegmentationModel(
        backbone=_tiny_backbone(**backbone_options),
        num_classes=canvases.NUM_CLASSES,
        fpn_channels=8,
        head_channels=8,
        conv=nn.Conv,
    )


def test_classifier_checkpoint_maps_onto_the_backbone_and_back():
    # lazy_init: init's variables bit for bit, without running either forward pass op by op.
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    classifier = _tiny_backbone(num_classes=10)
    classifier_variables = classifier.lazy_init(jax.random.key(1), images)
    model = _tiny_segmentation_model()
    fresh = model.lazy_init(jax.random.key(2), images)

    merged = pretrained.merge_pretrained_backbone(fresh, classifier_variables)
    headless = {
        "params": {k: v for k, v in classifier_variables["params"].items() if k != "fc"},
        "batch_stats": classifier_variables["batch_stats"],
    }
    jax.tree.map(
        np.testing.assert_array_equal,
        pretrained.classifier_variables_from_segmentation(merged),
        headless,
    )
    for part in pretrained.HEAD_NAMES:  # the neck and head stay freshly initialized
        jax.tree.map(np.testing.assert_array_equal, merged["params"][part], fresh["params"][part])
    labels = pretrained.param_groups(merged["params"])
    assert set(jax.tree.leaves(labels["backbone"])) == {finetune.BACKBONE}
    assert set(jax.tree.leaves({k: labels[k] for k in pretrained.HEAD_NAMES})) == {finetune.HEAD}

    other = create_model("resnet18", num_classes=10, conv=nn.Conv)
    other_variables = jax.eval_shape(
        lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    with pytest.raises(finetune.CheckpointMismatchError, match="unexpected.*mis-shaped"):
        pretrained.merge_pretrained_backbone(fresh, other_variables)


# -- mean IoU -------------------------------------------------------------------------------------


def test_mean_iou_of_a_hand_worked_confusion_matrix():
    # Rows: truth, columns: prediction. Class 0: TP 3, FP 0, FN 1 -> 3/4. Class 1: TP 2, FP 1, FN 2 -> 2/5.
    # Class 2 is never true but predicted twice: TP 0, FP 2 -> 0. Class 3 appears nowhere: left out.
    confusion = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(
        metrics.iou_per_class(confusion), [0.75, 0.4, 0.0, np.nan], equal_nan=True
    )
    assert metrics.mean_iou(confusion) == pytest.approx((0.75 + 0.4 + 0.0) / 3, abs=1e-12)
    assert metrics.pixel_accuracy(confusion) == pytest.approx(5 / 8)

    # The same matrix counted from pixels: a padding row and an ignored pixel (label 255) count nowhere.
    labels = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 255], [3, 3, 3, 3, 3, 3, 3, 3, 3]])
    preds = jnp.asarray([[0, 0, 0, 1, 1, 1, 2, 2, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    weights = (labels != 255) * jnp.asarray([1, 0])[:, None]
    counted = metrics.confusion_matrix(labels, preds, 4, weights)
    np.testing.assert_array_equal(counted, confusion)


def test_accumulated_sums_are_int64_and_exact_floats():
    totals = accumulate(
        [{"confusion": np.full((2, 2), 2**30, np.int32), "loss_sum": np.float32(0.1)}] * 4
    )
    assert totals["confusion"].dtype == np.int64 and totals["confusion"][0, 0] == 2**32
    assert totals["loss_sum"] == 4 * float(np.float32(0.1))  # exact: no float32 rounding


# -- the digit canvases ---------------------------------------------------------------------------


def test_canvas_splits_never_share_a_digit_image():
    (train_split, train), (val_split, val), (test_split, test) = (
        canvases.split_digits(split)[2] for split in canvases.SPLITS
    )
    assert (train_split, val_split, test_split) == ("train", "train", "test")
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(DigitsSource("train"))
    # The canvases themselves only draw from their split's digits.
    used = {
        split: {
            i for n in range(50) for i in canvases.DigitCanvases(split, 50, seed=3).source_digits(n)
        }
        for split in canvases.SPLITS
    }
    assert used["train"] <= set(train) and used["validation"] <= set(val)
    assert used["test"] <= set(test)
    assert not used["train"] & used["validation"]
    # And by content: no 8x8 scan of the test digits is among the train digits' scans.
    train_scans = {DigitsSource("train")[int(i)]["image"].tobytes() for i in train}
    assert not any(DigitsSource("test")[int(i)]["image"].tobytes() in train_scans for i in test)


def test_canvas_labels_mark_exactly_the_inked_pixels_and_are_deterministic():
    source = canvases.DigitCanvases("validation", 20, seed=7)
    digit_images, digit_labels, _ = canvases.split_digits("validation")
    for index in range(20):
        record = source[index]
        image, label = record["image"], record["label"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label.shape == (64, 64)
        grey = image[..., 0].astype(int)
        threshold = round(canvases.INK_THRESHOLD * 255)
        assert np.all(grey[label > 0] >= threshold) and np.all(grey[label == 0] <= threshold)
        layout = source.layout(index)
        assert 2 <= len(layout) <= 4
        for digit, y, x, size in layout:
            assert 12 <= size <= 24
            window = label[y : y + size, x : x + size]
            assert set(np.unique(window)) <= {0, digit_labels[digit] + 1}
        expected = {0} | {digit_labels[d] + 1 for d, *_ in layout}
        assert set(np.unique(label)) <= expected
    again = canvases.DigitCanvases("validation", 20, seed=7)[5]
    np.testing.assert_array_equal(again["image"], source[5]["image"])
    other = canvases.DigitCanvases("validation", 20, seed=8)[5]
    assert not np.array_equal(other["image"], source[5]["image"])


# -- the dense steps ------------------------------------------------------------------------------


def _canvas_batch(split: str, count: int, size: int = 32):
    source = canvases.DigitCanvases(split, count, canvas_size=size, digit_sizes=(8, 14), seed=0)
    records = [source[i] for i in range(count)]
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    return {"image": (images - 0.1) / 0.3, "label": np.stack([r["label"] for r in records])}


def _compiled_steps(model, params_shape_source, trainable_mask=None, multipliers=None):
    config = base_config()
    config.update({"optimizer": "adamw", "learning_rate": 3e-3, "weight_decay": 0.0})
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=100)
    labels = pretrained.param_groups(params_shape_source) if multipliers else None
    tx = optim.create_optimizer(config, schedule, param_labels=labels, lr_multipliers=multipliers)
    data_parallel = DataParallel("shard_map", devices=jax.devices()[:1])
    train_fn = data_parallel.compile(
        functools.partial(
            dense_steps.train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=schedule,
            trainable_mask=trainable_mask,
            axis_name=DATA_AXIS,
        ),
        donate_state=False,
    )
    eval_fn = data_parallel.compile(
        functools.partial(
            dense_steps.eval_step,
            apply_fn=model.apply,
            num_classes=canvases.NUM_CLASSES,
            axis_name=DATA_AXIS,
        ),
        donate_state=False,
    )
    return data_parallel, tx, train_fn, eval_fn


def test_dense_train_step_lowers_the_loss_and_eval_counts_every_real_pixel_once():
    model = _tiny_segmentation_model()
    variables = train_state.init_variables(model, jax.random.key(0), 32)
    data_parallel, tx, train_fn, eval_fn = _compiled_steps(model, variables["params"])
    state = data_parallel.replicate(train_state.create_train_state(variables, tx, use_ema=False))
    batch = data_parallel.shard_batch(_canvas_batch("train", 4))
    losses = []
    for _ in range(15):
        state, step_metrics = train_fn(state, batch)
        losses.append(float(step_metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses

    eval_batch = _canvas_batch("validation", 4)
    eval_batch["mask"] = np.asarray([1, 1, 1, 0], np.float32)  # the last row is padding
    sums = data_parallel.unreplicate(eval_fn(state, data_parallel.shard_batch(eval_batch)))
    assert sums["confusion"].sum() == 3 * 32 * 32 == sums["pixel_count"]
    np.testing.assert_array_equal(
        sums["confusion"].sum(1),
        np.bincount(eval_batch["label"][:3].ravel(), minlength=canvases.NUM_CLASSES),
    )
    summary = metrics.summarize_dense_eval(accumulate([sums]))
    assert 0.0 <= summary["mean_iou"] <= summary["pixel_accuracy"] <= 1.0


def test_frozen_backbone_with_frozen_bn_stays_bit_identical():
    model = _tiny_segmentation_model(bn_frozen=True)
    variables = train_state.init_variables(model, jax.random.key(0), 32)
    multipliers = finetune.lr_multipliers("linear_probe")
    mask = finetune.trainable_mask(pretrained.param_groups(variables["params"]), multipliers)
    data_parallel, tx, train_fn, _ = _compiled_steps(
        model, variables["params"], trainable_mask=mask, multipliers=multipliers
    )
    state = data_parallel.replicate(train_state.create_train_state(variables, tx, use_ema=False))
    state, _ = train_fn(state, data_parallel.shard_batch(_canvas_batch("train", 2)))
    after = data_parallel.unreplicate(state)
    jax.tree.map(
        np.testing.assert_array_equal, after.params["backbone"], variables["params"]["backbone"]
    )
    jax.tree.map(np.testing.assert_array_equal, after.batch_stats, variables["batch_stats"])
    assert not np.array_equal(
        after.params["head"]["classifier"]["kernel"],
        variables["params"]["head"]["classifier"]["kernel"],
    )


def test_pixel_cross_entropy_ignores_weighted_out_pixels():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 3)), jnp.float32)
    labels = jnp.asarray([[[0, 2], [255, 1]]])
    weights = dense_steps.pixel_weights(labels, ignore_index=255)
    losses = dense_steps.pixel_cross_entropy(logits, labels, weights)
    expected = -jax.nn.log_softmax(logits)[0, 0, 0, 0]
    assert float(losses[0, 0, 0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(losses[0, 1, 0]) == 0.0
    np.testing.assert_allclose(optax.tree.norm(losses), optax.tree.norm(losses * weights))


def test_predictions_png_has_a_row_per_canvas_and_the_palette_colours(tmp_path):
    from PIL import Image

    from resnet_jax.dense import figures

    source = canvases.DigitCanvases("test", 3, seed=0, canvas_size=32, digit_sizes=(8, 14))
    records = [source[i] for i in range(3)]
    images = np.stack([r["image"] for r in records])
    labels = np.stack([r["label"] for r in records]).astype(np.int32)
    path = tmp_path / figures.PREDICTIONS_FILENAME
    figures.write_predictions(
        str(path), images, labels, np.zeros_like(labels), canvases.NUM_CLASSES
    )
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 96 + 4 * 4, 3 * 96 + 4 * 4, 3)
    truth = grid[
        4 : 4 + 96 : 3, 4 + 96 + 4 : 4 + 2 * 96 + 4 : 3
    ]  # first row, truth panel, unscaled
    palette = figures.class_palette(canvases.NUM_CLASSES)
    np.testing.assert_array_equal(truth, palette[labels[0]])


MULTI_DEVICE_SCRIPT = r"""
import functools, pickle, sys
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from resnet_jax import optim, train_state
from resnet_jax.config import base_config
from resnet_jax.dense import canvases, SegmentationModel
from resnet_jax.dense import steps as dense_steps
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel

backbone = create_model("cifar_resnet20", num_classes=0, stage_sizes=(1, 1), stage_widths=(8, 16),
                        conv=nn.Conv, bn_axis_name=DATA_AXIS)
model = SegmentationModel(backbone=backbone, num_classes=canvases.NUM_CLASSES, fpn_channels=8,
                          head_channels=8, conv=nn.Conv)
config = base_config()
config.update({"optimizer": "sgd", "learning_rate": 0.05, "weight_decay": 0.0})
schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=100)
tx = optim.create_optimizer(config, schedule)
variables = train_state.init_variables(model, jax.random.key(0), 16)
source = canvases.DigitCanvases("train", 4, canvas_size=16, digit_sizes=(6, 8), seed=1)
records = [source[i] for i in range(4)]
labels = np.stack([r["label"] for r in records]).astype(np.int32)
labels[0, :6] = 255  # ignored pixels on the first device only: the loss must still be the global mean
batch = {"image": np.stack([r["image"] for r in records]).astype(np.float32) / 255.0, "label": labels}
eval_batch = dict(batch, mask=np.asarray([1, 1, 1, 0], np.float32))

def run(parallelism, devices):
    data_parallel = DataParallel(parallelism, devices=devices)
    train_fn = data_parallel.compile(functools.partial(
        dense_steps.train_step, apply_fn=model.apply, tx=tx, learning_rate_fn=schedule,
        ignore_index=255, axis_name=DATA_AXIS), donate_state=False)
    eval_fn = data_parallel.compile(functools.partial(
        dense_steps.eval_step, apply_fn=model.apply, num_classes=canvases.NUM_CLASSES,
        ignore_index=255, axis_name=DATA_AXIS), donate_state=False)
    state = data_parallel.replicate(train_state.create_train_state(variables, tx, use_ema=False))
    state, metrics = train_fn(state, data_parallel.shard_batch(batch))
    sums = eval_fn(state, data_parallel.shard_batch(eval_batch))
    return data_parallel.unreplicate({"params": state.params, "metrics": metrics, "sums": sums})

results = {"one": run("shard_map", jax.devices()[:1]), "shard_map": run("shard_map", jax.devices()[:2]),
           "pmap": run("pmap", jax.devices()[:2])}
with open(sys.argv[1], "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, results), f)
"""


@pytest.fixture(scope="module", autouse=True)
def two_device_run(tmp_path_factory):
    """MULTI_DEVICE_SCRIPT in a subprocess (2 simulated devices), started before the module's first test:
    it runs on the second core while the in-process tests run on the first (its test comes last). Yields a
    function that waits for it and returns its results."""
    import os
    import pickle
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out = tmp_path_factory.mktemp("two_devices") / "results.pkl"
    process = subprocess.Popen(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def results() -> dict:
        finish(process, timeout=600)
        return pickle.loads(out.read_bytes())

    yield results
    stop(process)


def _segmentation_config():
    """The recipe, shrunk to tiny sizes."""
    import importlib.util
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "segmentation_digits", os.path.join(repo, "configs", "segmentation_digits.py")
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config()
    config.update(
        {
            "canvas_size": 16,
            "image_size": 16,
            "canvas_digit_sizes": (6, 8),
            "canvas_train_examples": 8,
            "canvas_eval_examples": 3,
            "fpn_channels": 8,
            "head_channels": 8,
        }
    )
    return config


def test_task_pieces_train_evaluate_and_draw_from_the_pipelines_batches(tmp_path):
    from resnet_jax import data
    from resnet_jax.config import validate_config
    from resnet_jax.dense import task

    config = _segmentation_config()
    validate_config(config)
    model = task.create_model_from_config(config, canvases.NUM_CLASSES, conv=nn.Conv)
    variables = train_state.init_variables(model, jax.random.key(0), config.canvas_size)
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=10)
    tx = optim.create_optimizer(config, schedule)
    data_parallel = DataParallel(config.parallelism, devices=jax.devices()[:1])
    train_fn, eval_fns = task.compile_steps(
        config, data_parallel, model, tx=tx, learning_rate_fn=schedule, trainable_mask=None
    )
    state = data_parallel.replicate(train_state.create_train_state(variables, tx, use_ema=False))
    batches = data.create_train_iterator(
        config, process_index=0, process_count=1, global_batch_size=4, seed=0
    )
    batch = next(batches)
    assert batch["label"].shape == (4, 16, 16) and batch["label"].dtype == np.int32
    state, step_metrics = train_fn(state, data_parallel.shard_batch(batch))
    assert np.isfinite(float(step_metrics["loss"]))

    # 3 validation canvases in batches of 2: the second batch has a padding row (mask 0).
    eval_batches = list(
        data.create_eval_batches(config, process_index=0, process_count=1, local_batch_size=2)
    )
    assert [b["mask"].tolist() for b in eval_batches] == [[1, 1], [1, 0]]
    sums = [
        data_parallel.unreplicate(eval_fns["eval"](state, data_parallel.shard_batch(b)))
        for b in eval_batches
    ]
    summary = metrics.summarize_dense_eval(accumulate(sums))
    assert set(summary) == {"loss", "pixel_accuracy", "mean_iou"}
    assert sum(int(s["confusion"].sum()) for s in sums) == 3 * 16 * 16

    host = data_parallel.unreplicate(state)
    path = task.write_predictions_png(config, str(tmp_path), model, host.variables, count=2)
    assert path.endswith("predictions.png") and (tmp_path / "predictions.png").stat().st_size > 0


def test_run_summary_describes_the_segmenter_by_part_with_no_classifier_row():
    from resnet_jax import summary
    from resnet_jax.dense import model_summary

    config = _segmentation_config()  # cifar_resnet20 on 16 px canvases, FPN and head 8 wide
    lines = []
    model_summary.log_run_model_summary(config, 16, canvases.NUM_CLASSES, log=lines.append)
    parts = [line.split()[0] for line in lines[6:]]  # after the totals, a blank line and the header
    assert parts == ["stem", "stage1", "stage2", "stage3", "fpn", "head"]  # no fc
    sizes = model_summary.summarize_segmenter(config, canvases.NUM_CLASSES)
    classifier = summary.summarize("cifar_resnet20", 16, 10)
    for part in ("stem", "stage1", "stage2", "stage3"):  # the backbone is the classifier without fc
        assert sizes[part]["params"] == classifier.params_by_part[part]
        assert sizes[part]["macs"] == classifier.macs_by_part[part]
    # FPN at 16/8/4 px over 16/32/64 channels: 1x1 laterals to 8, then a 3x3 8 -> 8 conv per level.
    laterals = 16 * 16 * 16 * 8 + 8 * 8 * 32 * 8 + 4 * 4 * 64 * 8
    outputs = (16 * 16 + 8 * 8 + 4 * 4) * 9 * 8 * 8
    assert sizes["fpn"]["macs"] == laterals + outputs
    assert sizes["fpn"]["params"] == (16 + 32 + 64) * 8 + 8 * 3 + 3 * (9 * 8 * 8 + 8)
    assert sizes["head"]["shape"] == (16, 16, canvases.NUM_CLASSES)
    assert sizes["total"]["params"] == sum(v["params"] for k, v in sizes.items() if k != "total")
    assert f"{sizes['total']['params']:,} parameters" in lines[0]


# Last in the file: the subprocess it reads has had the other tests' time to finish.
def test_two_devices_give_one_devices_loss_update_and_confusion_matrix(two_device_run):
    results = two_device_run()
    one = results["one"]
    for name in ("shard_map", "pmap"):
        many = results[name]
        np.testing.assert_allclose(many["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
            many["params"],
            one["params"],
        )
        np.testing.assert_array_equal(many["sums"]["confusion"], one["sums"]["confusion"])
        assert many["sums"]["pixel_count"] == one["sums"]["pixel_count"] == 3 * 16 * 16 - 6 * 16
