"""Exact resume through `train.py`: a run stopped by SIGTERM or kill -9 and restarted equals an uninterrupted one.

Each test runs `python train.py --config configs/default.py` in subprocesses on a tiny budget (ResNet-20 on the
bundled digits at 16x16, batch 32, 30 steps) and compares, step by step, the training losses logged after the
restart and the final parameters with those of one uninterrupted run: on CPU they are bitwise equal, because the
restored TrainState, the restored Grain iterator position and the deterministic step leave nothing to chance.
The SIGTERM case runs with both drivers: the default (jit + shard_map, one device) and `parallelism=pmap` on
two simulated CPU devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
import pytest

from resnet_jax.checkpoint import load_variables

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30
CHECKPOINT_EVERY = 5
FLAGS = (
    f"--config.num_train_steps={NUM_STEPS}",
    f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
    "--config.batch_size=32",
    "--config.log_every_steps=1",
    f"--config.eval_every_steps={NUM_STEPS}",
    "--config.warmup_epochs=0.1",
)


# The pmap driver on two simulated CPU devices (the global batch of 32 splits 16 + 16), at 8x8 (ResNet-20's
# stages on 8x8, 4x4, 2x2 maps) to keep its three runs short.
PMAP = {"flags": ("--config.parallelism=pmap", "--config.image_size=8"), "num_devices": 2}


def _command(workdir, flags: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config",
        "configs/default.py",
        "--workdir",
        str(workdir),
        *FLAGS,
        *flags,
    ]


def _env(num_devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The runs share compiled programs through the persistent cache, as the test process does.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(REPO_ROOT, ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PLATFORMS"] = "cpu"
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def _run(workdir, flags: tuple[str, ...] = (), num_devices: int | None = None):
    result = subprocess.run(
        _command(workdir, flags),
        cwd=REPO_ROOT,
        env=_env(num_devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _start(workdir, flags: tuple[str, ...] = (), num_devices: int | None = None):
    return subprocess.Popen(
        _command(workdir, flags),
        cwd=REPO_ROOT,
        env=_env(num_devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _logged_steps(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written (or cut by kill -9)
            break
    return records


def _wait_until_step(process: subprocess.Popen, workdir, step: int, timeout: float = 240) -> None:
    """Blocks until `metrics.jsonl` shows training step `step` (the run is then past it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "train_loss" in r for r in _logged_steps(workdir)):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended early:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def _train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _uninterrupted_run(workdir, **run_options):
    """Losses per step and final variables of one uninterrupted run."""
    result = _run(workdir, **run_options)
    num_devices = run_options.get("num_devices")
    if num_devices is not None:
        # The simulated devices took effect (one device would also take the batch, and pass vacuously).
        assert f"{num_devices} global devices" in result.stderr, result.stderr[-3000:]
    losses = _train_losses(_logged_steps(workdir))
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    variables, metadata = load_variables(str(workdir))
    assert metadata["step"] == NUM_STEPS
    return losses, variables


def _assert_resumed_run_matches(
    workdir, records_before_restart: int, uninterrupted: Future, **run_options
) -> int:
    """Restarts the run, checks it resumed from its latest checkpoint and ended like the uninterrupted one.

    `uninterrupted` is the future of `_uninterrupted_run`; `run_options` (flags, num_devices) must be those
    of the interrupted and the uninterrupted run. Returns the step it resumed from.
    """
    resumed_from = _checkpoint_steps(workdir)[-1]
    assert resumed_from < NUM_STEPS
    _run(workdir, **run_options)
    expected_losses, expected_variables = uninterrupted.result()
    after_restart = _train_losses(_logged_steps(workdir)[records_before_restart:])
    assert sorted(after_restart) == list(range(resumed_from + 1, NUM_STEPS + 1))
    for step, loss in after_restart.items():
        assert loss == expected_losses[step], (step, loss, expected_losses[step])
    variables, metadata = load_variables(str(workdir))
    assert metadata["step"] == NUM_STEPS
    for got, want in zip(
        jax.tree.leaves(variables), jax.tree.leaves(expected_variables), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    return resumed_from


def _sigterm_and_resume(workdir, uninterrupted, **run_options) -> None:
    process = _start(workdir, **run_options)
    _wait_until_step(process, workdir, 7)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = _checkpoint_steps(workdir)[-1]
    assert 7 <= stopped_at < NUM_STEPS
    # The preempted run saved the step it was on, not only the last multiple of checkpoint_every_steps.
    assert "preempted at step" in stderr and "rerun the same command to resume" in stderr
    records = _logged_steps(workdir)
    assert max(_train_losses(records)) == stopped_at
    resumed_from = _assert_resumed_run_matches(workdir, len(records), uninterrupted, **run_options)
    assert resumed_from == stopped_at


def _kill_9_and_resume(workdir, uninterrupted) -> None:
    process = _start(workdir)
    _wait_until_step(process, workdir, 2 * CHECKPOINT_EVERY + 2)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.communicate(timeout=60)
    records = _logged_steps(workdir)
    last_logged = max(_train_losses(records))
    resumed_from = _assert_resumed_run_matches(workdir, len(records), uninterrupted)
    # Steps after the last checkpoint were lost and trained again, with the same losses.
    assert resumed_from % CHECKPOINT_EVERY == 0 and resumed_from <= last_logged


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """{test: future of its scenario}: every run of the module, started at once, each in its own workdir.

    A train.py process of this size uses about one core, for half of its time less (startup, saving); run
    one after another, the module's eight processes leave one of CI's two cores idle. Here the two
    uninterrupted runs and the three interrupted ones start together (five threads, each driving its
    processes as the tests did one by one), and each scenario waits for its uninterrupted run only to
    compare with it. The interrupted runs are slower side by side, which changes no step they are stopped at
    by more than the timing of a signal already does: each scenario checks where its run stopped.
    """
    pool = ThreadPoolExecutor(max_workers=5)
    directory = tmp_path_factory.mktemp("resume")
    default = pool.submit(_uninterrupted_run, directory / "uninterrupted")
    pmap = pool.submit(_uninterrupted_run, directory / "uninterrupted_pmap", **PMAP)
    futures = {
        "sigterm": pool.submit(_sigterm_and_resume, directory / "sigterm", default),
        "pmap": pool.submit(_sigterm_and_resume, directory / "pmap", pmap, **PMAP),
        "kill_9": pool.submit(_kill_9_and_resume, directory / "kill_9", default),
    }
    yield futures
    pool.shutdown(wait=True)


def test_sigterm_saves_exits_cleanly_and_the_restart_matches_an_uninterrupted_run(scenarios):
    scenarios["sigterm"].result()


def test_pmap_on_two_devices_sigterm_restart_matches_an_uninterrupted_pmap_run(scenarios):
    scenarios["pmap"].result()


def test_kill_9_between_checkpoints_resumes_from_the_last_complete_one(scenarios):
    scenarios["kill_9"].result()
