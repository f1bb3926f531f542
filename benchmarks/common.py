"""What every benchmark here shares: the two train steps (ours, torchvision's), timing, and the JSON result.

Fairness rules, applied everywhere:
- the same network (torchvision's layer for layer; parameter counts are tested equal), batch, resolution,
  synthetic data and optimizer (SGD, momentum 0.9, no weight decay) on both sides;
- our side is the project's real train step (`resnet_jax.steps.train_step` compiled by
  `resnet_jax.parallel.DataParallel`, state donated); PyTorch's is the textbook eager loop
  (`zero_grad`, forward, cross-entropy, `backward`, `step`), optionally under `torch.compile`;
- bf16 means our model's `dtype=jnp.bfloat16` (params, BN and loss in float32) against
  `torch.autocast("cpu", torch.bfloat16)` (the same mixed-precision policy);
- runs alternate A, B, A, B... in one process, so load from other processes on a shared machine hits both
  sides alike, and each figure is the median over repeats;
- the process's malloc is set up as `train.py` sets it up on CPU (`set_host_memory`): both frameworks then
  allocate from the same retained heap (PyTorch's CPU tensors page-fault too under glibc's defaults).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# PyTorch's OpenMP workers spin while waiting for each other by default. On a machine shared with other jobs
# a spinning worker whose partner lost its core stalls every op: measured here, resnet18's train step ran at
# 4 images/s with 2 spinning threads and 28 with OMP_WAIT_POLICY=PASSIVE under the same load. Passive waiting
# is what a shared machine calls for; set OMP_WAIT_POLICY=ACTIVE yourself on a dedicated one. It must be set
# before torch is imported; XLA's own thread pool does not read it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DEFAULT_RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
NUM_CLASSES = 1000
LEARNING_RATE = 0.1
MOMENTUM = 0.9

Runner = Callable[[], None]


def machine_description() -> dict[str, Any]:
    """CPU model, cores, load and library versions: what a reader needs to place a figure."""
    import jax
    import torch

    from resnet_jax import conv_autotune

    fields = conv_autotune.cpuinfo_fields()
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    # The vector extensions that decide which conv form and matmul kernels win.
    flags = sorted(
        flag
        for flag in fields.get("flags", "").split()
        if flag.startswith(("avx", "fma", "amx")) or flag == "f16c"
    )
    return {
        "cpu": cpu,
        # Model name, family/model numbers and vector extensions: VMs name different generations alike
        # ("AMD EPYC" for an AVX2 Zen 2 and an AVX-512 Zen 4).
        "cpu_description": conv_autotune.cpu_description(),
        "cpu_flags": " ".join(flags),
        "cpu_count": os.cpu_count(),
        # The cores this process may use (taskset, cgroup cpuset): what XLA and PyTorch size their pools by.
        "cpu_count_usable": conv_autotune.usable_cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # How CpuConv chose its forms: the mode and the file of timed choices (per CPU model and jax version).
        "conv_form_mode": conv_autotune.mode(),
        "conv_forms_cache": conv_autotune.cache_path(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


def set_host_memory(mode: str) -> str:
    """Sets the process's malloc as `train.py` does on CPU ('retain': `resnet_jax.host_memory`) or leaves
    glibc's defaults ('default'); returns what is in effect, for the JSON result. Call before JAX's
    backend starts, as train.py does."""
    from resnet_jax import host_memory

    if mode == "default":
        return "glibc defaults"
    if mode != "retain":
        raise ValueError(f"host memory mode {mode!r}: use 'retain' or 'default'")
    if host_memory.retain_freed_memory():
        return (
            "retained (resnet_jax.host_memory: mmap_max 0, trim_threshold 2 GiB, sync CPU dispatch)"
        )
    return f"left as is ({host_memory.reason_to_leave_alone() or 'glibc refused mallopt'})"


def enable_compilation_cache(cache_dir: str) -> None:
    """JAX's persistent compilation cache: later runs of the same benchmark skip XLA compilation."""
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def describe_machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine.get('cpu_description', machine['cpu'])} ({machine.get('cpu_flags', '')}), "
        f"{machine.get('cpu_count_usable', machine['cpu_count'])} of {machine['cpu_count']} cores "
        f"(load {machine['load_average_1m']:.1f}), "
        f"jax {machine['jax']} ({machine['jax_backend']}), torch {machine['torch']} "
        f"({machine['torch_threads']} threads)"
    )


# -- our side ------------------------------------------------------------------------------------------------


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def conv_module(name: str):
    """'default' (the per-platform choice of `create_model`), 'cpu' (CpuConv), 'lax' (flax nn.Conv), or
    'cpu_lax_grad' (CpuConv keeping XLA's kernel gradient for large maps: what the per-tap gradient buys)."""
    from flax import linen as nn

    from resnet_jax.conv import CpuConv, default_conv

    return {
        "default": default_conv(),
        "cpu": CpuConv,
        "lax": nn.Conv,
        "cpu_lax_grad": functools.partial(CpuConv, tap_kernel_grad=False),
    }[name]


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Normalized-looking NHWC float32 images and integer labels, as numpy (the same for both frameworks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=(batch_size,)).astype(np.int32),
    }


def jax_train_runner(
    model_name: str,
    image_size: int,
    batch_size: int,
    dtype: str = "float32",
    conv: str = "default",
    devices: list | None = None,
) -> Runner:
    """One call = one update of our real train step on a fixed synthetic batch, waited for.

    Compiles on construction (the first call is not timed by the callers). With `devices`, the step runs
    data-parallel over them and `batch_size` is the global batch.
    """
    import jax
    import optax

    from resnet_jax.models import create_model
    from resnet_jax.parallel import DataParallel
    from resnet_jax.steps import train_step
    from resnet_jax.train_state import create_train_state, init_variables

    model = create_model(
        model_name, num_classes=NUM_CLASSES, dtype=jax_dtype(dtype), conv=conv_module(conv)
    )
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    parallel = DataParallel("shard_map", devices=devices)
    state = parallel.init_state(
        lambda: create_train_state(
            init_variables(model, jax.random.key(0), image_size), tx, use_ema=False
        )
    )
    step = parallel.compile(
        functools.partial(
            train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=optax.constant_schedule(LEARNING_RATE),
            label_smoothing=0.0,
            ema_decay=0.0,
        ),
        donate_state=True,
    )
    batch = parallel.shard_batch(synthetic_batch(batch_size, image_size))
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    run()
    return run


def jax_eval_runner(
    model_name: str, image_size: int, batch_size: int, dtype: str = "float32", conv: str = "default"
) -> Runner:
    """One call = one jitted inference forward (train=False) on a fixed batch, waited for."""
    import jax
    import jax.numpy as jnp

    from resnet_jax.models import create_model
    from resnet_jax.train_state import init_variables

    model = create_model(
        model_name, num_classes=NUM_CLASSES, dtype=jax_dtype(dtype), conv=conv_module(conv)
    )
    variables = init_variables(model, jax.random.key(0), image_size)
    images = jnp.asarray(synthetic_batch(batch_size, image_size)["image"])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def run() -> None:
        jax.block_until_ready(forward(variables, images))

    run()
    return run


# -- PyTorch's side ------------------------------------------------------------------------------------------


def torch_train_runner(
    model_name: str,
    image_size: int,
    batch_size: int,
    dtype: str = "float32",
    compile_model: bool = False,
    channels_last: bool = False,
) -> Runner:
    """One call = one torchvision train step (eager, or `torch.compile`d) on a fixed batch."""
    import torch
    import torchvision

    model = getattr(torchvision.models, model_name)(num_classes=NUM_CLASSES)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    batch = synthetic_batch(batch_size, image_size)
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(batch["label"].astype("int64"))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = images.contiguous(memory_format=memory_format)
    forward = torch.compile(model) if compile_model else model
    autocast = dtype == "bfloat16"

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()

    run()
    return run


def torch_eval_runner(
    model_name: str,
    image_size: int,
    batch_size: int,
    dtype: str = "float32",
    compile_model: bool = False,
) -> Runner:
    import torch
    import torchvision

    model = getattr(torchvision.models, model_name)(num_classes=NUM_CLASSES).eval()
    images = torch.from_numpy(
        synthetic_batch(batch_size, image_size)["image"].transpose(0, 3, 1, 2).copy()
    )
    forward = torch.compile(model) if compile_model else model
    autocast = dtype == "bfloat16"

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            forward(images)

    run()
    return run


def torch_compile_works() -> tuple[bool, str]:
    """Whether `torch.compile` can build a CPU kernel here (it needs a working C++ compiler)."""
    import torch

    try:
        f = torch.compile(lambda x: torch.relu(x) * 2.0)
        f(torch.ones(4))
        return True, ""
    except Exception as error:  # noqa: BLE001 - any failure means "not available here"; we report it
        return False, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


# -- timing --------------------------------------------------------------------------------------------------


def alternate(
    runners: dict[str, Runner],
    repeats: int,
    steps: int,
    min_seconds: float = 0.0,
    warmup_rounds: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each runner: `repeats` rounds, each timing every runner in turn for at least `steps`
    calls and at least `min_seconds` (a run of a few short calls is at the mercy of one scheduler hiccup on a
    shared VM), after `warmup_rounds` untimed rounds of the same.

    Alternating within each round (and rotating who goes first) spreads load from other processes over all
    runners alike; compare medians. Warm-up: the first runs of a large model were slower than the rest for both
    frameworks (AMD EPYC Zen 5: our ResNeXt-101 at 64 px 14, 20, then 27 images/s; our resnet50 128 px step
    0.88 s, then 0.47-0.62 s; PyTorch's 0.95 s, then 0.65-0.78 s).
    """
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(-warmup_rounds, repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            calls = 0
            start = time.perf_counter()
            while calls < steps or time.perf_counter() - start < min_seconds:
                runners[name]()
                calls += 1
            if round_index >= 0:
                times[name].append((time.perf_counter() - start) / calls)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(results_dir: str, name: str, payload: dict[str, Any]) -> str:
    """Writes `payload` as `<results_dir>/<name>.json` (`name` may already end in `.json`); returns the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, name if name.endswith(".json") else f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def run_python_subprocess(
    code: str, env_extra: dict[str, str] | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Runs `code` in a fresh interpreter (cwd: the repo) and parses the JSON object on its last stdout line.

    Fresh processes are how compile time (nothing cached in memory), peak memory (getrusage covers the whole
    process) and device counts (XLA_FLAGS is read once at start-up) are measured honestly.
    """
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"benchmark subprocess failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])
