"""The training loop and its CLI on the bundled digits: metrics file, non-finite loss, bad configs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, training

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_config(**overrides):
    """configs/default.py's job, shortened: 8x8 digits, a handful of steps."""
    config = training.base_config()
    config.update(
        {
            "model": "cifar_resnet20",
            "dataset": "digits",
            "image_size": 8,
            "batch_size": 32,
            "num_train_steps": 6,
            "learning_rate": 0.05,
            "warmup_epochs": 0.0,
            "label_smoothing": 0.1,
            "log_every_steps": 3,
            "eval_every_steps": 6,
            "checkpoint_every_steps": 2,
            **overrides,
        }
    )
    return config


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_writes_flat_metrics_and_exact_eval(tmp_path):
    final = training.train_and_evaluate(tiny_config(), str(tmp_path))
    records = read_metrics(tmp_path)
    train_records = [r for r in records if "train_loss" in r]
    eval_records = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in train_records] == [3, 6]
    for name in ("train_accuracy", "train_top5_accuracy", "train_grad_norm", "learning_rate"):
        assert name in train_records[-1]
    assert [r["step"] for r in eval_records] == [6]
    assert {"eval_loss", "eval_top5_accuracy"} <= set(eval_records[0])
    assert final["eval_accuracy"] == eval_records[0]["eval_accuracy"]
    # 360 test digits: an exact count makes every accuracy a multiple of 1/360.
    assert abs(final["eval_accuracy"] * 360 - round(final["eval_accuracy"] * 360)) < 1e-6
    assert np.isfinite(final["train_loss"]) and final["train_loss"] > 0
    steps_saved = checkpoint.TrainingCheckpointer(
        str(tmp_path), save_every_steps=2, handle_sigterm=False
    )
    try:
        assert steps_saved.latest_step() == 6
    finally:
        steps_saved.close()


class _PoisonedIterator:
    """A train iterator whose batch for step `bad_step` holds a NaN image; get/set_state pass through."""

    def __init__(self, iterator, bad_step: int):
        self._iterator, self._bad_step, self._step = iterator, bad_step, 0

    def __next__(self):
        batch = next(self._iterator)
        self._step += 1
        if self._step == self._bad_step:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = training._data()

    class PoisonedData:
        dataset_info = staticmethod(data.dataset_info)
        create_eval_batches = staticmethod(data.create_eval_batches)

        @staticmethod
        def create_train_iterator(*args, **kwargs):
            return _PoisonedIterator(data.create_train_iterator(*args, **kwargs), bad_step=5)

    monkeypatch.setattr(training, "_data", lambda: PoisonedData)
    config = tiny_config(num_train_steps=8, log_every_steps=100, eval_every_steps=100)
    with pytest.raises(training.NonFiniteLossError, match="at step 5"):
        training.train_and_evaluate(config, str(tmp_path))
    manager = checkpoint.TrainingCheckpointer(
        str(tmp_path), save_every_steps=2, handle_sigterm=False
    )
    try:
        assert manager.all_steps() == [2, 4]  # step 6's checkpoint was never written
    finally:
        manager.close()
    variables, metadata = checkpoint.load_variables(str(tmp_path))
    assert metadata["step"] == 4
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


def test_unknown_config_key_is_an_error():
    config = tiny_config()
    config.learning_rat = 0.1
    with pytest.raises(training.ConfigError, match="learning_rat"):
        training.validate_config(config)


def run_cli(args: list[str], num_devices: int = 1) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return subprocess.run(
        [sys.executable, "train.py", "--config=configs/default.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
