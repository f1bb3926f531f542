"""The conv form choice: timed once per shape, cached on disk, pinnable, and deterministic when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from resnet_jax import conv, conv_autotune, conv_forms

PADDING = ((1, 1), (1, 1))


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Autotuning on, into a fresh cache, for every conv however small; memory cleared before and after."""
    monkeypatch.setenv(conv_autotune.FORM_ENV, "auto")
    monkeypatch.setenv(conv_autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(conv_autotune, "MIN_TUNED_FLOPS", 0)
    monkeypatch.setattr(conv_autotune, "ROUNDS", 1)
    conv_autotune.clear_memory()
    yield tmp_path
    conv_autotune.clear_memory()


def no_timing(*args, **kwargs):
    raise AssertionError("timed the forms, but the choice should have come from a cache or a rule")


def record_timings(monkeypatch) -> list:
    """Each `time_forms` call from here on, as (the thread it ran on, the input shape timed); it still times."""
    timings = []
    time_forms = conv_autotune.time_forms

    def recording(forms, x_shape, *args, **kwargs):
        timings.append((threading.current_thread(), tuple(x_shape)))
        return time_forms(forms, x_shape, *args, **kwargs)

    monkeypatch.setattr(conv_autotune, "time_forms", recording)
    return timings


def test_first_use_times_the_candidates_and_caches_the_fastest_on_disk(tuner, monkeypatch):
    x = jnp.ones((1, 6, 6, 4))
    kernel = jnp.ones((3, 3, 4, 4))
    chosen = conv.select_form(x.shape, kernel.shape, (1, 1), PADDING)
    candidates = conv_forms.candidate_forms(kernel.shape, (1, 1), PADDING)
    assert chosen in candidates and "winograd4" in candidates
    with open(conv_autotune.cache_path()) as f:
        table = json.load(f)
    (entry,) = table.values()
    assert entry["form"] == chosen == min(entry["ms"], key=entry["ms"].get)
    assert os.path.dirname(conv_autotune.cache_path()) == str(tuner)
    # A new process (memory cleared) reads the file instead of timing again.
    conv_autotune.clear_memory()
    monkeypatch.setattr(conv_autotune, "time_forms", no_timing)
    assert conv.select_form(x.shape, kernel.shape, (1, 1), PADDING) == chosen


def test_later_rounds_time_enough_calls_to_fill_the_minimum_round(monkeypatch):
    """A conv much shorter than MIN_ROUND_SECONDS is timed over many consecutive calls per round, not by
    single calls; a candidate pruned after the first round is never called again."""
    monkeypatch.setattr(conv_autotune, "ROUNDS", 3)
    monkeypatch.setattr(conv_autotune, "MIN_ROUND_SECONDS", 0.02)
    runs = {"fast": 0, "slow": 0}

    def counted(name, delay):
        def form(x, kernel):
            def record():
                runs[name] += 1
                time.sleep(delay)

            jax.debug.callback(record)
            return conv.lax_conv(x, kernel, (1, 1), PADDING)

        return form

    seconds = conv_autotune.time_forms(
        {"fast": counted("fast", 0.0), "slow": counted("slow", 0.05)},
        (1, 6, 6, 4),
        (3, 3, 4, 4),
        jnp.float32,
        False,
    )
    assert set(seconds) == {"fast", "slow"} and seconds["slow"] > 0.05 > 0.02 > seconds["fast"]
    # Warm-up and the first round: one call each. "slow" is then pruned (> PRUNE_FACTOR x "fast").
    assert runs["slow"] == 2
    # Two later rounds of "fast", each at least ceil(0.02 s / its first call) calls.
    later_calls = runs["fast"] - 2
    assert later_calls >= 2 * 5 and later_calls % 2 == 0


def test_select_form_times_the_region_form_where_the_input_map_makes_it_a_candidate(tuner):
    # The region form depends on the input's size (conv_forms.candidate_forms' x_shape): at 2x2 maps it is
    # timed with the others; at 8x8 it is not a candidate.
    for x_shape, timed in [((2, 2, 2, 4), True), ((2, 8, 8, 4), False)]:
        conv.select_form(x_shape, (3, 3, 4, 4), (1, 1), PADDING)
        with open(conv_autotune.cache_path()) as f:
            table = json.load(f)
        (entry,) = [v for k, v in table.items() if k.startswith(f"x{x_shape}")]
        assert ("region_im2col" in entry["ms"]) == timed
        assert "im2col" in entry["ms"]


def test_choosing_inside_jit_and_grad_computes_the_conv(tuner):
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))

    def loss(kernel, x, fn):
        return jnp.sum(fn(x, kernel, (1, 1), PADDING) ** 2)

    actual = jax.jit(jax.grad(loss), static_argnums=2)(kernel, x, conv.cpu_conv)
    expected = jax.grad(loss)(kernel, x, conv_forms.lax_conv)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5 * float(jnp.max(expected)))


def test_timing_runs_on_the_tracing_thread_inside_shard_map_and_vmap(tuner, monkeypatch):
    """The candidates run eagerly where the model traces (the thread that runs the step, with its heap), even
    inside `shard_map` under `jit` and `vmap`, and the traced conv still computes lax.conv's values."""
    timings = record_timings(monkeypatch)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
    mesh = jax.make_mesh((1,), ("data",))
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    sharded = jax.shard_map(
        lambda x: conv.cpu_conv(x, kernel, (1, 1), PADDING),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    expected = conv_forms.lax_conv(x, kernel, (1, 1), PADDING)
    np.testing.assert_allclose(
        jax.jit(sharded)(x), expected, rtol=0, atol=1e-4 * float(jnp.max(expected))
    )
    per_image = jax.vmap(lambda image: conv.cpu_conv(image[None], kernel, (2, 2), PADDING)[0])
    np.testing.assert_allclose(
        jax.jit(per_image)(x),
        conv_forms.lax_conv(x, kernel, (2, 2), PADDING),
        rtol=0,
        atol=1e-4 * float(jnp.max(expected)),
    )
    assert len(timings) == 2 and all(t is threading.current_thread() for t, _ in timings)


def test_init_never_times_and_the_first_apply_does(tuner, monkeypatch):
    """`init` traces the model on a batch of one for the parameters' shapes only: no form is timed for it."""
    timings = record_timings(monkeypatch)
    module = conv.CpuConv(features=8, kernel_size=(3, 3), padding=PADDING)
    variables = module.init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))
    assert timings == [] and variables["params"]["kernel"].shape == (3, 3, 4, 8)
    jax.jit(module.apply)(variables, jnp.ones((2, 6, 6, 4)))
    assert [x_shape for _, x_shape in timings] == [(2, 6, 6, 4)]


def test_static_mode_and_small_convs_are_never_timed(tmp_path, monkeypatch):
    monkeypatch.setenv(conv_autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(conv_autotune, "time_forms", no_timing)
    conv_autotune.clear_memory()
    shape = ((2, 32, 32, 8), (3, 3, 8, 8), (1, 1), PADDING)
    monkeypatch.setenv(conv_autotune.FORM_ENV, "static")
    assert conv.select_form(*shape) == conv_forms.static_form(*shape) == "winograd4"
    # 2*2*32*32*9*8*8 flops: below MIN_TUNED_FLOPS
    monkeypatch.setenv(conv_autotune.FORM_ENV, "auto")
    assert conv.select_form(*shape) == "winograd4"
    assert not os.listdir(tmp_path)


def test_a_pinned_form_applies_where_it_can_and_the_rule_elsewhere(monkeypatch):
    monkeypatch.setenv(conv_autotune.FORM_ENV, "lax")
    assert conv.select_form((2, 32, 32, 8), (3, 3, 8, 8), (1, 1), PADDING) == "lax"
    monkeypatch.setenv(conv_autotune.FORM_ENV, "winograd2")
    assert conv.select_form((2, 32, 32, 8), (3, 3, 8, 8), (1, 1), PADDING) == "winograd2"
    strided = ((2, 32, 32, 8), (3, 3, 8, 8), (2, 2), PADDING)
    assert conv.select_form(*strided) == conv_forms.static_form(*strided)
    monkeypatch.setenv(conv_autotune.FORM_ENV, "fastest")
    with pytest.raises(ValueError, match="RESNET_JAX_CONV_FORM"):
        conv.select_form(*strided)


def test_cache_is_keyed_by_cpu_jax_version_and_forms_revision(monkeypatch, tmp_path):
    monkeypatch.setenv(conv_autotune.CACHE_DIR_ENV, str(tmp_path))
    name = os.path.basename(conv_autotune.cache_path())
    assert jax.__version__ in name and f"_x{conv_autotune.usable_cpu_count()}_" in name
    assert f"_r{conv_autotune.FORMS_REVISION}_" in name


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_cache_key_counts_the_cores_this_process_may_use(monkeypatch, tmp_path):
    # Under taskset or a cgroup cpuset XLA runs the step on fewer threads: forms timed on every core of the
    # machine are not reused there.
    monkeypatch.setenv(conv_autotune.CACHE_DIR_ENV, str(tmp_path))
    usable = len(os.sched_getaffinity(0))
    all_cores = conv_autotune.cache_path()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert conv_autotune.usable_cpu_count() == 1
    assert conv_autotune.cpu_description().endswith(" x1")
    assert (conv_autotune.cache_path() != all_cores) == (usable > 1)


def test_cache_key_tells_cpu_generations_and_vector_extensions_apart(monkeypatch, tmp_path):
    # Cloud VMs name CPUs of different generations alike ("AMD EPYC"); an AVX2 and an AVX-512 one must not
    # share choices.
    def description(family_model: str, flags: str) -> str:
        cpuinfo = tmp_path / f"cpuinfo_{family_model.replace('/', '_')}"
        cpuinfo.write_text(
            "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\n"
            "model name\t: AMD EPYC\nflags\t\t: {}\n\nprocessor\t: 1\nmodel name\t: other\n".format(
                *family_model.split("/"), flags
            )
        )
        monkeypatch.setattr(conv_autotune, "CPUINFO", str(cpuinfo))
        return conv_autotune.cpu_description()

    zen2 = description("23/49", "fpu sse2 avx fma avx2")
    zen4 = description("25/17", "fpu sse2 avx fma avx2 avx512f avx512bw")
    assert zen2.startswith("AMD EPYC f23m49 avx2 x") and "avx512f" not in zen2
    assert zen4.startswith("AMD EPYC f25m17 avx2 avx512f x")


def test_cache_key_tells_arm_cores_apart(monkeypatch, tmp_path):
    # ARM's /proc/cpuinfo names no model: the implementer and part numbers do (Neoverse N1 0xd0c, V2 0xd4f).
    def description(part: str) -> str:
        cpuinfo = tmp_path / f"cpuinfo_{part}"
        cpuinfo.write_text(
            "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\n"
            f"CPU architecture: 8\nCPU part\t: {part}\n\nprocessor\t: 1\n"
        )
        monkeypatch.setattr(conv_autotune, "CPUINFO", str(cpuinfo))
        return conv_autotune.cpu_description()

    n1, v2 = description("0xd0c"), description("0xd4f")
    assert "impl0x41part0xd0c" in n1 and "impl0x41part0xd4f" in v2


def test_choices_timed_on_an_accelerator_are_kept_apart_from_the_cpus(monkeypatch, tmp_path):
    monkeypatch.setenv(conv_autotune.CACHE_DIR_ENV, str(tmp_path))
    on_cpu = conv_autotune.cache_path()

    class Device:
        device_kind = "NVIDIA H200"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
    assert "NVIDIA_H200" in conv_autotune.cache_path() != on_cpu


def test_unset_means_auto_even_under_pytest(monkeypatch):
    # The library does not look at the test runner: tests/conftest.py sets `static` for the test session.
    monkeypatch.delenv(conv_autotune.FORM_ENV, raising=False)
    assert conv_autotune.mode() == "auto"


def test_auto_in_a_multi_process_run_takes_the_static_choice_without_timing(tuner, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(conv_autotune, "time_forms", no_timing)
    shape = ((2, 32, 32, 8), (3, 3, 8, 8), (1, 1), PADDING)
    assert len(conv_forms.candidate_forms(*shape[1:])) > 1  # one process would time it
    assert conv.select_form(*shape) == conv_forms.static_form(*shape)
    # Tracing a conv in a multi-process run (what jit of a model does) takes the same path: no timing.
    jax.make_jaxpr(lambda x, k: conv.cpu_conv(x, k, (1, 1), PADDING))(
        jnp.ones(shape[0]), jnp.ones(shape[1])
    )
    assert not os.listdir(tuner)


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        "null",
        "not json {",
        '{"KEY": "winograd4"}',
        '{"KEY": {"ms": {"lax": 1.0}}}',
        '{"KEY": {"form": "nosuch", "ms": "CANDIDATES"}}',
        '{"KEY": {"form": "s2d_lax", "ms": "CANDIDATES"}}',
    ],
)
def test_a_cache_file_that_is_not_what_it_wrote_is_timed_again(tuner, content):
    # A hand-edited, truncated or foreign file must not crash every trace: the shape is timed again and the
    # file rewritten with a usable entry.
    shape = ((1, 6, 6, 8), (3, 3, 8, 8), (1, 1), PADDING)
    key = conv_autotune.shape_key(*shape, 1, jnp.float32, False)
    candidates = conv_forms.candidate_forms(*shape[1:], x_shape=shape[0])
    ms = json.dumps(dict.fromkeys(candidates, 1.0))
    path = conv_autotune.cache_path()
    with open(path, "w") as f:
        f.write(content.replace("KEY", key).replace('"CANDIDATES"', ms))
    chosen = conv.select_form(*shape)
    assert chosen in candidates
    with open(path) as f:
        entry = json.load(f)[key]
    assert entry["form"] == chosen and set(entry["ms"]) == set(candidates)


def test_processes_writing_the_cache_at_once_keep_each_others_entries(tmp_path):
    # Two processes adding entries as fast as they can: each write re-reads the table under a file lock.
    script = (
        "import sys; from resnet_jax import conv_autotune as a\n"
        "for i in range(150): a._write_cache(sys.argv[1], f'{sys.argv[2]}{i}', {'form': 'lax', 'ms': {}})\n"
    )
    path = str(tmp_path / "forms.json")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    writers = [
        subprocess.Popen([sys.executable, "-c", script, path, name], env=env) for name in "ab"
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    with open(path) as f:
        assert len(json.load(f)) == 300


def test_candidates_are_forms_that_compute_the_conv():
    # A 1x1 conv is one matmul, except where negative padding crops the map: lax.conv's alone.
    assert conv_forms.candidate_forms((1, 1, 4, 6), (1, 1), ((0, 0), (0, 0))) == ["im2col"]
    assert conv_forms.candidate_forms((1, 1, 4, 6), (1, 1), ((-1, 1), (1, 1))) == ["lax"]
