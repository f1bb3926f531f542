"""uint8 batches from the host, normalized inside the compiled step: the same numbers as the float path."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from resnet_jax import steps, train_state
from resnet_jax.config import base_config, validate_config
from resnet_jax.data import (
    create_eval_batches,
    create_train_iterator,
    folder,
    normalization_stats,
    transforms,
)
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel

# float32 rounding of (pixel / 255 - mean) / std (|x| <= ~2.7): the host's two roundings vs the device's
# possibly fused multiply-add differ by at most an ulp or two.
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def _fresh_folder_cache():
    folder.index_folder.cache_clear()
    yield


def _photo_folder(root):
    rng = np.random.default_rng(0)
    for i in range(24):
        pixels = rng.integers(0, 256, (30 + i, 40 - i // 2, 3), dtype=np.uint8)
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return root


def _config(dataset, **overrides):
    config = base_config()
    config.update(dataset=dataset, **overrides)
    validate_config(config)
    return config


@pytest.fixture(params=["digits", "folder_imagenet", "folder_erasing"])
def config(request, tmp_path):
    if request.param == "digits":
        return _config("digits")
    recipe = {"random_erasing_prob": 1.0} if request.param == "folder_erasing" else {}
    return _config(
        f"folder:{_photo_folder(tmp_path / 'photos')}",
        image_size=16,
        augment="imagenet",
        normalization="imagenet",
        folder_val_fraction=0.3,
        **recipe,
    )


def _normalized(images, config):
    return np.asarray(steps.normalize_images(jnp.asarray(images), *normalization_stats(config)))


def test_uint8_train_batches_normalized_in_the_step_equal_the_float_batches(config):
    args = dict(process_index=0, process_count=1, global_batch_size=8, seed=3)
    floats = create_train_iterator(config, **args)
    pixels = create_train_iterator(config, **args, uint8_images=True)
    for _ in range(2):
        expected, batch = next(floats), next(pixels)
        assert batch["image"].dtype == np.uint8 and expected["image"].dtype == np.float32
        np.testing.assert_array_equal(batch["label"], expected["label"])
        normalized = _normalized(batch["image"], config)
        if config.random_erasing_prob == 0:
            np.testing.assert_allclose(normalized, expected["image"], rtol=0, atol=TOLERANCE)
            continue
        # Erased pixels are the uint8 mean colour: 0 after normalization up to its rounding to a pixel.
        mean, std = (np.asarray(v, np.float32) for v in normalization_stats(config))
        erased = expected["image"] == 0
        assert erased.mean() > 0.05
        assert np.all(np.abs(normalized[erased]) <= 0.5 / 255 / std.max() + TOLERANCE)
        np.testing.assert_allclose(normalized[~erased], expected["image"][~erased], atol=TOLERANCE)


def test_normalize_images_leaves_float_images_alone_and_needs_stats_for_uint8():
    images = jnp.ones((1, 2, 2, 3), jnp.float32)
    assert steps.normalize_images(images, None, None) is images
    with pytest.raises(ValueError, match="pixel_mean and pixel_std"):
        steps.normalize_images(images.astype(jnp.uint8), None, None)


def _tiny_eval(config):
    model = create_model("cifar_resnet20", num_classes=10, stage_sizes=(1, 1), stage_widths=(8, 16))
    # lazy_init: init's variables bit for bit, without running the forward pass op by op.
    variables = model.lazy_init(
        jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32), train=False
    )
    tx = optax.sgd(0.1)
    state = train_state.create_train_state(jax.device_get(variables), tx, use_ema=False)
    data_parallel = DataParallel("shard_map", jax.devices()[:1])
    mean, std = normalization_stats(config)
    step = data_parallel.compile(
        functools.partial(
            steps.eval_step,
            apply_fn=model.apply,
            pixel_mean=mean,
            pixel_std=std,
            axis_name=DATA_AXIS,
        ),
        donate_state=False,
    )
    return model, variables, data_parallel, data_parallel.replicate(state), step


def test_eval_metrics_and_logits_through_uint8_batches_equal_the_float_path():
    config = _config("digits")
    model, variables, data_parallel, state, step = _tiny_eval(config)
    args = dict(process_index=0, process_count=1, local_batch_size=64, split="test")
    totals = {"float": [], "uint8": []}
    for name, uint8 in (("float", False), ("uint8", True)):
        for batch in create_eval_batches(config, **args, uint8_images=uint8):
            sums = data_parallel.unreplicate(step(state, data_parallel.shard_batch(batch)))
            totals[name].append([float(sums[k]) for k in steps.EVAL_SUM_NAMES])
        assert len(totals[name]) == 6  # 360 test digits
    float_sums, uint8_sums = np.sum(totals["float"], 0), np.sum(totals["uint8"], 0)
    np.testing.assert_allclose(uint8_sums, float_sums, rtol=1e-6)
    assert uint8_sums[-1] == 360
    # The logits themselves (what predict reports), on one batch of each path.
    float_batch = next(create_eval_batches(config, **args))
    uint8_batch = next(create_eval_batches(config, **args, uint8_images=True))
    logits_float = model.apply(variables, float_batch["image"], train=False)
    logits_uint8 = model.apply(variables, _normalized(uint8_batch["image"], config), train=False)
    np.testing.assert_allclose(logits_uint8, logits_float, rtol=1e-5, atol=1e-5)


def test_eval_preprocess_pads_uint8_batches_with_zero_rows():
    config = _config("digits")
    mean, std = normalization_stats(config)
    preprocess = transforms.EvalPreprocess("none", 8, mean, std, batch_size=4, host_normalize=False)
    batch = preprocess.map([])
    assert batch["image"].dtype == np.uint8 and not batch["image"].any()
    assert not batch["mask"].any()


def test_predict_on_uint8_images_equals_predict_on_the_float_images():
    from resnet_jax import predict

    config = _config("digits")
    model = create_model("cifar_resnet20", num_classes=10)
    size = config.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.device_get(model.lazy_init(jax.random.key(1), images))
    args = dict(process_index=0, process_count=1, local_batch_size=8, split="test")
    floats = next(create_eval_batches(config, **args))["image"]
    pixels = next(create_eval_batches(config, **args, uint8_images=True))["image"]
    expected = predict.predict(variables, "cifar_resnet20", floats, top_k=10)
    got = predict.predict(
        variables, "cifar_resnet20", pixels, top_k=10, pixel_stats=normalization_stats(config)
    )
    for row_got, row_expected in zip(got, expected, strict=True):
        by_class = dict((index, prob) for index, _, prob in row_expected)
        np.testing.assert_allclose(
            [prob for *_, prob in row_got], [by_class[i] for i, *_ in row_got], atol=1e-6
        )
