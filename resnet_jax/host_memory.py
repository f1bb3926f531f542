"""Keep the heap memory that XLA:CPU frees after every step in the process, instead of handing it back to the OS.

Why: XLA:CPU allocates an executable's temporaries as one block per call (the `preallocated-temp` of its
buffer assignment: 45 MB for resnet18's 32 px, batch-32 train step; 605 MB for resnet50's 128 px, batch 16)
and frees it when the call returns. glibc's malloc serves a block above its mmap threshold (which adapts, up
to 32 MiB) with a fresh `mmap` and unmaps it on `free`, so every step touches that memory anew and the
kernel zero-fills it page by page: on a 2-core AMD EPYC Zen 4, 10,900 page faults and ~30 ms of system CPU
per resnet18 step of 70-90 ms, 160,000 faults and ~0.4 s per resnet50 step of 1.2-1.6 s
(benchmarks/README.md).

What `retain_freed_memory` sets, process-wide:

* glibc's `M_MMAP_MAX = 0`: no block gets a mapping of its own; blocks come from the heaps and go back to
  them;
* glibc's `M_TRIM_THRESHOLD = 2 GiB - 1`: free memory at the top of the main heap is returned only past it;
* JAX's `jax_cpu_enable_async_dispatch = False`: a single-device computation runs on the thread that calls
  it, so XLA allocates its temporaries there. The main thread's heap grows without limit and keeps them;
  a worker thread's heaps are capped at 64 MiB, and glibc maps a larger block afresh whatever
  `M_MMAP_MAX` says (with async dispatch, resnet50's step kept its 160,000 faults). The training loop
  loses nothing measurable by it (the default job: 42-53 s against 53-62 s with async dispatch, and 221,000
  page faults against 5.8 million).

After it the same steps take under 10 page faults and 2-10 ms of system CPU. The cost: the process keeps
its peak heap, as a training process does anyway from its second step on. (`M_ARENA_MAX = 1`, every thread
on the main heap, also kept the large blocks, but resnet18's step took 118-134 ms of user CPU against
99-122 without it: lock contention.)

It must run before JAX starts its backend (the dispatch mode is fixed when the CPU client is made).
Users who run jemalloc or tcmalloc (`LD_PRELOAD`) or set `GLIBC_TUNABLES` malloc options keep their own
choice, and GPU and TPU runs keep their defaults: this then changes nothing (`reason_to_leave_alone`).
`train.py` calls it first thing (`config.retain_host_memory`), as does `python -m resnet_jax.predict`;
nothing calls it on import.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform

import jax

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# The largest value mallopt takes (an int): free heap memory above this is still returned to the OS.
TRIM_THRESHOLD_BYTES = 2**31 - 1

_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def accelerator_plugins() -> list[str]:
    """The PJRT plugins JAX would load (CUDA, ROCm, TPU...), found without starting a backend."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # the namespace package that plugins install into
    except ImportError:
        pass
    else:
        names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def jax_runs_on_cpu_only() -> bool:
    """Whether JAX's backend will be the CPU alone: `jax_platforms` says only "cpu", or, with it unset,
    no accelerator plugin is installed. Reads configuration only; starts no backend."""
    platforms = jax.config.jax_platforms
    if platforms:
        return {name.strip() for name in platforms.split(",")} == {"cpu"}
    return not accelerator_plugins()


def allocator_in_charge() -> str | None:
    """Why `retain_freed_memory` would leave malloc alone (another allocator, the user's settings), or None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'})"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return f"GLIBC_TUNABLES={tunables}"
    return None


def reason_to_leave_alone() -> str | None:
    """Why `retain_freed_memory` changes nothing here (JAX has an accelerator, another allocator or the user's
    own malloc settings are in charge), or None where it applies."""
    if not jax_runs_on_cpu_only():
        return "JAX runs on an accelerator here (jax_platforms or an installed PJRT plugin)"
    return allocator_in_charge()


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory in the process, and JAX to run single-device CPU
    computations on the calling thread (see the module docstring).

    Returns True if the settings took effect; False, changing nothing, where `reason_to_leave_alone` gives
    a reason or glibc refused a setting (both logged).
    """
    reason = reason_to_leave_alone()
    if reason is not None:
        logging.info("host memory: leaving malloc as it is (%s)", reason)
        return False
    if _backend_started():
        logging.warning(
            "host memory: JAX's backend has started, so its dispatch mode is fixed and temporaries over "
            "64 MiB are still mapped afresh each call; call retain_freed_memory before JAX runs"
        )
    # The process's own symbols, glibc's among them (no ldconfig subprocess, as find_library would run).
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    refused = [param for param, value in _SETTINGS if libc.mallopt(param, value) != 1]
    if refused:
        logging.warning("host memory: glibc refused mallopt parameters %s", refused)
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    logging.info(
        "host memory: malloc keeps freed memory (no blocks mapped on their own, trim above %d MiB, "
        "single-device computations run on the calling thread)",
        TRIM_THRESHOLD_BYTES >> 20,
    )
    return True


def _backend_started() -> bool:
    # A private function of jax (there is no public one); if it goes away, assume not started.
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())
