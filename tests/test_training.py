"""The training loop and its CLI on the bundled digits: metrics file, non-finite loss, bad configs."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint
from resnet_jax import config as config_lib
from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


TINY = {
    # configs/default.py's job, shortened: 8x8 digits, a handful of steps.
    "image_size": 8,
    "batch_size": 32,
    "num_train_steps": 6,
    "warmup_epochs": 0.0,
    "log_every_steps": 3,
    "eval_every_steps": 6,
    "checkpoint_every_steps": 2,
}


def subprocess_env(num_devices: int = 1) -> dict:
    return dict(
        os.environ,
        # LLVM -O0: half the compile time of these tiny programs, same semantics.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",  # the simulated devices are CPU devices, also on a GPU host
        # The suite's persistent compilation cache (conftest.py), as the other train.py tests use it.
        JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def run_cli(args: list[str], num_devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", "--config=configs/default.py", *args],
        cwd=REPO,
        env=subprocess_env(num_devices),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def collect(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """The finished process as `subprocess.run` returns it (killed after 300 s)."""
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(workdir) -> list[int]:
    manager = TrainingCheckpointer(str(workdir), save_every_steps=1, handle_sigterm=False)
    try:
        return manager.all_steps()
    finally:
        manager.close()


# The run the two tests below read: TINY with the peak rate given per 256 examples, a constant schedule and
# a global batch of 64 given on the command line. One train.py process serves both: what the first test checks
# (flat metrics, exact eval and test counts, checkpoints) holds for any learning rate, and the second needs a
# run whose batch size was overridden, with at least two logged steps.
TINY_SCALED_LR = dict(TINY, learning_rate_per_256=0.4, lr_schedule="constant", batch_size=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{"tiny": ..., "non_finite": ...}: (workdir, CompletedProcess) of train.py on TINY_SCALED_LR and of
    NON_FINITE_SCRIPT. Started together: each process uses about one of the two cores CI has, so side by
    side they take little more than one alone; each reads and writes only its own workdir."""
    tiny, non_finite = tmp_path_factory.mktemp("tiny_run"), tmp_path_factory.mktemp("non_finite")
    tiny_args = [f"--workdir={tiny}"] + [f"--config.{k}={v}" for k, v in TINY_SCALED_LR.items()]
    script = NON_FINITE_SCRIPT % {"config": repr(TINY)}
    processes = {
        "tiny": (
            tiny,
            start(
                [sys.executable, "train.py", "--config=configs/default.py", *tiny_args],
                subprocess_env(),
            ),
        ),
        "non_finite": (
            non_finite,
            start([sys.executable, "-c", script, str(non_finite)], subprocess_env()),
        ),
    }
    return {name: (workdir, collect(process)) for name, (workdir, process) in processes.items()}


@pytest.fixture(scope="module")
def tiny_run(runs):
    """train.py on TINY_SCALED_LR: (its workdir, its CompletedProcess)."""
    workdir, result = runs["tiny"]
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, result


def test_train_py_writes_flat_metrics_exact_eval_and_checkpoints(tiny_run):
    tmp_path, _ = tiny_run
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "train_loss" in r]
    eval_records = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in train_records] == [3, 6]
    for name in ("train_accuracy", "train_top5_accuracy", "train_grad_norm", "learning_rate"):
        assert np.isfinite(train_records[-1][name])
    assert train_records[-1]["train_loss"] > 0
    assert [r["step"] for r in eval_records] == [6]
    evaluation = eval_records[0]
    assert {"eval_loss", "eval_top5_accuracy"} <= set(evaluation)
    # The 144 validation digits counted exactly (eval_*); the 360 test digits once, at the end (test_*).
    for name in ("eval_accuracy", "eval_top5_accuracy"):
        assert abs(evaluation[name] * 144 - round(evaluation[name] * 144)) < 1e-6
    (test,) = [r for r in records if "test_accuracy" in r]
    assert test["step"] == 6
    assert abs(test["test_accuracy"] * 360 - round(test["test_accuracy"] * 360)) < 1e-6
    assert checkpoint_steps(tmp_path)[-1] == 6


NON_FINITE_SCRIPT = """
import sys
import numpy as np
from resnet_jax import config as config_lib
from resnet_jax import data, training

real_create_train_iterator = data.create_train_iterator


class PoisonedIterator:
    # The batch of step 5 holds NaN images.
    def __init__(self, iterator):
        self._iterator, self._step = iterator, 0

    def __next__(self):
        batch = next(self._iterator)
        self._step += 1
        if self._step == 5:
            # Float images (uint8 holds no NaN): the step takes them as already normalized.
            batch = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
        return batch


# The trainer looks the function up on the data package at call time, so this reaches the real loop.
data.create_train_iterator = lambda *a, **k: PoisonedIterator(real_create_train_iterator(*a, **k))
config = config_lib.base_config()
config.update(dict(%(config)s, num_train_steps=8, log_every_steps=100, eval_every_steps=100))
try:
    training.train_and_evaluate(config, sys.argv[1])
except training.NonFiniteLossError as e:
    print(e)
    sys.exit(3)
"""


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(runs):
    tmp_path, result = runs["non_finite"]
    assert result.returncode == 3, result.stderr[-5000:]
    assert "non-finite training loss or gradient at step 5" in result.stdout
    assert checkpoint_steps(tmp_path) == [2, 4]  # step 6's checkpoint was never written
    variables, metadata = checkpoint.load_variables(str(tmp_path))
    assert metadata["step"] == 4
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


def test_unknown_config_key_is_an_error():
    config = config_lib.base_config()
    config.learning_rat = 0.1
    with pytest.raises(config_lib.ConfigError, match="learning_rat"):
        config_lib.validate_config(config)


def test_cli_rejects_an_unknown_config_flag(tmp_path):
    result = run_cli([f"--workdir={tmp_path}", "--config.learning_rat=0.1"])
    assert result.returncode != 0
    assert "learning_rat" in result.stderr


def test_cli_rejects_a_batch_size_that_does_not_split_over_the_devices(tmp_path):
    result = run_cli([f"--workdir={tmp_path}", "--config.batch_size=12"], num_devices=8)
    assert result.returncode != 0
    assert "batch size 12 must be a positive multiple of the device count (8 devices" in (
        result.stderr
    )


def test_learning_rate_per_256_follows_the_batch_size_given_on_the_command_line(tiny_run):
    """The linear scaling rule is applied at run time: overriding batch_size rescales the peak rate."""
    tmp_path, result = tiny_run
    assert "--config.batch_size=64" in result.args  # overridden on the command line
    rates = [r["learning_rate"] for r in read_metrics(tmp_path) if "learning_rate" in r]
    assert rates == pytest.approx([0.4 * 64 / 256] * 2)  # steps 3 and 6
    assert "peak learning rate 0.1 = learning_rate_per_256 0.4 x global batch" in result.stderr


def test_a_cpu_run_keeps_the_memory_xla_frees(tiny_run):
    """train.py sets malloc up as resnet_jax.host_memory says before the run starts (CPU-only JAX here)."""
    _, result = tiny_run
    assert "host memory: malloc keeps freed memory" in result.stderr
    assert "JAX's backend has started" not in result.stderr  # in time to set the dispatch mode


@pytest.mark.parametrize("failing_part", ["compile_steps", "train_batches_from"])
def test_an_error_during_setup_closes_the_checkpointer_and_restores_the_sigterm_handler(
    tmp_path, monkeypatch, failing_part
):
    from resnet_jax import training

    closed = []
    real_close = TrainingCheckpointer.close
    monkeypatch.setattr(
        TrainingCheckpointer, "close", lambda self: closed.append(1) or real_close(self)
    )

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure in {failing_part}")

    monkeypatch.setattr(training, failing_part, fail)
    handler_before = signal.getsignal(signal.SIGTERM)
    config = config_lib.base_config()
    config.update(TINY)
    with pytest.raises(RuntimeError, match="injected failure"):
        training.train_and_evaluate(config, str(tmp_path))
    assert closed == [1]
    assert signal.getsignal(signal.SIGTERM) is handler_before
