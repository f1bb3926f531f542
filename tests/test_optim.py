"""The optimizer and schedules: weight-decay mask, schedule values at key steps, each optimizer's update."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import optim
from resnet_jax.config import base_config
from resnet_jax.models import create_model

REPO = os.path.join(os.path.dirname(__file__), "..")


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def resnet_params():
    model = create_model("cifar_resnet20", num_classes=10)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    )["params"]


def test_weight_decay_mask_covers_kernels_only(resnet_params):
    mask = optim.weight_decay_mask(resnet_params)
    flat = {
        "/".join(str(k.key) for k in path): value
        for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    decayed = sorted(name for name, on in flat.items() if on)
    excluded = sorted(name for name, on in flat.items() if not on)
    assert all(name.endswith("kernel") for name in decayed)
    assert all(name.endswith(("scale", "bias")) for name in excluded)
    assert "fc/bias" in excluded and "stem_bn/scale" in excluded and "stem_bn/bias" in excluded
    assert "fc/kernel" in decayed and "stage3_block3/conv2/kernel" in decayed
    # cifar_resnet20: 19 convs + fc kernel; 19 BNs x (scale, bias) + fc bias.
    assert len(decayed) == 20 and len(excluded) == 39


def sgd_config(**overrides):
    config = base_config()
    config.update({"momentum": 0.0, "nesterov": False, "weight_decay": 0.1, **overrides})
    return config


def test_sgd_decays_kernels_but_not_bn_or_bias():
    params = {
        "conv": {"kernel": jnp.full((3, 3, 2, 2), 2.0)},
        "bn": {"scale": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)},
    }
    tx = optim.create_optimizer(sgd_config(), optax.constant_schedule(0.5))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5 * 0.1 * 2.0)  # -lr * wd * w
    np.testing.assert_array_equal(updates["bn"]["scale"], 0.0)
    np.testing.assert_array_equal(updates["bn"]["bias"], 0.0)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_every_optimizer_leaves_bn_and_bias_undecayed(name):
    params = {"conv": {"kernel": jnp.full((1, 1, 2, 2), 2.0)}, "bn": {"scale": jnp.full((2,), 2.0)}}
    tx = optim.create_optimizer(sgd_config(optimizer=name), optax.constant_schedule(0.5))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0  # decay moves kernels
    np.testing.assert_array_equal(updates["bn"]["scale"], 0.0)


def test_global_norm_clipping_bounds_the_update():
    params = {"w": jnp.zeros((2, 2))}
    config = sgd_config(weight_decay=0.0, grad_clip_norm=1.0)
    tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
    updates, _ = tx.update({"w": jnp.full((2, 2), 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


def test_clipping_in_a_linear_probe_ignores_the_frozen_backbone_gradients():
    params = {"backbone": {"kernel": jnp.zeros((2, 2))}, "fc": {"kernel": jnp.zeros((2, 2))}}
    labels = {"backbone": {"kernel": "backbone"}, "fc": {"kernel": "head"}}
    config = sgd_config(weight_decay=0.0, grad_clip_norm=1.0)
    tx = optim.create_optimizer(
        config, optax.constant_schedule(1.0), param_labels=labels, lr_multipliers={"backbone": 0.0}
    )
    # Head gradient norm 0.4 (under the clip); a huge backbone gradient must not scale it down.
    grads = {
        "backbone": {"kernel": jnp.full((2, 2), 100.0)},
        "fc": {"kernel": jnp.full((2, 2), 0.2)},
    }
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["backbone"]["kernel"], 0.0)
    np.testing.assert_allclose(updates["fc"]["kernel"], -0.2, rtol=1e-6)


def test_step_decay_boundaries_must_increase_and_follow_warmup():
    for epochs, warmup in [((3, 3), 0.0), ((6, 3), 0.0), ((1,), 2.0)]:
        config = schedule_config(lr_schedule="step", lr_decay_epochs=epochs, warmup_epochs=warmup)
        with pytest.raises(ValueError, match="strictly increasing"):
            optim.create_learning_rate_schedule(config, steps_per_epoch=10)


def schedule_config(**overrides):
    config = base_config()
    config.update({"learning_rate": 0.4, "num_epochs": 10.0, "num_train_steps": -1, **overrides})
    return config


def test_warmup_then_cosine_values():
    fn = optim.create_learning_rate_schedule(
        schedule_config(lr_schedule="cosine", warmup_epochs=2.0), steps_per_epoch=100
    )
    np.testing.assert_allclose(fn(0), 0.0)
    np.testing.assert_allclose(fn(100), 0.2, rtol=1e-6)  # halfway through warmup
    np.testing.assert_allclose(fn(200), 0.4, rtol=1e-6)  # peak at the end of warmup
    np.testing.assert_allclose(fn(600), 0.2, rtol=1e-5)  # cosine halfway: 800 steps after warmup
    np.testing.assert_allclose(fn(1000), 0.0, atol=1e-7)


def test_step_decay_at_epoch_boundaries():
    fn = optim.create_learning_rate_schedule(
        schedule_config(lr_schedule="step", lr_decay_epochs=(3, 6), lr_decay_factor=0.1),
        steps_per_epoch=10,
    )
    values = [float(fn(s)) for s in (0, 29, 30, 59, 60, 99)]
    np.testing.assert_allclose(values, [0.4, 0.4, 0.04, 0.04, 0.004, 0.004], rtol=1e-5)


def test_constant_schedule_with_warmup():
    fn = optim.create_learning_rate_schedule(
        schedule_config(lr_schedule="constant", warmup_epochs=1.0), steps_per_epoch=10
    )
    np.testing.assert_allclose([fn(0), fn(5), fn(10), fn(99)], [0.0, 0.2, 0.4, 0.4], rtol=1e-6)


def test_step_schedule_needs_exactly_one_kind_of_boundary():
    config = schedule_config(lr_schedule="step", lr_decay_epochs=(3,), lr_decay_steps=(30,))
    with pytest.raises(ValueError, match="exactly one"):
        optim.create_learning_rate_schedule(config, steps_per_epoch=10)


def test_unknown_optimizer_and_schedule_are_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.create_optimizer(sgd_config(optimizer="rmsprop"), optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        optim.create_learning_rate_schedule(schedule_config(lr_schedule="linear"), 10)


def test_cifar10_resnet56_recipe_is_the_papers():
    config = load_recipe("cifar10_resnet56")
    fn = optim.create_learning_rate_schedule(config, steps_per_epoch=50_000 // 128)
    assert optim.total_train_steps(config, 50_000 // 128) == 64_000
    values = [float(fn(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    np.testing.assert_allclose(values, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)
    assert config.weight_decay == 1e-4 and config.momentum == 0.9 and config.batch_size == 128


def test_imagenet_resnet50_recipe_scales_lr_with_batch():
    config = load_recipe("imagenet_resnet50")
    steps_per_epoch = 1_281_167 // config.batch_size
    fn = optim.create_learning_rate_schedule(config, steps_per_epoch)
    peak = 0.1 * config.batch_size / 256
    np.testing.assert_allclose(fn(5 * steps_per_epoch), peak, rtol=1e-6)  # end of 5 warmup epochs
    np.testing.assert_allclose(fn(0), 0.0)
    assert config.nesterov and config.momentum == 0.9 and config.label_smoothing == 0.1
    assert config.num_epochs == 90 and config.weight_decay == 1e-4


def test_gradient_norm_is_the_global_l2_norm():
    """Summed tap by tap (why: optim.gradient_norm), it is still the norm of the whole tree: kernels whose
    gradient lives in one tap, dense kernels, 1x1 kernels, vectors and a bfloat16 leaf (summed in float32)."""
    rng = np.random.default_rng(1)
    centre = jnp.pad(
        jnp.asarray(rng.normal(size=(1, 1, 6, 5)), jnp.float32), ((1, 1), (1, 1), (0, 0), (0, 0))
    )
    tree = {
        "padded": centre,
        "dense": jnp.asarray(rng.normal(size=(3, 5, 4, 2)), jnp.float32),
        "pointwise": jnp.asarray(rng.normal(size=(1, 1, 8, 3)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
        "half": jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.bfloat16),
        "stem": jnp.asarray(rng.normal(size=(7, 7, 3, 2)), jnp.float32),
        "not_a_kernel": jnp.asarray(rng.normal(size=(64, 32, 1, 1)), jnp.float32),
    }
    expected = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in tree.values()))
    norm = jax.jit(optim.gradient_norm)(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, expected, rtol=1e-6)
    assert float(optim.gradient_norm({})) == 0.0


def test_clipping_scales_like_optax_clip_by_global_norm():
    """The clip takes optim.gradient_norm (per tap) and otherwise is optax's: same updates, same state."""
    rng = np.random.default_rng(2)
    grads = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)},
        "bn": {"scale": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
    }
    for max_norm in (0.5, 1e3):  # clipped, and left alone
        ours, theirs = optim.clip_by_gradient_norm(max_norm), optax.clip_by_global_norm(max_norm)
        assert ours.init(grads) == theirs.init(grads)
        expected, _ = theirs.update(grads, theirs.init(grads))
        actual, _ = jax.jit(ours.update)(grads, ours.init(grads))
        jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6), actual, expected)


def test_clipping_bfloat16_gradients_under_strict_dtype_promotion():
    # Mixed precision keeps bf16 gradients; the clip must not rely on implicit bf16 x f32 promotion.
    grads = {"kernel": jnp.full((3, 3, 2, 2), 4.0, jnp.bfloat16)}
    clip = optim.clip_by_gradient_norm(1.0)
    with jax.numpy_dtype_promotion("strict"):
        clipped, _ = jax.jit(clip.update)(grads, clip.init(grads))
    assert clipped["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(optim.gradient_norm(clipped)), 1.0, rtol=1e-2)


def test_gradient_norm_takes_integer_leaves_as_optax_does():
    grads = {"w": jnp.asarray([3.0, 4.0]), "count": jnp.asarray([12], jnp.int32)}
    np.testing.assert_allclose(float(optim.gradient_norm(grads)), 13.0, rtol=1e-6)
