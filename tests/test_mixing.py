"""Mixup and CutMix: what they compute, that they are the same on any device count, and the step's loss."""

import functools
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from background import finish, stop

from resnet_jax import optim, steps, train_state
from resnet_jax.config import base_config
from resnet_jax.mixing import BatchMixing, cutmix_box, mix_batch, rolled_by_one
from resnet_jax.models import create_model
from resnet_jax.parallel import DataParallel

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NUM_CLASSES = 10


def distinct_batch(batch_size=8, size=16, seed=0):
    """Images whose pixels are all distinct across the batch (a pixel names its source row) and one-hot
    targets of distinct labels."""
    images = np.arange(batch_size * size * size * 3, dtype=np.float32).reshape(
        batch_size, size, size, 3
    )
    labels = np.random.default_rng(seed).permutation(NUM_CLASSES)[:batch_size]
    return jnp.asarray(images), jax.nn.one_hot(labels, NUM_CLASSES), labels


def test_rolled_by_one_is_torch_roll_1_0():
    x = jnp.arange(5)
    np.testing.assert_array_equal(rolled_by_one(x), [4, 0, 1, 2, 3])


@pytest.mark.parametrize("seed", range(4))
def test_mixup_label_weights_sum_to_one_and_equal_the_image_weight(seed):
    images, targets, labels = distinct_batch()
    mixing = BatchMixing(mixup_alpha=0.2)
    mixed, mixed_targets, lam = mix_batch(jax.random.key(seed), images, targets, mixing)
    lam = float(lam)
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * np.roll(images, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(np.sum(mixed_targets, -1), 1.0, rtol=1e-6)
    rows = np.arange(len(labels))
    np.testing.assert_allclose(mixed_targets[rows, labels], lam, rtol=1e-6)
    np.testing.assert_allclose(mixed_targets[rows, np.roll(labels, 1)], 1 - lam, rtol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_label_weight_is_one_minus_the_pasted_area_fraction(seed):
    images, targets, labels = distinct_batch(size=12)
    mixed, mixed_targets, lam = mix_batch(
        jax.random.key(seed), images, targets, BatchMixing(cutmix_alpha=1.0)
    )
    from_rolled = np.all(np.asarray(mixed) == np.roll(images, 1, 0), axis=-1)
    from_self = np.all(np.asarray(mixed) == np.asarray(images), axis=-1)
    assert np.all(from_rolled ^ from_self)  # every pixel is copied from exactly one of the two
    pasted = from_rolled[0]
    assert np.all(from_rolled == pasted)  # one box for the whole batch
    ys, xs = np.nonzero(pasted)
    if ys.size:  # a rectangle
        assert pasted[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
    np.testing.assert_allclose(float(lam), 1.0 - pasted.mean(), rtol=1e-6)
    rows = np.arange(len(labels))
    np.testing.assert_allclose(mixed_targets[rows, labels], float(lam), rtol=1e-6)
    np.testing.assert_allclose(np.sum(mixed_targets, -1), 1.0, rtol=1e-6)


def test_cutmix_box_follows_torchvision_clipping():
    """A sampled lam whose box sticks out of the image: the label weight is the clipped box's, not lam."""
    for seed in range(20):
        mask, weight = cutmix_box(jax.random.key(seed), jnp.float32(0.1), 10, 20)
        half_h, half_w = int(0.5 * np.sqrt(0.9) * 10), int(0.5 * np.sqrt(0.9) * 20)
        rows, cols = np.nonzero(np.asarray(mask))
        assert (
            rows.max() - rows.min() + 1 <= 2 * half_h and cols.max() - cols.min() + 1 <= 2 * half_w
        )
        np.testing.assert_allclose(float(weight), 1 - np.asarray(mask).mean(), rtol=1e-6)


def test_mix_prob_zero_and_switch_prob_choose_per_batch():
    images, targets, _ = distinct_batch()
    off = BatchMixing(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    mixed, mixed_targets, lam = mix_batch(jax.random.key(0), images, targets, off)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(mixed_targets, targets)
    assert float(lam) == 1.0
    always_cutmix = BatchMixing(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    for seed in range(4):
        mixed, _, _ = mix_batch(jax.random.key(seed), images, targets, always_cutmix)
        copied = (mixed == images) | (mixed == jnp.roll(images, 1, 0))
        assert bool(jnp.all(copied))  # no blended pixel: CutMix every time


def test_the_draws_are_a_function_of_seed_and_step():
    mixing = BatchMixing(mixup_alpha=0.2, seed=3)
    images, targets, _ = distinct_batch()
    same = [mix_batch(mixing.step_key(jnp.int32(5)), images, targets, mixing)[2] for _ in range(2)]
    assert float(same[0]) == float(same[1])
    other = mix_batch(mixing.step_key(jnp.int32(6)), images, targets, mixing)[2]
    assert float(other) != float(same[0])


FOUR_DEVICE_SCRIPT = textwrap.dedent(
    """
    import pickle, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnet_jax.mixing import BatchMixing, mix_batch
    mixing = BatchMixing(mixup_alpha=0.2, cutmix_alpha=1.0, seed=1)
    images, targets = pickle.load(open(sys.argv[1], "rb"))
    assert jax.device_count() == 4
    def per_device(step, x, t):
        return mix_batch(mixing.step_key(step), x, t, mixing, axis_name="data")[:2]
    mesh = jax.make_mesh((4,), ("data",))
    rows = NamedSharding(mesh, P("data"))
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                    out_specs=(P("data"), P("data")), check_vma=False))
    mapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0))
    out = {"shard_map": [], "pmap": []}
    for step in range(6):
        s = jnp.int32(step)
        placed = [jax.device_put(a, rows) for a in (images, targets)]
        out["shard_map"] += [jax.device_get(a) for a in sharded(s, *placed)]
        split = [a.reshape(4, -1, *a.shape[1:]) for a in (images, targets)]
        out["pmap"] += [jax.device_get(a).reshape(-1, *a.shape[2:]) for a in mapped(s, *split)]
    pickle.dump(out, open(sys.argv[2], "wb"))
    """
)


@pytest.fixture(scope="module", autouse=True)
def four_device_run(tmp_path_factory):
    """FOUR_DEVICE_SCRIPT in a subprocess (4 simulated devices), started before the module's first test:
    it runs on the second core while the in-process tests run on the first. Yields a function that waits
    for it and returns its outputs."""
    images, targets, _ = distinct_batch(size=6)
    directory = tmp_path_factory.mktemp("four_devices")
    inputs, outputs = directory / "in.pkl", directory / "out.pkl"
    inputs.write_bytes(pickle.dumps((np.asarray(images), np.asarray(targets))))
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", FOUR_DEVICE_SCRIPT, str(inputs), str(outputs)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def result() -> dict:
        finish(process, timeout=300)
        return pickle.loads(outputs.read_bytes())

    yield result
    stop(process)


def tiny_step(mixing=None, label_smoothing=0.1):
    """A cut-down cifar_resnet20 train step on one device, and its model, state and batch."""
    from test_steps import numpy_init

    config = base_config()
    config.update({"learning_rate": 0.1, "num_train_steps": 10})
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=4)
    tx = optim.create_optimizer(config, schedule)
    model = create_model(
        "cifar_resnet20", num_classes=NUM_CLASSES, stage_sizes=(1, 1), stage_widths=(8, 16)
    )
    dp = DataParallel("shard_map", jax.devices()[:1])
    state = dp.replicate(
        jax.device_get(train_state.create_train_state(numpy_init(model), tx, use_ema=False))
    )
    options = dict(apply_fn=model.apply, tx=tx, learning_rate_fn=schedule, ema_decay=0.0)
    if mixing is not None:
        options["mixing"] = mixing
    step = dp.compile(
        functools.partial(steps.train_step, label_smoothing=label_smoothing, **options),
        donate_state=False,
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32),
    }
    return model, dp, state, step, dp.shard_batch(batch)


def test_train_step_with_mixing_off_is_bit_identical_to_no_mixing_option():
    _, dp, state, plain, batch = tiny_step()
    results = [dp.unreplicate(plain(state, batch))]
    for off in (BatchMixing(), BatchMixing(mixup_alpha=0.0, cutmix_alpha=0.0, seed=7)):
        _, _, _, step, _ = tiny_step(off)
        results.append(dp.unreplicate(step(state, batch)))
    for other in results[1:]:
        jax.tree.map(np.testing.assert_array_equal, results[0], other)


def test_train_step_loss_is_smoothed_cross_entropy_against_the_mixed_targets():
    mixing = BatchMixing(mixup_alpha=0.4, cutmix_alpha=1.0, seed=2)
    model, dp, state, step, batch = tiny_step(mixing, label_smoothing=0.1)
    _, metrics = step(state, batch)
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    one_hot = jax.nn.one_hot(labels, NUM_CLASSES)
    mixed, targets, _ = mix_batch(mixing.step_key(jnp.int32(0)), images, one_hot, mixing)
    logits = model.apply(
        dp.unreplicate(state).variables, mixed, train=True, mutable=["batch_stats"]
    )[0]
    smoothed = np.asarray(targets) * 0.9 + 0.1 / NUM_CLASSES  # torch CrossEntropyLoss's smoothing
    log_probs = jax.nn.log_softmax(logits)
    expected = float(np.mean(-(smoothed * log_probs).sum(-1)))
    np.testing.assert_allclose(float(dp.unreplicate(metrics)["loss"]), expected, rtol=1e-5)


# Last in the file: the subprocess it reads has had the other tests' time to finish.
def test_mixing_the_global_batch_is_the_same_on_1_and_4_devices(four_device_run):
    """shard_map and pmap over 4 simulated devices (a subprocess) give the one-device result bit for bit."""
    mixing = BatchMixing(mixup_alpha=0.2, cutmix_alpha=1.0, seed=1)
    images, targets, _ = distinct_batch(size=6)
    one_device = jax.jit(lambda step, x, t: mix_batch(mixing.step_key(step), x, t, mixing)[:2])
    expected = [
        np.asarray(x) for step in range(6) for x in one_device(jnp.int32(step), images, targets)
    ]
    copied = [np.all((m == images) | (m == np.roll(images, 1, 0))) for m in expected[::2]]
    assert any(copied) and not all(copied)  # both CutMix and mixup batches among the steps
    out = four_device_run()
    for driver in ("shard_map", "pmap"):
        for got, want in zip(out[driver], expected, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=driver)
