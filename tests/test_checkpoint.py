"""TrainingCheckpointer and load_variables: exact round trips, the preservation policy, interrupted saves.

The state here is a small TrainState-like `flax.struct` pytree (step, params, batch_stats, optax state, a typed
PRNG key) and the data a small Grain DataLoader over a numpy array, so these tests need nothing of the trainer.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from resnet_jax.checkpoint import load_variables, save_variables
from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer
from resnet_jax.checkpoint.preemption import preemption_message

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@struct.dataclass
class TinyTrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    rng: jax.Array


TX = optax.sgd(0.1, momentum=0.9)


def make_state(seed: int, step: int = 0) -> TinyTrainState:
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "stem_conv": {"kernel": jax.random.normal(keys[0], (3, 3, 3, 4))},
        "fc": {"kernel": jax.random.normal(keys[1], (4, 10)), "bias": jnp.zeros(10)},
    }
    batch_stats = {"stem_bn": {"mean": jnp.full(4, float(seed)), "var": jnp.ones(4)}}
    return TinyTrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=TX.init(params),
        rng=keys[2],
    )


def advance(state: TinyTrainState) -> TinyTrainState:
    """One fake optimizer step, so opt_state holds non-trivial momentum."""
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        rng=jax.random.fold_in(state.rng, 1),
    )


def make_loader(seed: int = 0) -> grain.DataLoader:
    source = np.arange(37, dtype=np.int64)  # 37: batches cross the epoch boundary unevenly
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.NoSharding(),
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size=4, drop_remainder=True)],
        worker_count=0,
    )


def assert_states_equal(a: TinyTrainState, b: TinyTrainState) -> None:
    chex.assert_trees_all_equal(
        a.replace(rng=jax.random.key_data(a.rng)), b.replace(rng=jax.random.key_data(b.rng))
    )


def test_round_trip_restores_state_and_the_exact_next_batch(tmp_path):
    state = advance(advance(make_state(0)))
    iterator = iter(make_loader())
    for _ in range(5):
        next(iterator)
    config = {"model": "resnet18", "num_classes": 10, "image_size": (32, 32)}
    with TrainingCheckpointer(tmp_path, save_every_steps=5, config=config) as checkpointer:
        assert checkpointer.save(5, state, iterator)
        expected_batches = [next(iterator) for _ in range(12)]  # crosses the end of an epoch

    # Different values, same structure: the restore must overwrite all of them.
    target = make_state(1)
    fresh_iterator = iter(make_loader())
    with TrainingCheckpointer(tmp_path, save_every_steps=5) as checkpointer:
        assert checkpointer.latest_step() == 5
        restored = checkpointer.restore_latest(target, fresh_iterator)
        assert checkpointer.saved_config() == {**config, "image_size": [32, 32]}
    assert_states_equal(restored, state)
    assert restored.params["fc"]["kernel"].sharding == target.params["fc"]["kernel"].sharding
    for expected in expected_batches:
        np.testing.assert_array_equal(next(fresh_iterator), expected)


def test_restore_latest_on_an_empty_workdir_is_none(tmp_path):
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        assert checkpointer.restore_latest(make_state(0)) is None


def test_save_happens_only_when_due_and_never_twice(tmp_path):
    state = make_state(0)
    with TrainingCheckpointer(tmp_path, save_every_steps=10) as checkpointer:
        assert not checkpointer.save(3, state)
        assert checkpointer.save(10, state)
        checkpointer.wait_until_finished()
        assert not checkpointer.save(10, state, force=True)  # the final save after a due save
        assert checkpointer.save(13, state, force=True)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [10, 13]


def test_preservation_keeps_latest_n_plus_best_by_eval_accuracy(tmp_path):
    state = make_state(0)
    accuracies = {1: 0.50, 2: 0.90, 3: 0.60, 4: 0.70, 5: 0.65, 6: 0.55}
    with TrainingCheckpointer(
        tmp_path, save_every_steps=1, max_to_keep=2, keep_best=1
    ) as checkpointer:
        for step, accuracy in accuracies.items():
            assert checkpointer.save(
                step, state, metrics={"eval_accuracy": accuracy, "eval_loss": 1.0}
            )
            checkpointer.wait_until_finished()
        # A checkpoint without eval metrics counts for the latest N only.
        assert checkpointer.save(7, state)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [2, 6, 7]
        assert checkpointer.best_step() == 2
        assert checkpointer.metrics(2)["eval_accuracy"] == pytest.approx(0.90)
    # The ranking survives a restart: a new run's saves still keep step 2 as the best.
    with TrainingCheckpointer(
        tmp_path, save_every_steps=1, max_to_keep=2, keep_best=1
    ) as checkpointer:
        assert checkpointer.save(8, state)
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [2, 7, 8]
        assert checkpointer.best_step() == 2


def test_load_variables_reads_a_training_workdir_without_a_target(tmp_path):
    state = advance(make_state(3))
    config = {"model": "cifar_resnet20", "num_classes": 10}
    with TrainingCheckpointer(tmp_path, save_every_steps=1, config=config) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(2, advance(state))
    for path in (tmp_path, tmp_path / "checkpoints"):
        variables, metadata = load_variables(str(path), step=1)
        chex.assert_trees_all_equal(variables["params"], jax.device_get(state.params))
        chex.assert_trees_all_equal(variables["batch_stats"], jax.device_get(state.batch_stats))
        assert isinstance(variables["params"]["fc"]["kernel"], np.ndarray)
        assert (metadata["model"], metadata["num_classes"], metadata["step"]) == (
            "cifar_resnet20",
            10,
            1,
        )
    _, latest = load_variables(str(tmp_path))
    assert latest["step"] == 2
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 7"):
        load_variables(str(tmp_path), step=7)


def test_reading_variables_from_a_training_workdir_never_imports_grain(tmp_path):
    with TrainingCheckpointer(tmp_path, save_every_steps=1, config={"model": "resnet18"}) as saver:
        saver.save(1, advance(make_state(0)), iter(make_loader()))
    script = textwrap.dedent(
        f"""
        import sys
        from resnet_jax.checkpoint import load_variables
        variables, metadata = load_variables({str(tmp_path)!r})
        assert metadata["model"] == "resnet18" and "fc" in variables["params"], metadata
        grain_modules = [m for m in sys.modules if m == "grain" or m.startswith("grain.")]
        assert not grain_modules, grain_modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "could not be restored" not in result.stderr  # Orbax's warning for items it cannot read


def test_load_variables_still_reads_variables_checkpoints(tmp_path):
    variables = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}}, "batch_stats": {}}
    save_variables(str(tmp_path / "converted"), variables, {"model": "resnet18", "num_classes": 3})
    loaded, metadata = load_variables(str(tmp_path / "converted"))
    np.testing.assert_array_equal(
        loaded["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"]
    )
    assert metadata == {"model": "resnet18", "num_classes": 3}
    with pytest.raises(FileNotFoundError, match="neither a resnet_jax variables checkpoint"):
        load_variables(str(tmp_path / "nothing_here"))


def test_sigterm_sets_the_preemption_flag_in_a_single_process(tmp_path, caplog):
    with TrainingCheckpointer(tmp_path, save_every_steps=100) as checkpointer:
        assert not checkpointer.reached_preemption(1)
        with caplog.at_level(logging.WARNING):
            os.kill(os.getpid(), signal.SIGTERM)  # would kill pytest without the handler
            # The handler only sets a flag (logging inside a signal handler can fail as a reentrant
            # call); the loop's next check logs it, once.
            assert "SIGTERM" not in caplog.text
            assert checkpointer.reached_preemption(2)
            assert checkpointer.reached_preemption(2)
        assert caplog.text.count("SIGTERM received") == 1
        # A preempted run saves at its current step even when it is not a multiple of save_every_steps.
        assert checkpointer.save(2, make_state(0))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # close() put the default back
    assert "preempted at step 2; rerun the same command to resume from" in preemption_message(
        2, str(tmp_path)
    )


# A process that saves step 1, starts an async save of step 2 with ~100 MB of state, and kills itself (-9) as
# soon as Orbax's temporary directory for step 2 exists: the save is cut off mid-write.
_KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax.numpy as jnp
    from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer
    workdir = sys.argv[1]
    checkpointer = TrainingCheckpointer(workdir, save_every_steps=1)
    checkpointer.save(1, {"step": jnp.asarray(1), "params": {"w": jnp.full((8,), 1.0)}})
    checkpointer.wait_until_finished()
    big = {"step": jnp.asarray(2), "params": {"w": jnp.full((8,), 2.0)},
           "extra": [jnp.full((1 << 22,), float(i)) for i in range(6)]}
    checkpointer.save(2, big)
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 60
    while time.time() < deadline:
        if any("tmp" in name for name in os.listdir(directory)):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)
    sys.exit("no temporary directory appeared")
    """
)


def test_kill_during_async_save_restarts_from_the_previous_complete_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SAVE, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    directory = tmp_path / "checkpoints"
    leftovers = [name for name in os.listdir(directory) if "tmp" in name]
    assert leftovers, os.listdir(directory)  # the half-written step 2 is on disk...

    target = {"step": jnp.asarray(0), "params": {"w": jnp.zeros((8,))}}
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        assert checkpointer.all_steps() == [1]  # ...but is not a checkpoint
        restored = checkpointer.restore_latest(target)
        np.testing.assert_array_equal(restored["params"]["w"], np.full((8,), 1.0))
        checkpointer.save(2, restored)  # the resumed run writes step 2 again, completely
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [1, 2]
    assert sorted(os.listdir(directory)) == ["1", "2"]  # the temporary directory was cleaned up


def test_resuming_with_another_process_count_is_a_clear_error(tmp_path):
    iterator = iter(make_loader())
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        checkpointer.save(1, make_state(0), iterator)
    data_dir = tmp_path / "checkpoints" / "1" / "data"
    (data_dir / "process_0-of-1.json").rename(
        data_dir / "process_0-of-2.json"
    )  # as 2 processes write
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        with pytest.raises(ValueError, match="written by 2 process"):
            checkpointer.restore_latest(make_state(1), iter(make_loader()))
