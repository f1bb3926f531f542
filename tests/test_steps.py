"""The per-device steps on one device: loss and metrics against numpy, EMA, bf16 dtypes, masked eval."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import optim, steps, train_state
from resnet_jax.config import base_config
from resnet_jax.models import create_model
from resnet_jax.parallel import DATA_AXIS, DataParallel


def numpy_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_cross_entropy_with_label_smoothing_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    targets = np.full((6, 10), 0.1 / 10)
    targets[np.arange(6), labels] += 0.9
    expected = -(targets * numpy_log_softmax(logits)).sum(-1)
    actual = steps.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels), 0.1)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    assert actual.dtype == jnp.float32


def test_top1_and_top5_indicators():
    logits = jnp.asarray([np.arange(10.0), np.arange(10.0)[::-1].copy(), np.arange(10.0)])
    labels = jnp.asarray([9, 4, 3])  # top-1 hit; in the top 5 (0..4); rank 7 of 10: a miss
    top1, top5 = steps.correct_predictions(logits, labels)
    np.testing.assert_array_equal(top1, [1, 0, 0])
    np.testing.assert_array_equal(top5, [1, 1, 0])


def numpy_init(model, image_size: int = 8) -> dict:
    """Deterministic He-normal kernels, unit BN scale/variance, zero biases/means: model.init's shapes
    without compiling model.init (one normal sample per kernel costs more to compile than a train step)."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    )
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        if path[-1].key == "kernel":
            fan_in = np.prod(shape.shape[:-1])
            return (rng.normal(size=shape.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return (np.ones if path[-1].key in ("scale", "var") else np.zeros)(shape.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def tiny_setup(dtype=jnp.float32, ema_decay=0.0):
    config = base_config()
    config.update({"learning_rate": 0.1, "num_train_steps": 10, "warmup_epochs": 0.0})
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=4)
    tx = optim.create_optimizer(config, schedule)
    model = create_model(
        "cifar_resnet20",
        num_classes=10,
        stage_sizes=(1, 1),
        stage_widths=(8, 16),
        dtype=dtype,
        bn_axis_name=DATA_AXIS,
    )
    dp = DataParallel("shard_map", jax.devices()[:1])
    variables = numpy_init(model)
    state = dp.replicate(
        jax.device_get(train_state.create_train_state(variables, tx, use_ema=ema_decay > 0))
    )
    step = dp.compile(
        functools.partial(
            steps.train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=schedule,
            label_smoothing=0.0,
            ema_decay=ema_decay,
        ),
        donate_state=False,
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    return model, dp, state, step, dp.shard_batch(batch), schedule


def test_train_step_updates_state_and_reports_the_learning_rate_and_ema():
    model, dp, state, step, batch, schedule = tiny_setup(ema_decay=0.75)
    state1, metrics1 = step(state, batch)
    state2, metrics2 = step(state1, batch)
    host = dp.unreplicate([metrics1, metrics2])
    assert int(dp.unreplicate(state2.step)) == 2
    np.testing.assert_allclose(host[0]["learning_rate"], schedule(0), atol=0)
    np.testing.assert_allclose(
        host[1]["learning_rate"], schedule(1), rtol=1e-6
    )  # cosine, 1 of 10 steps
    assert host[1]["loss"] < host[0]["loss"]  # the same batch again: the update helped
    assert np.isfinite(host[0]["grad_norm"]) and host[0]["grad_norm"] > 0
    # The loss metric is the cross entropy (label_smoothing=0 here) of the pre-update params, with
    # train-mode BN; on one device, synced BN is plain BN.
    logits = model.clone(bn_axis_name=None).apply(
        dp.unreplicate(state).variables,
        np.asarray(batch["image"]),
        train=True,
        mutable=["batch_stats"],
    )[0]
    expected = np.mean(steps.cross_entropy_loss(logits, np.asarray(batch["label"]), 0.0))
    np.testing.assert_allclose(host[0]["loss"], expected, rtol=1e-5)
    # EMA: ema_1 = 0.75 * params_0 + 0.25 * params_1, ema_2 = 0.75 * ema_1 + 0.25 * params_2.
    p0, p1, p2 = (dp.unreplicate(s.params) for s in (state, state1, state2))
    expected_ema = jax.tree.map(lambda a, b, c: 0.75 * (0.75 * a + 0.25 * b) + 0.25 * c, p0, p1, p2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        dp.unreplicate(state2.ema_params),
        expected_ema,
    )
    # The BN running statistics are averaged the same way, so EMA weights are evaluated with statistics
    # of their own, not the live model's.
    b0, b1, b2 = (dp.unreplicate(s.batch_stats) for s in (state, state1, state2))
    expected_ema_stats = jax.tree.map(
        lambda a, b, c: 0.75 * (0.75 * a + 0.25 * b) + 0.25 * c, b0, b1, b2
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        dp.unreplicate(state2.ema_batch_stats),
        expected_ema_stats,
    )


def test_bfloat16_compute_keeps_params_optimizer_state_and_bn_in_float32():
    model, dp, state, step, batch, _ = tiny_setup(dtype=jnp.bfloat16)
    new_state, metrics = step(state, batch)
    host = dp.unreplicate(new_state)
    for tree in (host.params, host.batch_stats, host.opt_state):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree) if leaf.ndim > 0} == {
            np.dtype(np.float32)
        }
    loss = dp.unreplicate(metrics)["loss"]
    assert loss.dtype == np.float32 and np.isfinite(loss)
    # The convolutions (lax convs, or the matmuls CpuConv computes them with on CPU) and the classifier
    # really run in bfloat16. Convs sit in nested jaxprs; each printed equation starts with its typed
    # outputs, e.g. "c:bf16[...] =".
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
        host.variables, np.asarray(batch["image"])
    )
    outputs = [
        line.split("=")[0]
        for line in str(jaxpr).splitlines()
        if "conv_general_dilated[" in line or "dot_general[" in line
    ]
    assert len(outputs) >= 3
    assert all("bf16[" in out and "f32[" not in out for out in outputs), outputs


def test_eval_step_ignores_padding_rows():
    model, dp, state, _, batch, _ = tiny_setup()
    evaluate = dp.compile(
        functools.partial(steps.eval_step, apply_fn=model.apply), donate_state=False
    )
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    # Padding rows hold garbage: they must change nothing.
    padded = dict(image=images.copy(), label=labels.copy(), mask=mask)
    padded["image"][5:] = 1e3
    sums = dp.unreplicate(evaluate(state, dp.shard_batch(padded)))
    logits = np.asarray(model.apply(dp.unreplicate(state).variables, images[:5], train=False))
    assert sums["count"] == 5
    assert sums["correct"] == np.sum(np.argmax(logits, -1) == labels[:5])
    expected_loss = -numpy_log_softmax(logits)[np.arange(5), labels[:5]].sum()
    np.testing.assert_allclose(sums["loss_sum"], expected_loss, rtol=1e-5)
    summary = steps.summarize_eval(sums)
    assert summary["accuracy"] == pytest.approx(sums["correct"] / 5)


def test_summarize_eval_rejects_an_empty_split():
    with pytest.raises(ValueError, match="no examples"):
        steps.summarize_eval({"loss_sum": 0.0, "correct": 0.0, "top5_correct": 0.0, "count": 0.0})


def test_sgd_weight_decay_is_added_to_the_gradient_before_momentum():
    # torch.optim.SGD(weight_decay=wd): the first update is -lr * (grad + wd * param).
    config = base_config()
    config.update({"learning_rate": 0.2, "weight_decay": 1e-4, "momentum": 0.9})
    tx = optim.create_optimizer(config, optax.constant_schedule(0.2))
    params = {"w": jnp.full((2, 2), 3.0)}
    updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.2 * (1.0 + 1e-4 * 3.0), rtol=1e-6)
