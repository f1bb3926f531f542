"""Waiting for processes the tests start in the background (a script on the second core while in-process tests
run on the first, or several tiny train.py runs side by side)."""

from __future__ import annotations

import subprocess


def finish(process: subprocess.Popen, timeout: float) -> None:
    """Waits for `process` (started with stderr piped, text mode); fails the test with the tail of its stderr if it
    exited non-zero or ran past `timeout` seconds (then it is killed first)."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-5000:]


def stop(process: subprocess.Popen) -> None:
    """Kills `process` if it still runs (a fixture's teardown after a test failed before waiting for it)."""
    if process.poll() is None:
        process.kill()
        process.communicate()
