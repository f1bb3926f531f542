"""Train-step throughput (images/s): our jitted step vs torchvision + PyTorch, side by side, on this machine.

    python benchmarks/train_step.py            # resnet18/resnet50 x 32/128 px, float32
    python benchmarks/train_step.py --dtypes bfloat16 --models resnet18 --sizes 32 --torch_compile none
    python benchmarks/train_step.py --quick    # resnet18 at 32 px, float32 only
    python benchmarks/train_step.py --models resnet18 --sizes 128 --dtypes float32 --convs default,lax

For each case (model, image size, dtype) it builds, in this one process: our step (the project's
`resnet_jax.steps.train_step`, compiled by `resnet_jax.parallel.DataParallel`, with the conv implementation(s)
of `--convs`), PyTorch eager, and `torch.compile` (for the models of `--torch_compile` at the sizes of
`--torch_compile_sizes`, by default resnet18 at 32 px only: its first compile took 3.5 min on the loaded
2-core machine). It then alternates runs of all of them, `--warmup_rounds` untimed rounds and `--repeats`
timed ones (each run takes at least `--steps` steps and `--min_run_seconds`, so that a 70 ms step is not
judged by two calls), and prints the
median images/s and the ratio ours / PyTorch (above 1: we are faster). See common.py for the rules that make
the comparison fair. Writes `<results_dir>/train_step.json`.

Duration on a 2-core machine: the default run took 2.5-3 min with compilation caches warm; a first run adds the
compiles (measured 0.5-2 min per step on a loaded 2-core machine; JAX's persistent cache, `--compilation_cache_dir`,
and torch inductor's cache make later runs skip them).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import time

import common


def parse_args(doc: str = __doc__, name: str = "train_step") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--sizes", default="32,128", help="image sizes (square), comma-separated")
    # bfloat16 is opt-in: on a CPU without AVX512-BF16 (as here) PyTorch's bf16 autocast train step runs
    # ~60x slower than its float32 one (1.5 vs 90 images/s, resnet18 32 px), so one bf16 case at 128 px
    # takes PyTorch many minutes.
    parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=0,
        help="per step; 0: 32 at sizes <= 64, else 16",
    )
    parser.add_argument(
        "--convs",
        default="default",
        help="our conv implementations to time: default (create_model's per-platform choice), cpu "
        "(resnet_jax.conv.CpuConv), lax (flax nn.Conv); comma-separated",
    )
    parser.add_argument(
        "--torch_compile",
        default="resnet18",
        help="models to also time under torch.compile: a comma-separated list, 'all' or 'none'",
    )
    parser.add_argument(
        "--torch_compile_sizes",
        default="32",
        help="image sizes at which those models are also compiled (each compile takes minutes here)",
    )
    parser.add_argument(
        "--compilation_cache_dir",
        default=os.path.join(common.REPO_ROOT, ".jax_cache"),
        help="JAX persistent compilation cache for our steps ('' disables); speeds up re-runs only",
    )
    parser.add_argument(
        "--host_memory",
        default="retain",
        choices=("retain", "default"),
        help="retain: malloc keeps freed memory, as train.py sets it on CPU (resnet_jax.host_memory), for "
        "both frameworks; default: glibc's defaults",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--warmup_rounds",
        type=int,
        default=1,
        help="untimed rounds of every runner before the timed ones (first runs of large models are slow)",
    )
    parser.add_argument("--steps", type=int, default=2, help="calls per timed run, at least")
    parser.add_argument(
        "--min_run_seconds",
        type=float,
        default=1.0,
        help="each timed run repeats its calls for at least this long (0: exactly --steps calls)",
    )
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--name", default=name, help="file name of the JSON result (.json is added if missing)"
    )
    parser.add_argument("--quick", action="store_true", help="resnet18, 32 px, float32, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.dtypes, args.repeats = "resnet18", "32", "float32", 3
    return args


def default_batch_size(image_size: int) -> int:
    return 32 if image_size <= 64 else 16


def run_cases(args: argparse.Namespace, mode: str) -> None:
    """Times every case of `args` for `mode` ('train' or 'eval'), prints, and writes the JSON result."""
    host_memory = common.set_host_memory(args.host_memory)  # before JAX's backend and torch start
    if args.compilation_cache_dir:
        common.enable_compilation_cache(args.compilation_cache_dir)
    build_ours = common.jax_train_runner if mode == "train" else common.jax_eval_runner
    build_torch = common.torch_train_runner if mode == "train" else common.torch_eval_runner
    machine = {**common.machine_description(), "host_memory": host_memory}
    print(common.describe_machine_line(machine), flush=True)
    print(f"host memory: {host_memory}", flush=True)
    compile_ok, compile_error = common.torch_compile_works()
    compile_models = {
        "all": set(args.models.split(",")),
        "none": set(),
    }.get(args.torch_compile, set(args.torch_compile.split(",")))
    if not compile_ok:
        print(f"torch.compile does not work here ({compile_error}); timing eager PyTorch only")
        compile_models = set()
    cases = []
    for model_name, size, dtype in itertools.product(
        args.models.split(","), [int(s) for s in args.sizes.split(",")], args.dtypes.split(",")
    ):
        batch_size = args.batch_size or default_batch_size(size)
        print(f"\n== {mode} {model_name} {size}x{size} {dtype} batch {batch_size}", flush=True)
        runners, build_seconds = {}, {}
        for conv in args.convs.split(","):
            start = time.perf_counter()
            runners[f"ours[{conv}]"] = build_ours(model_name, size, batch_size, dtype, conv=conv)
            build_seconds[f"ours[{conv}]"] = time.perf_counter() - start
        start = time.perf_counter()
        runners["torch_eager"] = build_torch(model_name, size, batch_size, dtype)
        build_seconds["torch_eager"] = time.perf_counter() - start
        if model_name in compile_models and str(size) in args.torch_compile_sizes.split(","):
            start = time.perf_counter()
            runners["torch_compile"] = build_torch(
                model_name, size, batch_size, dtype, compile_model=True
            )
            build_seconds["torch_compile"] = time.perf_counter() - start
        for name, seconds in build_seconds.items():
            print(f"  built {name} (incl. compile and first call) in {seconds:.1f} s", flush=True)
        times = common.alternate(
            runners, args.repeats, args.steps, args.min_run_seconds, args.warmup_rounds
        )
        images_per_s = {name: batch_size / common.median(t) for name, t in times.items()}
        ratios = {}
        for ours in (n for n in runners if n.startswith("ours")):
            for theirs in (n for n in runners if n.startswith("torch")):
                ratios[f"{ours}/{theirs}"] = images_per_s[ours] / images_per_s[theirs]
        for name, value in images_per_s.items():
            spread = [batch_size / t for t in times[name]]
            print(
                f"  {name:20s} {value:8.1f} images/s  (runs: {min(spread):.1f}-{max(spread):.1f})"
            )
        for name, value in ratios.items():
            print(f"  ratio {name:34s} {value:5.2f}x")
        cases.append(
            {
                "model": model_name,
                "image_size": size,
                "dtype": dtype,
                "batch_size": batch_size,
                "images_per_s": images_per_s,
                "seconds_per_call_runs": times,
                "ratios": ratios,
                "build_seconds": build_seconds,
            }
        )
        del runners
        gc.collect()
        # Written after every case, so an interrupted run keeps what it measured.
        machine["load_average_1m_end"] = os.getloadavg()[0]
        path = common.write_result(
            args.results_dir,
            args.name,
            {"benchmark": mode, "args": vars(args), "machine": machine, "cases": cases},
        )
    print(f"\nwrote {path}")


def main() -> None:
    run_cases(parse_args(), "train")


if __name__ == "__main__":
    main()
