"""Preemption in a single process: SIGTERM becomes a flag the training loop polls, so it can save and exit.

With `jax.distributed`, JAX's preemption sync service owns SIGTERM and Orbax's
`CheckpointManager.reached_preemption` makes every process stop at the same step; this watcher then stays out
of the way.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax

from resnet_jax.checkpoint.variables import CHECKPOINTS_SUBDIR

_log = logging.getLogger(__name__)


def _preemption_service_active() -> bool:
    """Whether `jax.distributed` runs JAX's preemption sync service (which owns SIGTERM then)."""
    try:
        from jax._src import distributed  # private, so imported only where it is needed
    except ImportError:
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatcher:
    """Turns SIGTERM into a flag (`requested()`) in a single process, so the loop can save and exit cleanly.

    Installed only when JAX's preemption service is not running (no `jax.distributed`): with it, JAX already
    handles SIGTERM and `CheckpointManager.reached_preemption` makes every process stop at the same step, which a
    per-process flag could not guarantee. The handler must run in the main thread (Python's rule); elsewhere
    the watcher stays inactive.
    """

    def __init__(self) -> None:
        self._requested = False
        self._reported = False
        self._previous_handler: Any = None
        self.installed = False
        if _preemption_service_active():
            return
        if jax.process_count() > 1:
            _log.warning(
                "multi-process run without JAX's preemption service: SIGTERM is not handled gracefully"
            )
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only a flag: logging (or anything that takes a lock) from a signal handler can raise "reentrant
        # call" when the signal lands while the main thread is inside the same code. `requested` logs.
        del signum, frame
        self._requested = True

    def requested(self) -> bool:
        """True once SIGTERM has arrived; the first call that sees it logs it."""
        if self._requested and not self._reported:
            self._reported = True
            _log.warning("SIGTERM received: finishing the current step, then saving and exiting")
        return self._requested

    def uninstall(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self.installed = False


def preemption_message(step: int, workdir: str) -> str:
    """The log line a preempted run ends with."""
    return (
        f"preempted at step {step}; rerun the same command to resume from "
        f"{os.path.join(os.path.abspath(workdir), CHECKPOINTS_SUBDIR)}"
    )
