"""Shared test setup: deterministic conv forms, and a persistent compilation cache for cheap recompiles."""

import gc
import os

import jax
import pytest

# Deterministic conv forms and no timing in tests: `static` picks each conv's form by the shape rule, so a test's
# numbers do not depend on the machine and no test pays for autotuning. Set at import, before any test runs;
# subprocesses the tests start inherit it through os.environ. Autotune's own tests (test_conv_autotune.py) set
# the mode they test explicitly.
os.environ.setdefault("RESNET_JAX_CONV_FORM", "static")

jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def unoptimized_xla():
    """XLA without most of its optimization passes, for a test module's duration.

    For modules that apply big nets once each, op by op (the torchvision and timm parity tests): there every
    new op shape is a compile, and the passes cost more compile time than they save in run time. Results
    differ from an optimized build in float rounding only; the tolerances are well above it.
    """
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Free jax's compiled programs and caches before pytest's closing garbage collections.

    A pytest-xdist worker reports itself finished after this hook, and execnet interrupts it (SIGINT) if it is
    still busy 5 s later. pytest's five closing `gc.collect()` rounds over a whole session's objects ran past
    that (the interrupt landed in jax's gc callback: a `KeyboardInterrupt` warning after the last test).
    Measured after three test files: one round 0.51 s; `clear_caches` + a round here 2.8 s, after which the
    five rounds took 0.52 s in all.
    """
    jax.clear_caches()
    gc.collect()
