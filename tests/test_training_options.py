"""Training options end to end through `train.py`: what each option promises holds in the run it changes.

Each test runs `python train.py --config configs/default.py` in a subprocess on the bundled digits (ResNet-20 at
8x8 or 16x16, batch 32, a few steps) and reads what the run left in its workdir: `metrics.jsonl` and the Orbax
checkpoints under `checkpoints/<step>/`.

- EMA (`ema_decay`): the EMA evaluation is logged next to the live one and differs from it, and the EMA of
  params and BatchNorm statistics saved at every step follows its recurrence from the live values.
- bf16 compute (`dtype=bfloat16`): the run trains (finite, falling loss) and saves float32 variables.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from background import finish
from etils import epath
from flax import traverse_util

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def start_train_py(workdir, overrides: dict) -> subprocess.Popen:
    env = dict(
        os.environ,
        # One CPU device (LLVM -O0: half the compile time of these tiny programs, same semantics).
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    command = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_train_state(workdir, step: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The `names` sub-trees of the TrainState saved at `step`, flat ("ema_params/fc/kernel"), as numpy.

    Read with Orbax's PyTree handler on the checkpoint's `state` item alone, as
    `resnet_jax.checkpoint.load_variables` reads params and batch_stats (which it is limited to).
    """
    state_dir = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(state_dir).tree
        wanted = {name: tree[name] for name in names}
        restored = handler.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=traverse_util.unflatten_dict(
                    {
                        key: np.zeros(m.shape, m.dtype)
                        for key, m in traverse_util.flatten_dict(wanted).items()
                    }
                ),
                restore_args=traverse_util.unflatten_dict(
                    {
                        key: ocp.RestoreArgs(restore_type=np.ndarray)
                        for key in traverse_util.flatten_dict(wanted)
                    }
                ),
                partial_restore=True,
            ),
        )
    finally:
        handler.close()
    return traverse_util.flatten_dict(restored, sep="/")


EMA_DECAY = 0.9
EMA_STEPS = 6
EMA_RUN = {
    "image_size": 8,
    "batch_size": 32,
    "num_train_steps": EMA_STEPS,
    "warmup_epochs": 0.0,
    "learning_rate": 0.1,
    "ema_decay": EMA_DECAY,
    "log_every_steps": EMA_STEPS,
    "eval_every_steps": EMA_STEPS,
    "checkpoint_every_steps": 1,
    "checkpoints_to_keep": EMA_STEPS,
}
BF16_STEPS, BF16_LOG_EVERY = 20, 5
BF16_RUN = {
    "dtype": "bfloat16",
    "image_size": 8,
    "batch_size": 32,
    "num_train_steps": BF16_STEPS,
    "warmup_epochs": 0.0,
    "learning_rate": 0.1,
    "log_every_steps": BF16_LOG_EVERY,
    "eval_every_steps": BF16_STEPS,
    "checkpoint_every_steps": BF16_STEPS,
}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict:
    """{"ema": workdir, "bf16": workdir} of the two runs, started together: each uses about one of the
    two cores CI has, so side by side they take little more than one alone. The runs are independent
    processes, each reads only its own workdir."""
    runs = {"ema": EMA_RUN, "bf16": BF16_RUN}
    dirs = {name: tmp_path_factory.mktemp(name) for name in runs}
    processes = [start_train_py(dirs[name], overrides) for name, overrides in runs.items()]
    for process in processes:
        finish(process, timeout=300)
    return dirs


def test_ema_is_evaluated_and_follows_its_recurrence_from_the_live_variables(workdirs):
    tmp_path = workdirs["ema"]
    (evaluation,) = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert evaluation["step"] == EMA_STEPS
    for name in ("loss", "accuracy"):
        live, ema = evaluation[f"eval_{name}"], evaluation[f"eval_ema_{name}"]
        assert math.isfinite(live) and math.isfinite(ema)
    # After 6 steps the EMA still weighs the initial weights by 0.9^6 = 0.53: another model, another loss.
    assert evaluation["eval_ema_loss"] != evaluation["eval_loss"]

    names = ("params", "batch_stats", "ema_params", "ema_batch_stats")
    states = {step: read_train_state(tmp_path, step, names) for step in range(1, EMA_STEPS + 1)}
    # ema_t = decay * ema_{t-1} + (1 - decay) * live_t, for params and BN statistics alike, at every step
    # (float32 on the device vs float64 here: rounding only, hence the tolerance).
    checked = 0
    for step in range(2, EMA_STEPS + 1):
        previous, current = states[step - 1], states[step]
        for key, ema in current.items():
            if not key.startswith("ema_"):
                continue
            live = current[key.removeprefix("ema_")]
            expected = EMA_DECAY * previous[key].astype(np.float64) + (1 - EMA_DECAY) * live
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(ema, expected, rtol=0, atol=1e-6 * scale, err_msg=key)
            checked += 1
        # The EMA is a separate tree: it lags the live weights that moved this step.
        assert not np.array_equal(current["ema_params/fc/kernel"], current["params/fc/kernel"])
    assert checked == (EMA_STEPS - 1) * sum(key.startswith("ema_") for key in states[1])
    assert any(key.startswith("ema_batch_stats/") for key in states[1])


def test_bfloat16_run_trains_and_saves_float32_variables(workdirs):
    tmp_path, num_steps, log_every = workdirs["bf16"], BF16_STEPS, BF16_LOG_EVERY
    records = read_metrics(tmp_path)
    losses = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    assert sorted(losses) == list(range(log_every, num_steps + 1, log_every))
    assert all(math.isfinite(loss) for loss in losses.values())
    # Means over 5 steps each. Measured here: 3.7 over steps 1-5, 1.4 over steps 16-20; a run that does not
    # learn (a dtype mix-up that zeroes gradients, bf16 overflow) stays near or above the first.
    assert losses[num_steps] < 0.6 * losses[log_every], losses
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert math.isfinite(evaluation["eval_loss"])

    state = read_train_state(tmp_path, num_steps, ("params", "batch_stats"))
    assert {key.split("/")[0] for key in state} == {"params", "batch_stats"}
    for key, leaf in state.items():
        assert leaf.dtype == np.float32, key
        assert np.isfinite(leaf).all(), key
