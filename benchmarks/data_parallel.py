"""Data-parallel overhead: our train step on 1 vs 8 simulated CPU devices, same per-device batch.

    python benchmarks/data_parallel.py           # resnet18, 32 px, 4 images per device
    python benchmarks/data_parallel.py --quick   # fewer repeats

All runs happen in one process started with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (set here
for a subprocess only), alternating:
- `1 device, B`: the step on one device with the per-device batch B;
- `1 device, 8B`: one device with the global batch 8B (the same arithmetic as 8 devices, no collectives);
- `8 devices, 8B`: the real data-parallel step (shard_map over a mesh of 8, gradients and BatchNorm
  statistics all-reduced), B per device.
The simulated devices share this machine's cores, so 8 devices cannot be 8x faster: the overhead of data
parallelism is `time(8 devices, 8B) / time(1 device, 8B)` (1.0 = free: partitioning and all-reduces cost
nothing); `time(8 devices, 8B) / (8 * time(1 device, B))` is also printed. Writes
`<results_dir>/data_parallel.json`.
"""

from __future__ import annotations

import argparse
import json

import common

CODE = """
import json, jax
from benchmarks import common
devices = jax.devices()
assert len(devices) == 8, devices
b = {per_device_batch}
runners = {{
    "1 device, B": common.jax_train_runner({model!r}, {size}, b, conv={conv!r}, devices=devices[:1]),
    "1 device, 8B": common.jax_train_runner({model!r}, {size}, 8 * b, conv={conv!r}, devices=devices[:1]),
    "8 devices, 8B": common.jax_train_runner({model!r}, {size}, 8 * b, conv={conv!r}, devices=devices),
}}
times = common.alternate(runners, {repeats}, {steps})
print(json.dumps({{name: common.median(t) for name, t in times.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--conv", default="default", help="see common.conv_module")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 step")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 1
    machine = common.machine_description()
    print(common.describe_machine_line(machine), flush=True)
    seconds = common.run_python_subprocess(
        CODE.format(**vars(args)),
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    b = args.per_device_batch
    images_per_s = {name: (b if name.endswith(", B") else 8 * b) / s for name, s in seconds.items()}
    overhead = seconds["8 devices, 8B"] / seconds["1 device, 8B"]
    scaling = seconds["8 devices, 8B"] / (8 * seconds["1 device, B"])
    for name, s in seconds.items():
        print(f"  {name:14s} {s * 1e3:8.1f} ms/step  {images_per_s[name]:8.1f} images/s")
    print(f"  data-parallel overhead time(8 dev, 8B) / time(1 dev, 8B) = {overhead:.2f}")
    print(f"  time(8 dev, 8B) / (8 x time(1 dev, B)) = {scaling:.2f}")
    path = common.write_result(
        args.results_dir,
        "data_parallel",
        {
            "benchmark": "data_parallel",
            "args": vars(args),
            "machine": machine,
            "seconds_per_step": seconds,
            "images_per_s": images_per_s,
            "overhead_8dev_over_1dev_same_global_batch": overhead,
            "time_8dev_over_8x_1dev_per_device_batch": scaling,
        },
    )
    print(json.dumps({"wrote": path}))


if __name__ == "__main__":
    main()
