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
import portpicker
import pytest
from flax import struct

from resnet_jax.checkpoint import load_variables, save_variables
from resnet_jax.checkpoint.checkpointer import IncompatibleCheckpointError, TrainingCheckpointer
from resnet_jax.checkpoint.config_changes import config_changes
from resnet_jax.checkpoint.preemption import preemption_message
from resnet_jax.checkpoint.resume import (
    MISMATCH_REPORT,
    NoUsableCheckpointError,
    restore_newest_usable,
)

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


def test_load_variables_skips_a_damaged_newest_checkpoint_and_moves_nothing(tmp_path, caplog):
    states = _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING):
        variables, metadata = load_variables(str(tmp_path))
    assert metadata["step"] == 1
    chex.assert_trees_all_equal(variables["params"], jax.device_get(states[1].params))
    assert "checkpoint 2 in " in caplog.text and "trying the previous one" in caplog.text
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # a reader moves nothing
    (tmp_path / "checkpoints" / "1" / "state" / "_METADATA").unlink()
    with pytest.raises(
        FileNotFoundError, match="no readable checkpoint in .*tried step 2 .*; step 1"
    ):
        load_variables(str(tmp_path))


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
        # Not damage: resuming refuses it and moves nothing (every step has the other count).
        with pytest.raises(IncompatibleCheckpointError, match="written by 2 process"):
            restore_newest_usable(checkpointer, make_state(1), iter(make_loader()))
        assert checkpointer.all_steps() == [1]


# -- resuming from the newest usable checkpoint ----------------------------------------------------------------


def _save_steps(workdir, steps, config=None) -> dict[int, TinyTrainState]:
    """Checkpoints `steps` of an advancing state (with an iterator position); returns the saved states."""
    states, state, iterator = {}, make_state(0), iter(make_loader())
    with TrainingCheckpointer(
        workdir, save_every_steps=1, max_to_keep=10, config=config
    ) as checkpointer:
        for step in steps:
            state = advance(state)
            next(iterator)
            assert checkpointer.save(step, state, iterator)
            checkpointer.wait_until_finished()
            states[step] = state
    return states


def test_resume_moves_damaged_checkpoints_aside_and_restores_the_newest_good_one(tmp_path, caplog):
    states = _save_steps(tmp_path, [1, 2, 3, 4])
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "4" / "state" / "_METADATA").unlink()
    (checkpoints / "3" / "data" / "process_0-of-1.json").unlink()
    (checkpoints / "2" / "data" / "process_0-of-1.json").write_text("{not json")
    with (
        caplog.at_level(logging.WARNING),
        TrainingCheckpointer(tmp_path, save_every_steps=1, max_to_keep=10) as checkpointer,
    ):
        step, restored = restore_newest_usable(checkpointer, make_state(5), iter(make_loader()))
        assert checkpointer.all_steps() == [1]
    assert step == 1
    assert_states_equal(restored, states[1])
    # Nothing was deleted: each damaged checkpoint is under unusable/, named with its reason.
    assert sorted(os.listdir(checkpoints / "unusable")) == [
        "2.bad-data-file",
        "3.bad-data-file",
        "4.missing-state-metadata",
    ]
    warnings = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    assert "checkpoint 4 is unusable: state/_METADATA is missing" in warnings[0]
    assert "trying step 3" in warnings[0]


def test_resume_skips_a_truncated_state_file_and_non_finite_values(tmp_path):
    states = _save_steps(tmp_path, [1, 2, 3])
    checkpoints = tmp_path / "checkpoints"
    for path in (checkpoints / "3" / "state").rglob("d/*"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def check(state):
        return "non-finite values" if int(state.step) == 2 else None  # as if step 2 held an inf

    with TrainingCheckpointer(tmp_path, save_every_steps=1, max_to_keep=10) as checkpointer:
        step, restored = restore_newest_usable(checkpointer, make_state(5), check=check)
    assert step == 1
    assert_states_equal(restored, states[1])
    moved = sorted(os.listdir(checkpoints / "unusable"))
    assert moved[0] == "2.non-finite" and moved[1] in ("3.bad-state-data", "3.restore-failed")


def test_no_usable_checkpoint_is_one_error_listing_each_one_tried(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        with pytest.raises(NoUsableCheckpointError) as error:
            restore_newest_usable(checkpointer, make_state(5))
    message = str(error.value)
    assert "\n" not in message
    assert "tried step 2: state/_METADATA" in message and "step 1: state/_METADATA" in message
    assert sorted(os.listdir(tmp_path / "checkpoints" / "unusable")) == [
        "1.missing-state-metadata",
        "2.missing-state-metadata",
    ]


def test_a_refused_config_change_is_one_line_and_moves_nothing(tmp_path):
    saved = {"model": "cifar_resnet20", "learning_rate": 0.1, "optimizer": "sgd", "ema_decay": 0.0}
    _save_steps(tmp_path, [1], config=saved)
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        with pytest.raises(IncompatibleCheckpointError) as error:
            restore_newest_usable(
                checkpointer, make_state(5), config={**saved, "model": "resnet18"}
            )
        assert checkpointer.all_steps() == [1]
    message = str(error.value)
    assert "\n" not in message
    assert "config.model changed 'cifar_resnet20' -> 'resnet18'" in message


def test_allowed_config_changes_are_logged_in_one_line(tmp_path, caplog):
    saved = {"model": "cifar_resnet20", "learning_rate": 0.1, "num_epochs": 10.0, "ema_decay": 0.5}
    states = _save_steps(tmp_path, [1], config=saved)
    new = {**saved, "learning_rate": 0.05, "num_epochs": 20.0, "ema_decay": 0.9}
    with (
        caplog.at_level(logging.WARNING),
        TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer,
    ):
        step, restored = restore_newest_usable(checkpointer, make_state(5), config=new)
    assert step == 1
    assert_states_equal(restored, states[1])
    assert (
        "resuming from step 1 with config changes: learning_rate 0.1 -> 0.05, num_epochs 10.0 -> "
        "20.0, ema_decay 0.5 -> 0.9" in caplog.text
    )


def test_config_changes_refused_are_those_that_break_the_state():
    base = {
        "model": "resnet18",
        "optimizer": "sgd",
        "ema_decay": 0.0,
        "grad_clip_norm": 0.0,
        "dtype": "float32",
    }
    assert config_changes(base, {**base, "model": "resnet34"}).refused() == ["model"]
    assert config_changes(base, {**base, "optimizer": "adamw"}).refused() == ["optimizer"]
    assert config_changes(base, {**base, "batch_size": 64}).refused() == ["batch_size"]
    assert config_changes(base, {**base, "ema_decay": 0.9}).refused() == ["ema_decay"]
    assert config_changes(base, {**base, "grad_clip_norm": 1.0}).refused() == ["grad_clip_norm"]
    assert config_changes(base, {**base, "dtype": "bfloat16"}).refused() == []  # state stays f32
    clipped = {**base, "grad_clip_norm": 1.0}
    assert config_changes(clipped, {**clipped, "grad_clip_norm": 2.0}).refused() == []


def test_a_state_that_does_not_fit_starts_with_a_summary_and_writes_the_full_list(tmp_path):
    _save_steps(tmp_path, [1])
    target = make_state(5)
    # 25 extra layers: more paths than a message lists.
    target = target.replace(
        params={**target.params, **{f"extra{i}": {"kernel": jnp.zeros(2)} for i in range(25)}}
    )
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        with pytest.raises(IncompatibleCheckpointError) as error:
            restore_newest_usable(checkpointer, target)
        assert checkpointer.all_steps() == [1]  # intact: not moved aside
    lines = str(error.value).splitlines()
    assert lines[0].startswith("cannot resume from checkpoint 1 in ")
    assert lines[0].endswith("does not fit this run's: 25 missing, 0 unexpected, 0 mis-shaped")
    assert lines[1].startswith("hint: the code that builds the model or the optimizer changed")
    assert len(lines) < 30 and "... 5 more" in str(error.value)
    report = tmp_path / MISMATCH_REPORT
    assert lines[-1] == f"the full lists: {report}"
    assert report.read_text().count("params/extra") == 25


# Two processes (2 CPU devices each) save steps 1-3 with their Grain iterators; process 1's iterator file of
# step 3 is then deleted. Only process 1 sees the damage, yet both must move step 3 aside and resume step 2.
_TWO_PROCESS_RESUME = textwrap.dedent(
    """
    import os, sys
    import jax
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    import grain, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec
    from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer
    from resnet_jax.checkpoint.resume import restore_newest_usable

    replicated = NamedSharding(jax.make_mesh((4,), ("data",)), PartitionSpec())

    def state(value):
        return {"step": jax.device_put(jnp.asarray(value, jnp.int32), replicated),
                "w": jax.device_put(jnp.full((4,), float(value)), replicated)}

    def loader():
        return iter(grain.DataLoader(
            data_source=np.arange(40), operations=[grain.transforms.Batch(batch_size=2)],
            sampler=grain.samplers.IndexSampler(num_records=40, shard_options=grain.sharding.ShardByJaxProcess(),
                                                shuffle=False, num_epochs=1),
            worker_count=0))

    iterator = loader()
    with TrainingCheckpointer(workdir, save_every_steps=1, max_to_keep=5, keep_best=0) as checkpointer:
        for step in (1, 2, 3):
            next(iterator)
            checkpointer.save(step, state(step), iterator)
            checkpointer.wait_until_finished()
    multihost_utils.sync_global_devices("saved")
    if process_id == 1:
        os.remove(os.path.join(workdir, "checkpoints", "3", "data", "process_1-of-2.json"))
    multihost_utils.sync_global_devices("damaged")
    fresh = loader()
    with TrainingCheckpointer(workdir, save_every_steps=1, max_to_keep=5, keep_best=0) as checkpointer:
        step, restored = restore_newest_usable(checkpointer, state(0), fresh)
        print(f"resumed {step} w {float(restored['w'].addressable_data(0)[0])} next {next(fresh).tolist()}")
        print(f"steps {checkpointer.all_steps()}")
    """
)


def test_two_processes_agree_to_move_aside_a_checkpoint_only_one_of_them_cannot_read(tmp_path):
    port = str(portpicker.pick_unused_port())
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_RESUME, str(i), port, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert "resumed 2 w 2.0" in stdout and "steps [1, 2]" in stdout, stdout
        assert stderr.count("checkpoint 3 is unusable") == 1
    assert "process(es) [1] could not read" in outputs[0][1]
    assert "data iterator file data/process_1-of-2.json is missing" in outputs[1][1]
    # Each process's half of the records (0-19, 20-39), two batches of 2 consumed before step 2's save.
    assert "next [4, 5]" in outputs[0][0] and "next [24, 25]" in outputs[1][0]
    # Named by process 0, which renames it: its reason is the other process's.
    assert os.listdir(tmp_path / "checkpoints" / "unusable") == ["3.unreadable-on-another-process"]


def test_arrays_of_another_shape_are_an_incompatible_state_not_damage(tmp_path):
    _save_steps(tmp_path, [1])
    target = make_state(5)
    target = target.replace(
        params={**target.params, "fc": {"kernel": jnp.zeros((4, 7)), "bias": jnp.zeros(7)}}
    )
    with TrainingCheckpointer(tmp_path, save_every_steps=1) as checkpointer:
        with pytest.raises(IncompatibleCheckpointError) as error:
            restore_newest_usable(checkpointer, target)
        assert checkpointer.all_steps() == [1]  # intact: not moved aside
    lines = str(error.value).splitlines()
    assert lines[0].endswith("0 missing, 0 unexpected, 2 mis-shaped"), lines[0]
    assert "params/fc/kernel: (4, 10), expected (4, 7)" in str(error.value)
