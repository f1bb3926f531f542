"""Choosing a conv's form by timing the candidates on this machine, once, with the choice cached on disk.

Which of the equivalent forms of `resnet_jax.conv` is fastest depends on the CPU (AVX2 or AVX-512, cache sizes,
cores) and on the shape: thresholds measured on one CPU did not carry to another. So, like cuDNN's autotuning,
`choose_form` times each candidate's forward + gradients for the exact (input shape, kernel shape, strides,
padding, groups, dtype) the first time a model traces it, and stores the fastest in a JSON file keyed by the CPU
model (with its family, model number and vector extensions; implementer and part on ARM), usable core count,
jax version and the forms' revision (`FORMS_REVISION`), and by the device kind where a model built with
CpuConv by hand runs on an accelerator. Shapes are static under `jit`, so the choice happens at trace time;
the timing runs eagerly on the tracing thread (`jax.ensure_compile_time_eval`), which is the thread the step
later runs on: timed on a thread of its own, glibc served each call's temporaries from freshly mapped memory
(a worker thread's heap is capped at 64 MiB; `resnet_jax.host_memory`) and im2col's large patch matrices lost
to page faults they never pay in the step (the resnet50 128 px stem: im2col 70.6 ms there, 41.1 on the main
thread).

Controlled by the environment variable `RESNET_JAX_CONV_FORM`:

* `auto` (the default): time convs whose forward is at least `MIN_TUNED_FLOPS` (smaller ones take the static
  choice; timing them costs more than it could save, and keeps tiny test models deterministic);
* `static`: never time; take `resnet_jax.conv_forms.static_form`'s choice (tests/conftest.py sets it, for
  deterministic forms and no timing in tests);
* a form name (`lax`, `winograd4`, ...): that form wherever it can compute the conv, the static choice elsewhere.

Multi-process runs (`jax.process_count() > 1`) never time: `auto` takes the static choice there. Each process
would time on its own and could pick another form for the same conv, and a cache file is per host, so the
processes would compile different programs for one replicated step and their replicated state would drift
apart. The static rule depends on the shape alone, so every process picks the same form. To run a measured form
in a multi-process run, pin it by name (the same value on every process).

`RESNET_JAX_CACHE_DIR` moves the cache (default `~/.cache/resnet_jax`). Delete the file to re-measure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: cache writes are not locked
    fcntl = None

FORM_ENV = "RESNET_JAX_CONV_FORM"
CACHE_DIR_ENV = "RESNET_JAX_CACHE_DIR"
# Where `cpu_description` reads the CPU (a constant, so tests can point it at a file of their own).
CPUINFO = "/proc/cpuinfo"
_CPUINFO_KEYS = ("model name", "cpu family", "model", "flags", "CPU implementer", "CPU part")
# The vector extensions that change which form is fastest, as /proc/cpuinfo names them.
_VECTOR_ISAS = ("avx2", "avx512f", "amx_tile")
# Convs whose forward takes fewer flops than this are not timed: timing costs a few compiles (seconds) and
# could save at most about a millisecond per step. The default job's convs (ResNet-20, 16 px, batch 64:
# 7.5e7) stay below, so its first run does not pay for timing; resnet18's at 32 px, batch 32 (1.5e8), are
# timed, where Winograd beat the static im2col choice 2x at 8x8 maps.
MIN_TUNED_FLOPS = 1e8
# Part of the cache file's name: bump it when a form's implementation changes (the 1x1/im2col matmul became a
# 2-D dot in revision 2; im2col's weights became a reshape of the kernel in revision 3; Winograd's products
# split into independent groups in revision 4; revision 5 times on the tracing thread, not a worker thread),
# so that choices timed for the old code are measured again rather than reused.
FORMS_REVISION = 5
# Timing rounds per candidate (alternating, median). The first round is one call of each, after which a
# candidate slower than PRUNE_FACTOR x the best is dropped; every later round times as many consecutive calls
# as fill MIN_ROUND_SECONDS, so that a millisecond-long conv is not judged by single calls, which one
# scheduler hiccup on a shared machine can double (timed by single calls in 3 rounds, the 32 px stem's im2col
# and lax forms swapped places between two timings on the same VM: 5.5 vs 6.7 ms, then 7.1 vs 5.4).
ROUNDS = 5
MIN_ROUND_SECONDS = 0.05
PRUNE_FACTOR = 2.0

_memory: dict[str, str] = {}
_lock = threading.Lock()


def mode() -> str:
    """`RESNET_JAX_CONV_FORM`: `auto` (the default), `static` or a form name."""
    return os.environ.get(FORM_ENV) or "auto"


def timing_allowed() -> bool:
    """Whether `auto` may time forms in this process: not in a multi-process run (module docstring)."""
    return jax.process_count() == 1


def cpuinfo_fields() -> dict[str, str]:
    """The first processor's `model name`, `cpu family`, `model` and `flags` (x86), or `CPU implementer` and
    `CPU part` (ARM, which names no model), from /proc/cpuinfo: those present, none where the file is missing
    (macOS)."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in _CPUINFO_KEYS and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    return fields


def cpu_description() -> str:
    """CPU model, family/model numbers, vector extensions and core count: what a cached choice is valid for.

    The model name alone is not enough: cloud VMs report generic names ("AMD EPYC") for CPUs of different
    generations, and an AVX2 Zen 2 and an AVX-512 Zen 4 under that one name need different forms.
    """
    fields = cpuinfo_fields()
    model = fields.get("model name")
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    parts = [model]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"f{fields['cpu family']}m{fields['model']}")
    if "CPU implementer" in fields and "CPU part" in fields:
        # ARM names no model: a Neoverse N1 and a V2 are both "aarch64" otherwise.
        parts.append(f"impl{fields['CPU implementer']}part{fields['CPU part']}")
    flags = set(fields.get("flags", "").split())
    parts += [isa for isa in _VECTOR_ISAS if isa in flags]
    return f"{' '.join(parts)} x{usable_cpu_count()}"


def usable_cpu_count() -> int:
    """The cores this process may run on: what XLA:CPU sizes its thread pools by.

    Not `os.cpu_count()` (every core of the machine): under `taskset` or a cgroup cpuset the step runs on
    fewer threads, and forms timed on all cores need not be the fastest there (with one of this machine's
    two cores, XLA starts 13 threads instead of 17).
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cache_path() -> str:
    directory = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "resnet_jax"
    )
    description = cpu_description()
    if jax.default_backend() != "cpu":
        # CpuConv built by hand on an accelerator times there: keep those choices apart from the host CPU's.
        description += f" {jax.devices()[0].device_kind}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_")
    return os.path.join(directory, f"conv_forms_r{FORMS_REVISION}_{slug}_jax{jax.__version__}.json")


def _read_cache(path: str) -> dict:
    """The cached table, or {} where the file is missing, unreadable or not a JSON object (then re-timed)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _usable_entry(entry: object, forms: Collection[str]) -> bool:
    """Whether a cached entry was timed over exactly these candidates and names one of them. Anything else (a
    new form in this version of the code, a hand-edited or foreign file) is timed again."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("ms"), dict)
        and set(entry["ms"]) == set(forms)
        and entry.get("form") in forms
    )


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on `path`.lock across processes (where the OS has `fcntl`; elsewhere none)."""
    if fcntl is None:
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Adds one entry: under a file lock, re-reads the table, adds the entry and atomically replaces the file,
    so processes timing at once keep each other's entries and a reader never sees half a file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path):
            table = _read_cache(path)
            table[key] = entry
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still gets the measured choice for this process


def shape_key(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding,
    feature_group_count: int,
    dtype,
    kernel_grad_only: bool,
) -> str:
    return (
        f"x{tuple(x_shape)} k{tuple(kernel_shape)} s{tuple(strides)} p{tuple(map(tuple, padding))} "
        f"g{feature_group_count} {jnp.dtype(dtype).name}{' kgrad' if kernel_grad_only else ''}"
    )


def time_forms(
    forms: dict[str, Callable[[jax.Array, jax.Array], jax.Array]],
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    dtype,
    kernel_grad_only: bool,
) -> dict[str, float]:
    """Median seconds of forward + gradients of each form on random data, timed alternating."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) * 0.01, dtype)
    argnums = (1,) if kernel_grad_only else (0, 1)
    steps = {}
    for name, form in forms.items():

        def loss(x, kernel, form=form):
            return jnp.sum(jnp.square(form(x, kernel).astype(jnp.float32)))

        step = jax.jit(jax.grad(loss, argnums=argnums))
        jax.block_until_ready(step(x, kernel))  # compile and warm up
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    calls = dict.fromkeys(steps, 1)
    for round_index in range(ROUNDS):
        for name in list(steps):
            start = time.perf_counter()
            for _ in range(calls[name]):
                jax.block_until_ready(steps[name](x, kernel))
            times[name].append((time.perf_counter() - start) / calls[name])
        if round_index == 0:
            best = min(t[0] for t in times.values())
            for name in [n for n, t in times.items() if t[0] > PRUNE_FACTOR * best]:
                del steps[name]
            calls = {name: max(1, math.ceil(MIN_ROUND_SECONDS / times[name][0])) for name in steps}
    return {name: statistics.median(t) for name, t in times.items()}


def choose_form(
    key: str,
    forms: dict[str, Callable[[jax.Array, jax.Array], jax.Array]],
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    dtype,
    kernel_grad_only: bool,
) -> str:
    """The fastest of `forms` (name -> f(x, kernel)) for this conv: from memory, the disk cache, or timing."""
    with _lock:
        if key in _memory:
            return _memory[key]
        path = cache_path()
        entry = _read_cache(path).get(key)
        if not _usable_entry(entry, forms):
            # Called while a model traces: run the candidates eagerly, on this thread (module docstring).
            with jax.ensure_compile_time_eval():
                seconds = time_forms(forms, x_shape, kernel_shape, dtype, kernel_grad_only)
            entry = {
                "form": min(seconds, key=seconds.get),
                "ms": {name: round(1e3 * s, 3) for name, s in seconds.items()},
            }
            _write_cache(path, key, entry)
        _memory[key] = entry["form"]
        return entry["form"]


def clear_memory() -> None:
    """Forgets the choices held in memory (the disk cache stays)."""
    with _lock:
        _memory.clear()
