"""Fault injection through `train.py`: every fault ends in an exact resume or one clear line, and no good
checkpoint is ever lost.

Tiny runs (ResNet-20 on the bundled digits at 8x8, batch 32, a checkpoint every step) in subprocesses: kill -9 at
seeded random points (inside an async save, between steps, during startup); truncated, deleted and garbled files
in the newest checkpoints; BatchNorm statistics poisoned with inf; a diverging learning rate; a changed model,
optimizer or parameter grouping between runs; an `init_from` checkpoint of another architecture. A resume is
exact when every training loss logged after it equals the uninterrupted run's loss at that step (bitwise, on
CPU) and the final variables are equal. The counts of faults injected and survived are printed at the end
(`pytest -s tests/test_faults.py`).
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_jax.checkpoint import load_variables, save_variables
from resnet_jax.models import create_model

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NUM_STEPS = 10
TINY = {
    # configs/default.py's job, shortened: 8x8 digits, a checkpoint every step, one eval at the end.
    "image_size": 8,
    "batch_size": 32,
    "num_train_steps": NUM_STEPS,
    "warmup_epochs": 0.0,
    "log_every_steps": 1,
    "eval_every_steps": NUM_STEPS,
    "eval_batch_size": 360,
    "checkpoint_every_steps": 1,
    "checkpoints_to_keep": NUM_STEPS + 2,
}

# kind -> [injected, survived]; printed when the module's tests are done.
FAULTS: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


@pytest.fixture(scope="module", autouse=True)
def fault_counts():
    yield
    injected = sum(n for n, _ in FAULTS.values())
    survived = sum(n for _, n in FAULTS.values())
    kinds = ", ".join(f"{kind} {n}/{s}" for kind, (n, s) in FAULTS.items())
    print(f"\nfaults injected: {injected}, survived: {survived} ({kinds})")


def inject(kind: str) -> None:
    FAULTS[kind][0] += 1


def survived(*kinds: str) -> None:
    for kind in kinds:
        FAULTS[kind][1] = FAULTS[kind][0]


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        # LLVM -O0: half the compile time of these tiny programs, same semantics.
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def _command(workdir, overrides: dict) -> list[str]:
    config = {**TINY, **overrides}
    return [
        sys.executable,
        "train.py",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in config.items()),
    ]


def run(workdir, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, overrides),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start(workdir, **overrides) -> subprocess.Popen:
    return subprocess.Popen(
        _command(workdir, overrides),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


# Reports Python or asyncio print on their own after the run handled the fault (an Orbax read task of a
# failed restore that nobody awaits any more): noise, not a crash. Anything else with a traceback fails.
BACKGROUND_NOISE = ("Task exception was never retrieved", "Exception ignored in")


def tracebacks(stderr: str) -> list[str]:
    """Traceback lines of stderr outside the background-noise reports (which end at the next log line)."""
    found, in_noise = [], False
    for line in stderr.splitlines():
        if any(marker in line for marker in BACKGROUND_NOISE):
            in_noise = True
        elif line[:1] in "IWEF" and line[1:5].isdigit():  # the next absl log line
            in_noise = False
        elif line.startswith("Traceback") and not in_noise:
            found.append(line)
    return found


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    assert not tracebacks(result.stderr), result.stderr[-4000:]


def error_of(result: subprocess.CompletedProcess) -> str:
    """The run's `error: ...` message: exit 1 (or 2, a usage error), no traceback, the end of stderr."""
    assert result.returncode in (1, 2), result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    start_at = result.stderr.rindex("error: ")
    return result.stderr[start_at + len("error: ") :].strip()


def logged(workdir) -> list[dict]:
    """metrics.jsonl's records; a line cut by kill -9 is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def checkpoint_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def moved_aside(workdir) -> list[str]:
    directory = os.path.join(workdir, "checkpoints", "unusable")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def assert_finite_checkpoints(workdir) -> None:
    for step in checkpoint_steps(workdir):
        state = ocp.StandardCheckpointer().restore(
            os.path.join(workdir, "checkpoints", str(step), "state")
        )
        for leaf in jax.tree.leaves(state):
            assert np.isfinite(np.asarray(leaf)).all(), f"checkpoint {step} holds NaN/Inf"


def uninterrupted_run(workdir) -> tuple:
    """The uninterrupted run: its workdir, its loss per step and its final variables."""
    assert_ok(run(workdir))
    losses = train_losses(logged(workdir))
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    variables, metadata = load_variables(str(workdir))
    assert metadata["step"] == NUM_STEPS
    return workdir, losses, variables


class Reference:
    """The uninterrupted run's (workdir, losses, variables), read as a tuple: waits for the run on first use,
    so a scenario starts its own processes while the reference is still training."""

    def __init__(self, future: Future):
        self._future = future

    def __getitem__(self, index):
        return self._future.result()[index]

    def __iter__(self):
        return iter(self._future.result())


def assert_matches_reference(workdir, reference, records_before: int, resumed_from: int) -> None:
    """The run logged after `records_before` resumed at `resumed_from` and ended like the reference."""
    _, expected_losses, expected_variables = reference
    after = train_losses(logged(workdir)[records_before:])
    assert sorted(after) == list(range(resumed_from + 1, NUM_STEPS + 1))
    for step, loss in after.items():
        assert loss == expected_losses[step], (step, loss, expected_losses[step])
    variables, metadata = load_variables(str(workdir))
    assert metadata["step"] == NUM_STEPS
    for got, want in zip(
        jax.tree.leaves(variables), jax.tree.leaves(expected_variables), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def copy_stopped_at(reference, workdir, last_step: int) -> None:
    """The reference workdir as a run killed right after saving `last_step` would have left it."""
    shutil.copytree(reference[0], workdir, dirs_exist_ok=True)
    for step in checkpoint_steps(workdir):
        if step > last_step:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))


# -- damaged checkpoints ---------------------------------------------------------------------------------------


def _truncate_state_data(step_dir: str) -> None:
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in names:
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 2)


def _delete_state_metadata(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _garble_state_metadata(step_dir: str) -> None:
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {"params": ')


def _delete_state_manifest(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _zero_state_data(step_dir: str) -> None:
    """Bit rot: the second half of every array file of the state overwritten with zeros."""
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in names:
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                with open(path, "r+b") as f:
                    f.seek(size // 2)
                    f.write(b"\0" * (size - size // 2))


def _poison_batch_stats(step_dir: str) -> None:
    """Rewrites the state with one BatchNorm variance set to inf, through Orbax (a valid checkpoint)."""
    state_dir = os.path.join(step_dir, "state")
    checkpointer = ocp.StandardCheckpointer()
    state = checkpointer.restore(state_dir)
    var = state["batch_stats"]["stage2_block1"]["bn1"]["var"]
    state["batch_stats"]["stage2_block1"]["bn1"]["var"] = np.full_like(np.asarray(var), np.inf)
    poisoned = state_dir + ".poisoned"
    checkpointer.save(poisoned, state)
    checkpointer.wait_until_finished()
    shutil.rmtree(state_dir)
    os.rename(poisoned, state_dir)


def _garble_checkpoint_metadata(step_dir: str) -> None:
    """Orbax's step metadata (timestamps): not needed to restore, so this checkpoint stays usable."""
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
        f.write("{garbage")


# Newest first: each damaged checkpoint must be moved aside until the run reaches a usable one.
DAMAGE = [
    ("truncated state data", _truncate_state_data),
    ("deleted state/_METADATA", _delete_state_metadata),
    ("garbled state/_METADATA", _garble_state_metadata),
    ("deleted state/manifest.ocdbt", _delete_state_manifest),
    ("zeroed state data (bit rot)", _zero_state_data),
    ("BN statistics poisoned with inf", _poison_batch_stats),
]


def damaged_checkpoints_scenario(tmp_path, reference):
    stopped_at = NUM_STEPS - 1
    copy_stopped_at(reference, tmp_path, stopped_at)
    damaged = {}
    for offset, (kind, damage) in enumerate(DAMAGE):
        step = stopped_at - offset
        damage(os.path.join(tmp_path, "checkpoints", str(step)))
        inject(kind)
        damaged[step] = kind
    good = stopped_at - len(DAMAGE)  # intact but for Orbax's step metadata
    _garble_checkpoint_metadata(os.path.join(tmp_path, "checkpoints", str(good)))
    inject("garbled _CHECKPOINT_METADATA")
    records_before = len(logged(tmp_path))

    result = run(tmp_path)
    assert_ok(result)
    assert_matches_reference(tmp_path, reference, records_before, resumed_from=good)
    warnings = [line for line in result.stderr.splitlines() if "is unusable:" in line]
    assert len(warnings) == len(DAMAGE), result.stderr[-4000:]
    assert "non-finite values in batch_stats/stage2_block1/bn1/var" in result.stderr
    # Nothing lost: each damaged checkpoint is in unusable/ with its files, the good ones are in place.
    moved = moved_aside(tmp_path)
    assert sorted(int(name.split(".")[0]) for name in moved) == sorted(damaged)
    for name in moved:
        assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "unusable", name, "state"))
    assert set(range(1, good + 1)) <= set(checkpoint_steps(tmp_path))
    survived(*damaged.values(), "garbled _CHECKPOINT_METADATA")


def no_usable_checkpoint_scenario(tmp_path, reference):
    copy_stopped_at(reference, tmp_path, 2)
    for step in (1, 2):
        _delete_state_metadata(os.path.join(tmp_path, "checkpoints", str(step)))
        inject("every checkpoint damaged")
    message = error_of(run(tmp_path))
    assert "\n" not in message
    assert message.startswith("no usable checkpoint in ")
    assert "tried step 2: state/_METADATA is missing; step 1: state/_METADATA is missing" in message
    assert moved_aside(tmp_path) == ["1.missing-state-metadata", "2.missing-state-metadata"]
    survived("every checkpoint damaged")


# -- kill -9 -----------------------------------------------------------------------------------------------


def _kill_inside_a_save(process, workdir, from_step: int) -> None:
    """SIGKILL while Orbax's temporary directory of a save at `from_step` or later exists.

    The run is stopped (SIGSTOP, every thread) as soon as the directory is seen, so the kill cannot land after
    the background thread committed it however slowly this process polls; a save that committed before the
    stop is let go (SIGCONT) and the next one is caught.
    """
    directory = os.path.join(workdir, "checkpoints")

    def saving() -> list[int]:
        names = os.listdir(directory) if os.path.isdir(directory) else []
        return [int(n.split(".")[0]) for n in names if "tmp" in n and n.split(".")[0].isdigit()]

    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if any(step >= from_step for step in saving()):
            process.send_signal(signal.SIGSTOP)
            if any(step >= from_step for step in saving()):
                process.kill()
                process.wait()
                return
            process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError(f"no save from step {from_step} on was caught")


def _kill_after_step(process, workdir, step: int) -> None:
    """SIGKILL once this run (not an earlier one in the workdir) has logged `step`."""
    records_before = len(logged(workdir))
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if max(train_losses(logged(workdir)[records_before:]), default=0) >= step:
            process.kill()
            process.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step}")


# Each round kills one run at each place, in a fresh workdir, then resumes it to the end. CI runs one round
# (seeds 0-2); RESNET_JAX_FAULT_ROUNDS=n runs n rounds (seeds 0 to 3n-1) for a longer soak.
KILL_PLACES = ("inside an async save", "between steps", "during startup")
ROUNDS = int(os.environ.get("RESNET_JAX_FAULT_ROUNDS", "1"))


def _kill_once(workdir, seed: int, where: str) -> None:
    """Starts the run and SIGKILLs it at the seeded point."""
    rng = random.Random(seed)
    process = start(workdir)
    if where == "inside an async save":
        _kill_inside_a_save(process, workdir, rng.randint(2, 5))
    elif where == "between steps":
        _kill_after_step(process, workdir, rng.randint(6, 8))
    else:
        time.sleep(rng.uniform(0.5, 4.0))
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-3000:]
    process.stderr.close()


def kill_9_scenario(tmp_path, reference, round_index):
    for place_index, where in enumerate(KILL_PLACES):
        before = checkpoint_steps(tmp_path) if os.path.isdir(tmp_path / "checkpoints") else []
        _kill_once(tmp_path, 3 * round_index + place_index, where)
        inject(f"kill -9 {where}")
        after = checkpoint_steps(tmp_path)
        assert set(before) <= set(after), (before, after)  # nothing complete was lost
        if (
            where == "inside an async save"
        ):  # the half-written save is on disk, and is no checkpoint
            assert any("tmp" in name for name in os.listdir(tmp_path / "checkpoints"))

    resumed_from = checkpoint_steps(tmp_path)[-1]
    records_before = len(logged(tmp_path))
    result = run(tmp_path)
    assert_ok(result)
    assert_matches_reference(tmp_path, reference, records_before, resumed_from)
    assert moved_aside(tmp_path) == []  # atomic commits: a kill never leaves a damaged checkpoint
    # Every loss any of the runs logged equals the uninterrupted run's at that step.
    for step, loss in train_losses(logged(tmp_path)).items():
        assert loss == reference[1][step], step
    survived(*(f"kill -9 {where}" for where in KILL_PLACES))


# -- divergence ------------------------------------------------------------------------------------------------


def diverging_run_scenario(
    tmp_path,
):
    inject("diverging learning rate")
    message = error_of(run(tmp_path, learning_rate=200, checkpoint_every_steps=2))
    assert "\n" not in message
    assert message.startswith("non-finite "), message
    assert_finite_checkpoints(tmp_path)
    # Checkpoints whose weights already gave a loss above 10 x ln(10) on the next step are moved aside, not
    # deleted: a loss of 1e15 is finite, but no learning rate trains such weights back.
    diverged = [name for name in moved_aside(tmp_path) if name.endswith(".diverged")]
    assert diverged, message
    assert "moved aside" in message and "rerun" in message, message
    kept = checkpoint_steps(tmp_path)
    assert not set(kept) & {int(name.split(".")[0]) for name in diverged}
    if kept:
        assert f"step {kept[-1]}" in message
    else:
        assert "starts from scratch" in message

    # The advice works: a rerun with a sane learning rate trains to the end from what was kept.
    records_before = len(logged(tmp_path))
    result = run(tmp_path, checkpoint_every_steps=2)
    assert_ok(result)
    after = train_losses(logged(tmp_path)[records_before:])
    assert min(after) == (kept[-1] + 1 if kept else 1) and max(after) == NUM_STEPS
    assert all(np.isfinite(loss) and loss < 10 for loss in after.values()), after
    assert set(kept) <= set(checkpoint_steps(tmp_path))
    assert diverged == [n for n in moved_aside(tmp_path) if n.endswith(".diverged")]
    assert_finite_checkpoints(tmp_path)
    survived("diverging learning rate")


# -- config changes between runs ------------------------------------------------------------------------------


def changed_model_scenario(tmp_path, reference):
    # The other refused keys (optimizer, EMA or clipping on/off, ...) take the same path: see
    # tests/test_checkpoint.py for each rule.
    copy_stopped_at(reference, tmp_path, 4)
    inject("changed model")
    message = error_of(run(tmp_path, model="cifar_resnet32"))
    assert "\n" not in message
    assert message.startswith("cannot resume from checkpoint 4 in ")
    assert "config.model changed 'cifar_resnet20' -> 'cifar_resnet32'" in message
    assert checkpoint_steps(tmp_path) == [1, 2, 3, 4] and moved_aside(tmp_path) == []
    survived("changed model")


def changed_state_structure_scenario(tmp_path, reference):
    # Parameter groups (backbone vs head) change the optimizer state's structure, which no rule names.
    copy_stopped_at(reference, tmp_path, 4)
    inject("changed optimizer state structure")
    message = error_of(run(tmp_path, backbone_lr_multiplier=0.5))
    lines = message.splitlines()
    assert lines[0].startswith("cannot resume from checkpoint 4 in ")
    assert "its training state does not fit this run's" in lines[0]
    assert lines[1].startswith("hint: the config changed since it was written: ")
    assert "backbone_lr_multiplier 1.0 -> 0.5" in lines[1]
    assert len(lines) < 80
    # Every optimizer-state path moved (about 60 each way): the message lists 20 of each, the file all.
    report = tmp_path / "resume_mismatch.txt"
    assert lines[-1] == f"the full lists: {report}"
    assert len(report.read_text().splitlines()) > 100
    assert checkpoint_steps(tmp_path) == [1, 2, 3, 4] and moved_aside(tmp_path) == []
    survived("changed optimizer state structure")


def init_from_another_architecture_scenario(tmp_path):
    model = create_model("resnet50", num_classes=1000)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    )
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    save_variables(
        str(tmp_path / "resnet50"), variables, {"model": "resnet50", "num_classes": 1000}
    )
    inject("init_from another architecture")
    workdir = tmp_path / "run"
    message = error_of(run(workdir, init_from=str(tmp_path / "resnet50")))
    lines = message.splitlines()
    assert lines[0].startswith(
        f"config.init_from='{tmp_path / 'resnet50'}': the checkpoint (resnet50)"
    )
    assert "mis-shaped" in lines[0]
    assert lines[1].startswith("hint: this looks like a different architecture")
    assert "'resnet50'" in lines[1]
    assert len(lines) < 80
    report = workdir / "init_from_mismatch.txt"
    assert lines[-1] == f"the full lists: {report}"
    assert len(report.read_text().splitlines()) > 200
    survived("init_from another architecture")


# -- the scenarios, side by side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """{name: future of its scenario}: every scenario above, started at once, each in its own workdir.

    A train.py process of this size uses about one core, for much of its life less (startup, saving, exit);
    one after another, the module's processes left one of CI's two cores idle. Here four threads drive the
    scenarios' processes as the tests did one by one: the uninterrupted run, the scenarios that need nothing
    of it, and the kill -9 rounds (which wait for it only to compare) start together; the scenarios that
    begin from a copy of its workdir follow as threads free up. Every fault is injected as before: a kill
    is placed by what the run has written, not by time, so slower runs side by side change nothing it checks.
    """
    directory = tmp_path_factory.mktemp("faults")

    def workdir(name: str):
        path = directory / name.replace(" ", "_")
        path.mkdir()
        return path

    pool = ThreadPoolExecutor(max_workers=4)
    reference = Reference(pool.submit(uninterrupted_run, workdir("uninterrupted")))
    futures = {
        "diverging run": pool.submit(diverging_run_scenario, workdir("diverging")),
        "init_from": pool.submit(init_from_another_architecture_scenario, workdir("init_from")),
    }
    for round_index in range(ROUNDS):
        futures[f"kill -9 round {round_index}"] = pool.submit(
            kill_9_scenario, workdir(f"kill_9_{round_index}"), reference, round_index
        )
    for name, scenario in [
        ("damaged", damaged_checkpoints_scenario),
        ("no usable", no_usable_checkpoint_scenario),
        ("changed model", changed_model_scenario),
        ("changed state structure", changed_state_structure_scenario),
    ]:
        futures[name] = pool.submit(scenario, workdir(name), reference)
    yield futures
    pool.shutdown(wait=True)


def test_damaged_checkpoints_are_moved_aside_and_the_newest_good_one_resumes_exactly(scenarios):
    scenarios["damaged"].result()


def test_no_usable_checkpoint_is_one_error_listing_each_one_tried(scenarios):
    scenarios["no usable"].result()


@pytest.mark.parametrize("round_index", range(ROUNDS))
def test_kill_9_at_random_points_resumes_exactly_from_the_newest_checkpoint(scenarios, round_index):
    scenarios[f"kill -9 round {round_index}"].result()


def test_a_diverging_run_stops_in_one_line_sets_diverged_checkpoints_aside_and_a_sane_rerun_finishes(
    scenarios,
):
    scenarios["diverging run"].result()


def test_changing_the_model_between_runs_is_one_line_and_moves_nothing(scenarios):
    scenarios["changed model"].result()


def test_a_state_that_no_longer_fits_starts_with_a_summary_and_the_changed_keys(scenarios):
    scenarios["changed state structure"].result()


def test_init_from_a_resnet50_into_cifar_resnet20_gives_the_summary_and_hint_first(scenarios):
    scenarios["init_from"].result()
