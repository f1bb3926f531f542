"""Compile time of our train step (cold, and from JAX's persistent compilation cache) and peak host memory.

    python benchmarks/compile_memory.py            # resnet18 and resnet50 at 32 px, float32
    python benchmarks/compile_memory.py --quick    # resnet18 only

Each figure comes from a fresh Python process, because an in-process cache would hide compile work and peak
memory is a property of the whole process:
- cold: `jit(step).lower(state, batch).compile()` with an empty persistent cache directory (what a first run
  pays; the cache is written on the way);
- cached: the same in a second process over the now-filled cache directory (what every later run pays);
- peak host memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` after compiling and `--steps` train steps,
  for our step and, in its own process, for PyTorch's eager step on the same model and batch.
Writes `<results_dir>/compile_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import common

# Runs in a fresh interpreter; prints one JSON object on its last line.
OURS = """
import json, resource, time, functools
import jax, optax
cache_dir = {cache_dir!r}
if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from benchmarks import common
from resnet_jax.models import create_model
from resnet_jax.parallel import DataParallel
from resnet_jax.steps import train_step
from resnet_jax.train_state import create_train_state, init_variables

start = time.perf_counter()
model = create_model({model!r}, num_classes=common.NUM_CLASSES, conv=common.conv_module({conv!r}))
tx = optax.sgd(common.LEARNING_RATE, momentum=common.MOMENTUM)
parallel = DataParallel("shard_map")
state = parallel.init_state(
    lambda: create_train_state(init_variables(model, jax.random.key(0), {size}), tx, use_ema=False)
)
batch = parallel.shard_batch(common.synthetic_batch({batch_size}, {size}))
step = parallel.compile(
    functools.partial(
        train_step, apply_fn=model.apply, tx=tx,
        learning_rate_fn=optax.constant_schedule(common.LEARNING_RATE),
        label_smoothing=0.0, ema_decay=0.0,
    ),
    donate_state=True,
)
jax.block_until_ready(state)
setup_s = time.perf_counter() - start
start = time.perf_counter()
lowered = step.lower(state, batch)
lower_s = time.perf_counter() - start
start = time.perf_counter()
compiled = lowered.compile()
compile_s = time.perf_counter() - start
for _ in range({steps}):
    state, metrics = compiled(state, batch)
jax.block_until_ready((state, metrics))
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(setup_s=setup_s, lower_s=lower_s, compile_s=compile_s, peak_rss_mib=peak_mib)))
"""

TORCH = """
import json, resource
from benchmarks import common
run = common.torch_train_runner({model!r}, {size}, {batch_size})
for _ in range({steps}):
    run()
print(json.dumps(dict(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--conv", default="default", help="see common.conv_module")
    parser.add_argument(
        "--steps", type=int, default=2, help="train steps before reading peak memory"
    )
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="resnet18 only")
    args = parser.parse_args()
    if args.quick:
        args.models = "resnet18"
    machine = common.machine_description()
    print(common.describe_machine_line(machine), flush=True)
    cases = []
    for model_name in args.models.split(","):
        fields = dict(
            model=model_name,
            size=args.size,
            batch_size=args.batch_size,
            conv=args.conv,
            steps=args.steps,
        )
        with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache_dir:
            cold = common.run_python_subprocess(OURS.format(cache_dir=cache_dir, **fields))
            cached = common.run_python_subprocess(OURS.format(cache_dir=cache_dir, **fields))
        torch_fields = {k: fields[k] for k in ("model", "size", "batch_size", "steps")}
        torch_memory = common.run_python_subprocess(TORCH.format(**torch_fields))
        case = {
            **fields,
            "cold": cold,
            "cached": cached,
            "compile_speedup_from_cache": cold["compile_s"] / max(cached["compile_s"], 1e-9),
            "torch_eager_peak_rss_mib": torch_memory["peak_rss_mib"],
            "peak_rss_ratio_ours_over_torch": cold["peak_rss_mib"] / torch_memory["peak_rss_mib"],
        }
        cases.append(case)
        print(
            f"{model_name} {args.size}x{args.size} batch {args.batch_size}: compile cold "
            f"{cold['compile_s']:.1f} s (+ trace/lower {cold['lower_s']:.1f} s), cached "
            f"{cached['compile_s']:.1f} s ({case['compile_speedup_from_cache']:.1f}x faster); peak "
            f"host memory ours {cold['peak_rss_mib']:.0f} MiB vs PyTorch eager "
            f"{torch_memory['peak_rss_mib']:.0f} MiB (ratio {case['peak_rss_ratio_ours_over_torch']:.2f})",
            flush=True,
        )
    path = common.write_result(
        args.results_dir,
        "compile_memory",
        {"benchmark": "compile_memory", "args": vars(args), "machine": machine, "cases": cases},
    )
    print(json.dumps({"wrote": path}))


if __name__ == "__main__":
    main()
