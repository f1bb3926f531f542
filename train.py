r"""Trains a ResNet: `python train.py --config configs/default.py --workdir runs/default`.

Any config value can be overridden on the command line, e.g. `--config.batch_size=256 --config.dtype=bfloat16`;
a key that the config does not have is an error. The workdir receives `metrics.jsonl`, `config.json`,
TensorBoard event files and `checkpoints/`; rerunning with the same workdir resumes from the latest checkpoint.

Several hosts: run the same command on every host with `--coordinator_address=HOST0:PORT --num_processes=N
--process_id=I` (I = 0 on HOST0). On TPU pods and under SLURM (one task per host) JAX finds these itself
and the flags can be left out. Each process reads only its share of the data; only process 0 writes logs.
A process that cannot reach the coordinator fails after `--initialization_timeout` seconds.
"""

from __future__ import annotations

import glob
import logging as logging_std
import os
import socket
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import config as config_lib
from resnet_jax import data, host_memory, training

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/, e.g. configs/default.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for metrics, TensorBoard and checkpoints."
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-host training."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout",
    120,
    "Seconds to wait for every process to reach the coordinator before failing.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_detected() -> bool:
    """Whether this is one of several processes that JAX can configure by itself (TPU pod, SLURM)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    # Multi-host TPU slices list every worker's hostname.
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


class CoordinatorUnreachableError(ConnectionError):
    """No coordinator answered at --coordinator_address within --initialization_timeout."""


def wait_for_coordinator(coordinator_address: str, deadline: float) -> None:
    """Returns once a TCP connection to `host:port` succeeds; raises after `deadline` (time.monotonic)."""
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise app.UsageError(
            f"--coordinator_address must be host:port, got {coordinator_address!r}"
        )
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachableError(
                    f"could not reach the coordinator at {coordinator_address}: {e}"
                ) from None
            time.sleep(0.5)


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    initialization_timeout: int,
) -> None:
    """Starts `jax.distributed` when several processes train together; a single process needs nothing."""
    if coordinator_address or num_processes or process_id is not None:
        if not coordinator_address or num_processes is None or process_id is None:
            raise app.UsageError(
                "multi-host training needs all of --coordinator_address, --num_processes, --process_id"
            )
        if not 0 <= process_id < num_processes:
            raise app.UsageError(f"--process_id={process_id} not in [0, {num_processes})")
        deadline = time.monotonic() + initialization_timeout
        if process_id != 0:
            # JAX's client aborts the whole process (a C++ fatal error) when the coordinator does not
            # answer; waiting for its port here first turns that into a clear error.
            wait_for_coordinator(coordinator_address, deadline)
        jax.distributed.initialize(
            coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=max(1, int(deadline - time.monotonic())),
        )
    elif _cluster_detected():
        jax.distributed.initialize(initialization_timeout=initialization_timeout)


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter of Orbax and Grain (several lines per checkpoint); warnings still show."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "grain"))
        return record.levelno >= logging_std.WARNING or not noisy


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one line (exit 2) instead of a traceback for a bad config or override."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:  # e.g. --config.batch_size=abc, or a missing required flag
        _exit_with_usage_error(_first_line_and_cause(str(e)))
    except SyntaxError as e:  # the config file itself does not parse
        _exit_with_usage_error(f"config file {e.filename}, line {e.lineno}: {e.msg}")
    except (
        KeyError,
        AttributeError,
    ):  # config_flags applying an override to a key the config lacks
        known = set(config_lib.base_config().keys())
        overridden = {
            arg.split("=", 1)[0][len("--config.") :].split(".")[0]
            for arg in argv
            if arg.startswith("--config.")
        }
        unknown = sorted(overridden - known)
        _exit_with_usage_error(
            f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(known))}"
        )
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(config_file.split(":")[0]):
        recipes = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "configs", "*.py")))
        _exit_with_usage_error(
            f"config file {config_file!r} not found; recipes: "
            + ", ".join(os.path.relpath(r) for r in recipes)
        )
    return remaining


def _first_line_and_cause(message: str) -> str:
    """One line from absl's message: a config file that raised carries its whole traceback, of which the
    first line, the config file's own frame and the exception itself are what the user needs."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    frames = [line for line in lines if line.startswith('File "') and "site-packages" not in line]
    where = f" ({frames[-1]})" if frames else ""
    return f"{lines[0]}{where} {lines[-1]}"


def _exit_with_usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _CONFIG.value.get("retain_host_memory"):
        # Before JAX's backend starts: it fixes the CPU client's dispatch mode.
        host_memory.retain_freed_memory()
    try:
        initialize_distributed(
            _COORDINATOR_ADDRESS.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            _INITIALIZATION_TIMEOUT.value,
        )
    except app.UsageError:
        raise
    except Exception as e:  # ours, or the runtime's XlaRuntimeError (DEADLINE_EXCEEDED, ...)
        sys.exit(
            f"error: could not start jax.distributed with coordinator {_COORDINATOR_ADDRESS.value!r} "
            f"within {_INITIALIZATION_TIMEOUT.value} s: {e}"
        )
    logging.info(
        "process %d of %d; %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    cache_dir = _CONFIG.value.get("compilation_cache_dir")
    if cache_dir:
        # Set before anything compiles; every process may share the directory.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:
        _exit_with_usage_error(str(e))  # a bad config is a usage error: exit 2, like a bad flag
    except (training.NonFiniteLossError, data.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    # Grain's worker processes need absl flags parsed, which app.run does before main.
    app.run(main, flags_parser=parse_flags)
