"""`resnet_jax.batch_norm.BatchNorm` (the CPU models' BatchNorm) against flax's `nn.BatchNorm`.

Same variables, same forward values and running statistics, same gradients (the closed-form backward against
autodiff of flax's layer), alone, inside a ResNet train step, and with the statistics synced over 4 devices.
Tolerances are float32 rounding: the two compute the same sums in a different order.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from resnet_jax.batch_norm import BatchNorm, _normalize_forward, default_batch_norm, normalize_batch
from resnet_jax.models import create_model

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def random_input(shape, offset: float, seed: int = 0) -> jax.Array:
    # A mean offset per channel: both the forward's E[x^2] - E[x]^2 and the backward's sum(dy * x) - mean * sum(dy)
    # cancel here, and must still agree with flax.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(
        0.5, 2.0, shape[-1]
    ) + offset * rng.standard_normal(shape[-1])
    return jnp.asarray(x, jnp.float32)


def init_pair(x, **fields):
    ours, flax_bn = BatchNorm(**fields), nn.BatchNorm(**fields)
    variables = flax_bn.init(jax.random.key(0), x)
    # Non-trivial parameters and running statistics, the same for both.
    rng = np.random.default_rng(1)
    c = x.shape[-1]
    variables = {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(c), jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        },
    }
    return ours, flax_bn, variables


def test_variables_have_flax_names_and_shapes():
    x = random_input((2, 3, 3, 5), 0.0)
    ours = BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    reference = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "shape, offset", [((4, 5, 5, 3), 0.0), ((2, 7, 3, 16), 5.0), ((64, 8), 20.0)]
)
def test_training_values_statistics_and_gradients_equal_flax(shape, offset):
    x = random_input(shape, offset)
    ours, flax_bn, variables = init_pair(x, use_running_average=False, momentum=0.9, epsilon=1e-5)
    dy = random_input(shape, 0.0, seed=2)

    def loss(module, params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(y * dy), (y, updates["batch_stats"])

    value_and_grad = jax.jit(
        jax.value_and_grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0
    )
    (_, (y, stats)), grads = value_and_grad(ours, variables["params"], x)
    (_, (y_ref, stats_ref)), grads_ref = value_and_grad(flax_bn, variables["params"], x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)


def test_eval_mode_equals_flax_and_leaves_statistics_alone():
    x = random_input((3, 4, 4, 6), 1.0)
    ours, flax_bn, variables = init_pair(x, use_running_average=True)
    y = ours.apply(variables, x)
    np.testing.assert_allclose(y, flax_bn.apply(variables, x), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(ours.apply(variables, x) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum(flax_bn.apply(variables, x) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_gradient_through_returned_statistics_equals_autodiff():
    """Callers may differentiate the returned mean/var too; the closed form includes their cotangents."""
    x = random_input((3, 4, 4, 5), 2.0)
    rng = np.random.default_rng(3)
    scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, 5)), jnp.asarray(rng.standard_normal(5))
    cotangents = tuple(
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x.shape, (5,), (5,))
    )
    _, vjp = jax.vjp(lambda *a: normalize_batch(*a, 1e-5, None), x, scale, bias)
    _, vjp_ref = jax.vjp(lambda *a: _normalize_forward(*a, 1e-5, None)[:3], x, scale, bias)
    for a, b in zip(vjp(cotangents), vjp_ref(cotangents), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_bfloat16_input_is_normalized_in_float32():
    x = random_input((2, 4, 4, 3), 1.0).astype(jnp.bfloat16)
    ours, flax_bn, variables = init_pair(x, use_running_average=False, dtype=jnp.float32)
    y, _ = ours.apply(variables, x, mutable=["batch_stats"])
    y_ref, _ = flax_bn.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(ours.apply(variables, x, mutable=["batch_stats"])[0] ** 2))(x)
    assert g.dtype == jnp.bfloat16


def test_a_resnet_train_step_matches_flax_batch_norm():
    """A small CIFAR ResNet's loss, gradients and new statistics (BN after every conv, a downsampling block)."""
    x = random_input((8, 8, 8, 3), 0.5)
    labels = jnp.arange(8) % 10

    def step(batch_norm):
        model = create_model(
            "cifar_resnet20",
            num_classes=10,
            batch_norm=batch_norm,
            stage_sizes=(1, 1),
            stage_widths=(8, 16),
            zero_init_residual=False,
        )
        variables = model.init(jax.random.key(0), x, train=False)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return loss, grads, updates

    loss, grads, stats = jax.jit(lambda: step(BatchNorm))()
    loss_ref, grads_ref, stats_ref = jax.jit(lambda: step(nn.BatchNorm))()
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(float(jnp.max(jnp.abs(b))), 1e-6))
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_create_model_uses_it_on_cpu_only():
    expected = BatchNorm if jax.default_backend() == "cpu" else nn.BatchNorm
    assert default_batch_norm() is expected
    for name in ("resnet18", "resnet50d", "resnetv2_50", "cifar_resnet20"):
        assert create_model(name).batch_norm is expected


SYNCED_SCRIPT = textwrap.dedent(
    """
    import functools, pickle, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from jax.sharding import Mesh, PartitionSpec as P
    from resnet_jax.batch_norm import BatchNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 3, 3, 4)) + 3.0, jnp.float32)  # 4 devices x 2 examples
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    variables = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
    variables = jax.tree.map(lambda v: v + 0.5, variables)

    def gradients(module, x, dy):
        def loss(params, x):
            y, updates = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
            )
            return jnp.sum(y * dy), updates["batch_stats"]

        (param_grads, dx), stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return jax.tree.map(lambda g: g[None], param_grads), dx, stats

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    results = {}
    for name, cls in (("ours", BatchNorm), ("flax", nn.BatchNorm)):
        synced = cls(use_running_average=False, momentum=0.9, axis_name="data")
        mapped = jax.shard_map(
            functools.partial(gradients, synced), mesh=mesh, in_specs=(P("data"), P("data")),
            out_specs=(P("data"), P("data"), P()), check_vma=False,
        )
        results[name + "_shard_map"] = jax.jit(mapped)(x, dy)
        pmapped = jax.pmap(functools.partial(gradients, synced), axis_name="data")
        grads, dx, stats = pmapped(x.reshape(4, 2, 3, 3, 4), dy.reshape(4, 2, 3, 3, 4))
        results[name + "_pmap"] = (jax.tree.map(lambda g: g[:, 0], grads), dx.reshape(x.shape),
                                   jax.tree.map(lambda s: s[0], stats))
    # The whole batch on one device: the synced per-device input gradients are this one's rows, and the
    # per-device parameter gradients sum to this one's.
    grads, dx, stats = jax.jit(functools.partial(gradients, BatchNorm(use_running_average=False, momentum=0.9)))(x, dy)
    results["one_device"] = (grads, dx, stats)
    with open(sys.argv[1], "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, results), f)
    """
)


def test_synced_statistics_over_four_devices_equal_flax_and_one_device(tmp_path):
    out = tmp_path / "synced.pkl"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SYNCED_SCRIPT, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = pickle.loads(out.read_bytes())
    one_grads, one_dx, one_stats = results["one_device"]
    for name in ("ours_shard_map", "ours_pmap", "flax_shard_map", "flax_pmap"):
        grads, dx, stats = results[name]
        np.testing.assert_allclose(
            dx, one_dx, rtol=0, atol=1e-5 * np.abs(one_dx).max(), err_msg=name
        )
        for g, g_one in zip(jax.tree.leaves(grads), jax.tree.leaves(one_grads), strict=True):
            np.testing.assert_allclose(g.sum(0), g_one[0], rtol=1e-5, atol=1e-5, err_msg=name)
        for s, s_one in zip(jax.tree.leaves(stats), jax.tree.leaves(one_stats), strict=True):
            np.testing.assert_allclose(s, s_one, rtol=1e-5, atol=1e-6, err_msg=name)
    # Per device, ours equals flax's autodiff (not only their sums).
    for driver in ("shard_map", "pmap"):
        for a, b in zip(
            jax.tree.leaves(results["ours_" + driver]),
            jax.tree.leaves(results["flax_" + driver]),
            strict=True,
        ):
            np.testing.assert_allclose(
                a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-6), err_msg=driver
            )
