"""Shared test setup: deterministic conv forms, and a persistent compilation cache for cheap recompiles."""

import os

import jax

# Deterministic conv forms and no timing in tests: `static` picks each conv's form by the shape rule, so a test's
# numbers do not depend on the machine and no test pays for autotuning. Set at import, before any test runs;
# subprocesses the tests start inherit it through os.environ. Autotune's own tests (test_conv_autotune.py) set
# the mode they test explicitly.
os.environ.setdefault("RESNET_JAX_CONV_FORM", "static")

jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
