"""Does an XLA:CPU flag make our train step faster? One subprocess per flag setting, PyTorch as the yardstick.

    python benchmarks/xla_flags.py              # resnet18, 32 px, float32; the flag settings below
    python benchmarks/xla_flags.py --sizes 128 --settings baseline,onednn

XLA_FLAGS are read once when XLA starts, so settings cannot alternate inside one process. Each setting runs
train_step.py in its own process, where our step (with each conv of `--convs`) alternates with PyTorch eager;
comparing the ratio ours / PyTorch across settings cancels most of the drift in machine load between the
processes (PyTorch does not read XLA_FLAGS). Writes `<results_dir>/xla_flags.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

SETTINGS = {
    "baseline": "",
    # oneDNN (what PyTorch uses on x86) for XLA's matmul and convolution fusions.
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    # Single-threaded Eigen kernels (the thread pool still runs independent ops in parallel).
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    # XNNPACK graph fusion of whole subgraphs.
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings", default="baseline,onednn,no_multi_thread_eigen,xnn_graph_greedy"
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--sizes", default="32")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--convs", default="cpu,lax")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for setting in args.settings.split(","):
        flags = SETTINGS[setting]
        name = f"xla_flags_{setting}"
        command = [
            sys.executable,
            os.path.join(here, "train_step.py"),
            f"--models={args.model}",
            f"--sizes={args.sizes}",
            f"--dtypes={args.dtype}",
            f"--convs={args.convs}",
            "--torch_compile=none",
            f"--repeats={args.repeats}",
            f"--steps={args.steps}",
            f"--results_dir={args.results_dir}",
            f"--name={name}",
        ]
        env = dict(os.environ, XLA_FLAGS=flags)
        print(f"== {setting}: XLA_FLAGS={flags!r}", flush=True)
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            error = completed.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"  failed: {error[0][:300]}")
            results[setting] = {"xla_flags": flags, "error": completed.stderr[-2000:]}
            continue
        with open(os.path.join(args.results_dir, f"{name}.json")) as f:
            run = json.load(f)
        os.remove(os.path.join(args.results_dir, f"{name}.json"))
        results[setting] = {"xla_flags": flags, "cases": run["cases"], "machine": run["machine"]}
        for case in run["cases"]:
            ratios = "  ".join(f"{k} {v:.2f}x" for k, v in case["ratios"].items())
            print(f"  {case['model']} {case['image_size']}px: {ratios}", flush=True)
    path = common.write_result(
        args.results_dir,
        "xla_flags",
        {"benchmark": "xla_flags", "args": vars(args), "runs": results},
    )
    print(json.dumps({"wrote": path}))


if __name__ == "__main__":
    main()
