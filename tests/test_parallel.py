"""Data parallelism on 8 simulated CPU devices: more devices change the speed, not the result.

One subprocess (with XLA_FLAGS=--xla_force_host_platform_device_count=8, never set in this process) runs every
scenario once and saves the results; the tests below compare them:

- 5 steps on 8 devices with synced BN equal 5 steps on 1 device with the same global batch;
- the pmap driver equals the shard_map driver;
- per-device BN differs from synced BN and equals a hand-computed per-shard reference;
- exact eval over a split whose size is not a multiple of the batch equals numpy over all examples.

Model: cifar_resnet20 cut to two stages of one block (widths 8, 16), 8x8 inputs, global batch 16: the code
paths of the real networks (stem, residual blocks, an option-A downsampling shortcut, BN, head) at a
fraction of the compile time.
"""

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NUM_DEVICES = 8
NUM_STEPS = 5
GLOBAL_BATCH = 16

SCRIPT = textwrap.dedent(
    """
    import functools, pickle, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from resnet_jax import optim, steps, train_state
    from resnet_jax.data import create_eval_batches, dataset_info
    from resnet_jax.models import create_model
    from resnet_jax.parallel import DATA_AXIS, DataParallel
    from resnet_jax.config import base_config

    NUM_STEPS, GLOBAL_BATCH = %(num_steps)d, %(global_batch)d
    assert jax.device_count() == 8, jax.devices()
    config = base_config()
    config.update({"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "learning_rate": 0.1,
                   "lr_schedule": "cosine", "warmup_epochs": 1.0, "num_train_steps": NUM_STEPS})
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=2)
    tx = optim.create_optimizer(config, schedule)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.normal(size=(GLOBAL_BATCH, 8, 8, 3)).astype(np.float32),
         "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}
        for _ in range(NUM_STEPS)
    ]

    def make_model(bn_axis_name):
        return create_model("cifar_resnet20", num_classes=10, stage_sizes=(1, 1),
                            stage_widths=(8, 16), bn_axis_name=bn_axis_name)

    def init(model):
        # Deterministic numpy weights of the right shapes (He-normal kernels, unit BN scale/variance):
        # compiling model.init (a normal sample per kernel) would cost more than all the steps here.
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
        rng = np.random.default_rng(0)

        def leaf(path, shape):
            name = path[-1].key
            if name == "kernel":
                fan_in = np.prod(shape.shape[:-1])
                return (rng.normal(size=shape.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            return (np.ones if name in ("scale", "var") else np.zeros)(shape.shape, np.float32)

        variables = jax.tree_util.tree_map_with_path(leaf, dict(shapes))
        return jax.device_get(train_state.create_train_state(variables, tx, use_ema=False))

    def train(parallelism, devices, bn_axis_name):
        model = make_model(bn_axis_name)
        dp = DataParallel(parallelism, devices)
        state = dp.replicate(init(model))
        step = dp.compile(functools.partial(
            steps.train_step, apply_fn=model.apply, tx=tx, learning_rate_fn=schedule,
            label_smoothing=0.1, ema_decay=0.0, axis_name=DATA_AXIS), donate_state=True)
        metrics = []
        for batch in batches:
            state, m = step(state, dp.shard_batch(batch))
            metrics.append(m)
        state = dp.unreplicate(state)
        return {"params": state.params, "batch_stats": state.batch_stats,
                "losses": [float(m["loss"]) for m in dp.unreplicate(metrics)]}

    def per_shard_reference():
        # Per-device BN by hand, on one device: each shard's forward/backward on its own, the gradients and
        # new BN statistics averaged over shards, one optimizer update.
        model = make_model(None)
        state = init(model)

        @jax.jit
        def shard_grads(params, batch_stats, images, labels):
            def loss_fn(params):
                logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                              train=True, mutable=["batch_stats"])
                return jnp.mean(steps.cross_entropy_loss(logits, labels, 0.1)), updates["batch_stats"]
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return loss, grads, new_stats

        apply_tx = jax.jit(lambda grads, opt_state, params: tx.update(grads, opt_state, params))
        params, batch_stats, opt_state = state.params, state.batch_stats, state.opt_state
        losses = []
        for batch in batches:
            # Device i of the mesh holds rows [2i, 2i + 2) of the global batch.
            shards = [shard_grads(params, batch_stats, batch["image"].reshape(8, -1, 8, 8, 3)[i],
                                  batch["label"].reshape(8, -1)[i]) for i in range(8)]
            mean = lambda *xs: jax.tree.map(lambda *x: sum(x) / len(x), *xs)
            losses.append(float(np.mean([s[0] for s in shards])))
            grads = mean(*[s[1] for s in shards])
            batch_stats = mean(*[s[2] for s in shards])
            updates, opt_state = apply_tx(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats),
                "losses": losses}

    def exact_eval():
        # The real digits pipeline: 360 test examples, global eval batch 48 (6 per device): 7 full batches
        # and one of 24 real rows + 24 padding rows.
        config.update({"dataset": "digits", "image_size": 8, "eval_split": "test"})
        info = dataset_info(config)
        model = make_model(None)
        dp = DataParallel("shard_map")
        state = dp.replicate(init(model))
        evaluate = dp.compile(functools.partial(steps.eval_step, apply_fn=model.apply,
                                                axis_name=DATA_AXIS), donate_state=False)
        sums = [dp.unreplicate(evaluate(state, dp.shard_batch(b)))
                for b in create_eval_batches(config, process_index=0, process_count=1,
                                             local_batch_size=48)]
        totals = {k: sum(float(s[k]) for s in sums) for k in steps.EVAL_SUM_NAMES}
        # The same examples unbatched, through the same pipeline with a batch that holds them all.
        (everything,) = list(create_eval_batches(config, process_index=0, process_count=1,
                                                 local_batch_size=info.num_eval_examples))
        variables = jax.device_get(dp.unreplicate(state).variables)
        logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
            variables, everything["image"]))
        return {"sums": totals, "summary": steps.summarize_eval(totals), "logits": logits,
                "labels": everything["label"], "num_examples": info.num_eval_examples,
                "num_batches": len(sums)}

    devices = jax.devices()
    results = {
        "one_device": train("shard_map", devices[:1], DATA_AXIS),
        "shard_map": train("shard_map", devices, DATA_AXIS),
        "pmap": train("pmap", devices, DATA_AXIS),
        "per_device_bn": train("shard_map", devices, None),
        "per_shard_reference": per_shard_reference(),
        "exact_eval": exact_eval(),
    }
    with open(sys.argv[1], "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, results), f)
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "results.pkl"
    script = SCRIPT % {"num_steps": NUM_STEPS, "global_batch": GLOBAL_BATCH}
    env = dict(
        os.environ,
        # LLVM -O0: half the compile time of these tiny programs, same semantics.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES} --xla_backend_optimization_level=0",
        # The simulated devices are CPU devices; on a GPU host jax would otherwise pick the GPU(s).
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out), os.path.join(REPO, ".jax_cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(out, "rb") as f:
        return pickle.load(f)


def relative_errors(actual, expected) -> list[float]:
    """Per-leaf ||actual - expected|| / ||expected||."""
    return jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
            actual,
            expected,
        )
    )


def test_eight_devices_with_synced_bn_equal_one_device(results):
    eight, one = results["shard_map"], results["one_device"]
    assert max(relative_errors(eight["params"], one["params"])) < 1e-5
    assert max(relative_errors(eight["batch_stats"], one["batch_stats"])) < 1e-5
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    # Training did move the parameters: equality is not the trivial one.
    assert eight["losses"][0] != eight["losses"][-1]


def test_pmap_driver_equals_shard_map_driver(results):
    pmap, shard_map = results["pmap"], results["shard_map"]
    assert max(relative_errors(pmap["params"], shard_map["params"])) < 1e-5
    assert max(relative_errors(pmap["batch_stats"], shard_map["batch_stats"])) < 1e-5
    np.testing.assert_allclose(pmap["losses"], shard_map["losses"], rtol=1e-5)


def test_per_device_bn_differs_from_synced_bn(results):
    per_device, synced = results["per_device_bn"], results["shard_map"]
    # Two examples per device: per-device batch variances are far from the global batch's.
    assert max(relative_errors(per_device["batch_stats"], synced["batch_stats"])) > 1e-2
    assert max(relative_errors(per_device["params"], synced["params"])) > 1e-3


def test_per_device_bn_equals_hand_computed_per_shard_reference(results):
    per_device, reference = results["per_device_bn"], results["per_shard_reference"]
    assert max(relative_errors(per_device["params"], reference["params"])) < 1e-5
    assert max(relative_errors(per_device["batch_stats"], reference["batch_stats"])) < 1e-5
    np.testing.assert_allclose(per_device["losses"], reference["losses"], rtol=1e-5)


def test_exact_eval_counts_every_example_once(results):
    evaluation = results["exact_eval"]
    assert evaluation["num_examples"] == 360 and 360 % 48 != 0
    assert evaluation["num_batches"] == 8
    assert evaluation["sums"]["count"] == 360
    logits, labels = evaluation["logits"], evaluation["labels"]
    assert logits.shape == (360, 10)
    accuracy = np.mean(np.argmax(logits, -1) == labels)
    top5 = np.mean(
        [label in np.argsort(-row)[:5] for row, label in zip(logits, labels, strict=True)]
    )
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])
    summary = evaluation["summary"]
    assert summary["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert summary["top5_accuracy"] == pytest.approx(top5, abs=1e-9)
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)
