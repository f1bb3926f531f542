"""The recipe augmentations, the eval resolution and progressive resizing, through the real input pipeline.

Each is checked by what it computes: TrivialAugment/RandAugment rows are the plain rows with one drawn op
applied, random erasing is one box of zeros (the mean colour) in an otherwise unchanged row, eval at its own
size is torchvision's resize + center crop recomputed with PIL, and progressive resizing gives each step its
scheduled size, continues after a resume and compiles the step once per size.
"""

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.config import base_config
from resnet_jax.data import augment, progressive, resize, sources, transforms
from resnet_jax.parallel import DATA_AXIS, DataParallel
from resnet_jax.predict import training_eval_preprocessor

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def digits_config(**overrides):
    config = base_config()
    config.dataset = "digits"
    for key, value in overrides.items():
        config[key] = value
    return config


def train_batches(config, steps, batch_size=16, seed=3, start_step=0):
    iterator = data.create_train_iterator(
        config,
        process_index=0,
        process_count=1,
        global_batch_size=batch_size,
        seed=seed,
        start_step=start_step,
    )
    return list(itertools.islice(iterator, steps))


def first_eval_batch(config, batch_size=16):
    return next(
        iter(
            data.create_eval_batches(
                config, process_index=0, process_count=1, local_batch_size=batch_size
            )
        )
    )


def digits_stats():
    return sources.DigitsSource("train").stats()


def to_uint8(row, mean, std):
    """The uint8 image a normalized row came from (normalization is exact to well under half a level)."""
    pixels = np.round((row * np.float32(std) + np.float32(mean)) * 255.0)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(transforms.normalize(image, mean, std), row)
    return image


# --- the default pipeline is untouched ---------------------------------------------------------------

# sha256[:16] of 3 train batches (global 16, seed 3) + the first eval batch of digits. First computed with
# the pipeline of commit b7907fc, before the recipe keys were wired in; recomputed when issue 13 replaced
# Grain's per-record index_shuffle by a per-epoch permutation (`stream.EpochOrder`): a new example order,
# with each stream position's augmentation draws unchanged (tests/test_data_stream.py). Same numpy / Pillow.
# The ImageNet crop's differs with the resize that ran (data/resize.py; Pillow's is the one of b7907fc).
DEFAULT_DIGESTS = {
    ("none", 16): "5e5d4982320173cb",
    ("imagenet", 24): {"pillow": "3720af1d20c585f5", "fast_image_resize": "76a995f44cb5d07f"},
    ("cifar", 12): "98900c6b5c92485e",
}


@pytest.mark.parametrize("augment_kind, image_size", list(DEFAULT_DIGESTS))
def test_default_batches_are_bitwise_those_before_the_recipe_keys(augment_kind, image_size):
    config = digits_config(augment=augment_kind, image_size=image_size)
    digest = hashlib.sha256()
    for batch in train_batches(config, 3):
        digest.update(np.ascontiguousarray(batch["image"]).tobytes())
        digest.update(batch["label"].tobytes())
    digest.update(first_eval_batch(config)["image"].tobytes())
    expected = DEFAULT_DIGESTS[augment_kind, image_size]
    if isinstance(expected, dict):
        expected = expected[resize.resizer_description().split()[0]]
    assert digest.hexdigest()[:16] == expected


# --- TrivialAugment / RandAugment / random erasing ---------------------------------------------------


def candidate_ops(policy, height, width):
    """Every (op, signed magnitude) the policy can draw."""
    if policy == "trivial_augment":
        table = augment.trivial_augment_wide_ops()
        bins = lambda magnitudes: magnitudes.reshape(-1)  # noqa: E731
    else:
        table = augment.rand_augment_ops(height, width)
        bins = lambda magnitudes: magnitudes.reshape(-1)[-1:] if magnitudes.ndim else magnitudes  # noqa: E731
    for name, (magnitudes, signed) in table.items():
        for value in {float(v) for v in bins(magnitudes).reshape(-1)}:
            yield name, value
            if signed and value:
                yield name, -value


@pytest.mark.parametrize("policy", ["trivial_augment", "rand_augment"])
def test_auto_augment_rows_are_the_plain_rows_with_one_drawn_op_applied(policy):
    # RandAugment with one op at the last bin (30), so that every row is one op away from its plain row.
    options = dict(augment="imagenet", image_size=24)
    plain = train_batches(digits_config(**options), 1)[0]
    augmented = train_batches(
        digits_config(
            **options, auto_augment=policy, rand_augment_num_ops=1, rand_augment_magnitude=30
        ),
        1,
    )[0]
    np.testing.assert_array_equal(augmented["label"], plain["label"])
    mean, std = digits_stats()
    changed = 0
    for plain_row, row in zip(plain["image"], augmented["image"], strict=True):
        image = to_uint8(plain_row, mean, std)
        changed += not np.array_equal(plain_row, row)
        matches = [
            (name, value)
            for name, value in candidate_ops(policy, 24, 24)
            if np.array_equal(
                transforms.normalize(augment.apply_op(image, name, value, "bilinear"), mean, std),
                row,
            )
        ]
        assert matches, "an augmented row is no op of the policy applied to the plain row"
    assert changed >= len(plain["image"]) // 2  # the ops act (Identity and no-op draws leave a row)


def test_random_erasing_sets_one_box_of_the_drawn_area_to_the_mean_and_nothing_else():
    options = dict(augment="imagenet", image_size=24)
    plain = train_batches(digits_config(**options), 2)
    erased = train_batches(digits_config(**options, random_erasing_prob=1.0), 2)
    area = 24 * 24
    boxes = 0
    for plain_batch, erased_batch in zip(plain, erased, strict=True):
        for plain_row, row in zip(plain_batch["image"], erased_batch["image"], strict=True):
            differs = np.any(plain_row != row, axis=-1)
            if not differs.any():
                continue  # torchvision's 10 tries all failed to fit a box: the row is unchanged
            rows, cols = np.flatnonzero(differs.any(axis=1)), np.flatnonzero(differs.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            # Erased to 0 after normalization: the normalization mean, all channels, the whole box.
            assert np.all(row[box] == 0.0)
            outside = np.ones_like(differs)
            outside[box] = False
            np.testing.assert_array_equal(row[outside], plain_row[outside])
            height, width = len(rows), len(cols)
            # Sides are rounded to pixels: the drawn area fraction is in [0.02, 0.33] up to that rounding.
            slack = (height + width + 1) / 2 / area
            assert augment.ERASING_SCALE[0] - slack <= height * width / area
            assert height * width / area <= augment.ERASING_SCALE[1] + slack
            boxes += 1
    assert boxes >= 28  # of 32 rows: a box fits in nearly every try


def test_erasing_the_normalized_image_to_zero_is_erasing_to_the_uint8_mean():
    mean, std = digits_stats()
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    erased_uint8 = augment.random_erasing(
        image, np.random.default_rng(5), p=1.0, value=augment.erasing_value(mean)
    )
    erased_normalized = augment.random_erasing(
        transforms.normalize(image, mean, std), np.random.default_rng(5), p=1.0, value=0.0
    )
    # Equal up to the mean's rounding to a uint8 level: half a level over std.
    tolerance = 0.5 / 255 / min(std) + 1e-6
    np.testing.assert_allclose(
        transforms.normalize(erased_uint8, mean, std), erased_normalized, rtol=0, atol=tolerance
    )


# --- the eval resolution -----------------------------------------------------------------------------


def torchvision_style_eval_crop(path, size, resize_size):
    """Resize(resize_size) + CenterCrop(size) on a decoded PIL image, written out here from the definitions."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if width <= height:
        new_size = (resize_size, int(resize_size * height / width))
    else:
        new_size = (int(resize_size * width / height), resize_size)
    image = image.resize(new_size, Image.BILINEAR)
    top = int(round((new_size[1] - size) / 2.0))
    left = int(round((new_size[0] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.fixture
def png_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for label in ("a", "b"):
            os.makedirs(tmp_path / split / label)
            for i in range(count):
                height, width = rng.integers(30, 60, 2)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    return tmp_path


def test_imagenet_eval_at_eval_image_size_is_torchvision_resize_and_center_crop(png_folder):
    config = base_config()
    config.dataset = f"folder:{png_folder}"
    config.augment, config.normalization, config.image_size = "imagenet", "imagenet", 16
    config.eval_image_size, config.eval_crop_fraction = 20, 20 / 26
    batch = first_eval_batch(config, batch_size=6)
    assert batch["image"].shape == (6, 20, 20, 3)
    assert batch["mask"].tolist() == [1.0] * 6
    paths = sorted(str(p) for p in png_folder.glob("val/*/*.png"))
    mean, std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
    for row, path in zip(batch["image"], paths[:6], strict=True):
        expected = transforms.normalize(torchvision_style_eval_crop(path, 20, 26), mean, std)
        np.testing.assert_array_equal(row, expected)
    # A model trained with this config predicts at the size it was evaluated at.
    predicted = training_eval_preprocessor(config.to_dict())(paths[0])
    np.testing.assert_array_equal(predicted, batch["image"][0])


def test_whole_image_eval_resizes_to_eval_image_size_and_train_keeps_image_size():
    config = digits_config(augment="none", image_size=16, eval_image_size=24)
    batch = first_eval_batch(config, batch_size=4)
    assert batch["image"].shape == (4, 24, 24, 3)
    mean, std = digits_stats()
    digit = sources.DigitsSource("validation")[0]["image"]
    expected = np.asarray(Image.fromarray(digit).resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(batch["image"][0], transforms.normalize(expected, mean, std))
    assert train_batches(config, 1)[0]["image"].shape == (16, 16, 16, 3)


def test_transparency_composites_over_the_stated_background_in_training_and_prediction(tmp_path):
    half_transparent = np.zeros((8, 8, 4), np.uint8)
    half_transparent[..., 0] = 200  # red where opaque, alpha 0 on the left half
    half_transparent[:, 4:, 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(half_transparent).save(path)
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[:, :4] = transforms.ALPHA_BACKGROUND
    expected[:, 4:] = (200, 0, 0)
    # The one conversion: arrays and encoded files, train and eval transforms, and predict.
    np.testing.assert_array_equal(transforms.whole_image(half_transparent, 8), expected)
    np.testing.assert_array_equal(transforms.whole_image(path.read_bytes(), 8), expected)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = transforms.TrainPreprocess("none", 8, mean, std).random_map(
        {"image": path.read_bytes(), "label": 1}, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(train["image"], transforms.normalize(expected, mean, std))
    evaluation = transforms.EvalPreprocess("none", 8, mean, std, batch_size=1)
    np.testing.assert_array_equal(
        evaluation.preprocess(half_transparent), transforms.normalize(expected, mean, std)
    )
    predicted = training_eval_preprocessor({"dataset": "digits", "image_size": 8})(str(path))
    np.testing.assert_array_equal(
        predicted, transforms.normalize(expected, *sources.DigitsSource("train").stats())
    )


# --- progressive resizing ----------------------------------------------------------------------------


def test_resolution_schedule_is_ffcvs_get_resolution():
    schedule = progressive.ResolutionSchedule(
        min_size=160, image_size=192, start_epoch=65, end_epoch=76, multiple=32, steps_per_epoch=10
    )
    for epoch in range(88):
        # FFCV's ImageNet example (rn50 configs: 160 -> 192 over epochs 65..76), written out.
        if epoch <= 65:
            expected = 160
        elif epoch >= 76:
            expected = 192
        else:
            expected = int(np.round(np.interp(epoch, [65, 76], [160, 192]) / 32)) * 32
        assert schedule.size_at(epoch * 10) == schedule.size_at(epoch * 10 + 9) == expected
    assert schedule.sizes(880) == {1: 160, 711: 192}


PROGRESSIVE = dict(
    augment="imagenet",
    image_size=24,
    progressive_resize_min_size=8,
    progressive_resize_epochs=(1.0, 3.0),
    progressive_resize_multiple=8,
)


def test_progressive_batches_follow_the_schedule_and_a_resume_mid_ramp_continues_them():
    # digits: 1,293 train examples, global batch 256: 5 steps per epoch. Epochs 0-1: 8 px, 2: 16, then 24.
    config = digits_config(**PROGRESSIVE)
    batches = train_batches(config, 20, batch_size=256)
    sizes = [batch["image"].shape[1] for batch in batches]
    assert sizes == [8] * 10 + [16] * 5 + [24] * 5
    assert all(
        batch["image"].shape == (256, s, s, 3) for batch, s in zip(batches, sizes, strict=True)
    )
    resumed = train_batches(config, 8, batch_size=256, start_step=12)
    for expected, batch in zip(batches[12:], resumed, strict=True):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])
    # At full size, the same crops, flips and pixels as a run without progressive resizing.
    plain = train_batches(digits_config(augment="imagenet", image_size=24), 20, batch_size=256)
    for expected, batch in zip(plain[15:], batches[15:], strict=True):
        np.testing.assert_array_equal(batch["image"], expected["image"])


def test_progressive_resizing_with_the_recipe_augmentations_does_not_depend_on_workers():
    options = dict(**PROGRESSIVE, auto_augment="trivial_augment", random_erasing_prob=0.5)
    first = train_batches(digits_config(**options), 12, batch_size=256)
    assert [b["image"].shape[1] for b in first] == [8] * 10 + [16] * 2
    # Resumed at the ramp, decoded in a Grain worker process: the same batches.
    again = train_batches(digits_config(**options, num_workers=1), 2, batch_size=256, start_step=10)
    for expected, batch in zip(first[10:], again, strict=True):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_the_compiled_step_traces_once_per_distinct_resolution(parallelism):
    data_parallel = DataParallel(parallelism, devices=jax.devices()[:1])
    traces = []

    def per_device_step(state, batch):
        traces.append(batch["image"].shape)  # runs only when jit/pmap traces a new input shape
        loss = jax.lax.pmean(jnp.mean(batch["image"]) * state["w"], DATA_AXIS)
        return {"w": state["w"] - 0.1 * loss}, loss

    step = data_parallel.compile(per_device_step, donate_state=True)
    state = data_parallel.replicate({"w": np.float32(1.0)})
    schedule = progressive.ResolutionSchedule(
        min_size=8, image_size=24, start_epoch=1, end_epoch=3, multiple=8, steps_per_epoch=2
    )
    sizes = [schedule.size_at(k) for k in range(10)]
    assert sizes == [8, 8, 8, 8, 16, 16, 24, 24, 24, 24]
    for size in sizes:
        batch = {"image": np.ones((4, size, size, 3), np.float32)}
        state, _ = step(state, data_parallel.shard_batch(batch))
    assert len(traces) == 3
    assert sorted({shape[-2] for shape in traces}) == [8, 16, 24]


def test_train_py_runs_the_recipe_with_every_option_on(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_LOG_COMPILES="1",
        JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    overrides = {
        "augment": "imagenet",
        "image_size": 16,
        "batch_size": 256,
        "num_train_steps": 11,  # 5 steps per epoch: epochs 0, 1 and one step of 2
        "auto_augment": "trivial_augment",
        "random_erasing_prob": 0.25,
        "eval_image_size": 20,
        "progressive_resize_min_size": 8,
        "progressive_resize_epochs": "(0.0,2.0)",
        "progressive_resize_multiple": 4,
        "warmup_epochs": 0.0,
        "eval_every_steps": 100,
        "checkpoint_every_steps": 100,
        "log_every_steps": 5,
    }
    command = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={tmp_path}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    log = result.stderr
    summary = (
        "16x16 (progressive resizing: 8 px from step 1, 12 px from step 6, 16 px from step 11)"
    )
    assert f"{summary} train, eval at 20x20;" in log, log[-3000:]
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "train_loss" in r] == [5, 10, 11]
    assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
    assert any("eval_accuracy" in r for r in records)
    # One compilation of the train step per resolution (JAX_LOG_COMPILES logs each with its input shapes).
    compiles = [line for line in log.splitlines() if "Compiling jit(train_step)" in line]
    sizes = [re.search(r"uint8\[256@data,(\d+),\1,3\]", line).group(1) for line in compiles]
    assert sorted(sizes, key=int) == ["8", "12", "16"], "\n".join(compiles)
    evals = [line for line in log.splitlines() if "Compiling jit(eval_step)" in line]
    assert len(evals) == 1 and "uint8[256@data,20,20,3]" in evals[0]
