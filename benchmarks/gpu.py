"""ResNet-50 training throughput on GPU, bf16, synthetic data: images/s, achieved TFLOP/s, fraction of peak.

    bash benchmarks/gpu.sh                      # ResNet-50, 224 px, bf16, 256 images per GPU, ~3-5 min
    python benchmarks/gpu.py --dry_run          # the same code path on CPU at a tiny size (a CPU smoke run, ~1-2 min)

Our side is the project's real train step (`resnet_jax.steps.train_step`, compiled by
`resnet_jax.parallel.DataParallel` over every local GPU, state donated, `create_model`'s default conv, i.e.
`nn.Conv`/cuDNN on GPU), SGD with momentum 0.9, one fixed synthetic batch already on the devices (this
measures the step, not the input pipeline). After `--warmup` steps it times `--steps` steps dispatched
back-to-back (as a training loop does) and waits once at the end.

FLOP/s are counted two ways and both printed:
- `xla`: XLA's cost analysis of the compiled train step (per-device program; what the compiler says it runs);
- `3x_forward`: 3 x the forward FLOPs of one image (XLA cost analysis of the inference forward), the usual
  analytic rule for a train step (forward + 2x for the backward). ResNet-50 at 224 px is ~8.2 GFLOP forward
  (4.1 GMACs), so ~24.5 GFLOP per trained image.
The fraction of peak uses the `xla` count when the backend reports it, else `3x_forward`, against
`--peak_tflops` (H200 SXM dense bf16 spec: 989) and `--achievable_tflops` (790: what a large bf16 matmul
reached on this workplace's H200). With `--torch` it also times torchvision's ResNet-50 under
`torch.autocast(bfloat16)`, channels_last, eager, with the same batch and optimizer, for the ratio.
Writes `<results_dir>/gpu.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import common


def cost_flops(compiled) -> float | None:
    """Total FLOPs XLA's cost analysis reports for a compiled computation, or None if unavailable."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it; we fall back to 3x forward
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def time_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from resnet_jax.models import create_model
    from resnet_jax.parallel import DataParallel
    from resnet_jax.steps import train_step
    from resnet_jax.train_state import create_train_state, init_variables

    dtype = common.jax_dtype(args.dtype)
    model = create_model(args.model, num_classes=common.NUM_CLASSES, dtype=dtype)
    tx = optax.sgd(common.LEARNING_RATE, momentum=common.MOMENTUM)
    parallel = DataParallel("shard_map")
    num_devices = parallel.num_devices
    global_batch = args.batch_size * num_devices
    state = parallel.init_state(
        lambda: create_train_state(
            init_variables(model, jax.random.key(0), args.image_size), tx, use_ema=False
        )
    )
    batch = parallel.shard_batch(common.synthetic_batch(global_batch, args.image_size))
    step = parallel.compile(
        functools.partial(
            train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=optax.constant_schedule(common.LEARNING_RATE),
            label_smoothing=0.0,
            ema_decay=0.0,
        ),
        donate_state=True,
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    step_flops_per_device = cost_flops(compiled)

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    one_image = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    forward_flops_per_image = cost_flops(forward.lower(variables, one_image).compile())
    del variables

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds_per_step = (time.perf_counter() - start) / args.steps
    loss = float(jax.device_get(metrics["loss"]))

    images_per_s = global_batch / seconds_per_step
    tflops = {}
    if step_flops_per_device:
        tflops["xla"] = step_flops_per_device / seconds_per_step / 1e12  # per device
    if forward_flops_per_image:
        tflops["3x_forward"] = 3 * forward_flops_per_image * images_per_s / num_devices / 1e12
    basis = "xla" if "xla" in tflops else "3x_forward"
    return {
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "num_devices": num_devices,
        "global_batch": global_batch,
        "compile_s": compile_s,
        "seconds_per_step": seconds_per_step,
        "images_per_s": images_per_s,
        "images_per_s_per_device": images_per_s / num_devices,
        "step_flops_per_device_xla": step_flops_per_device,
        "forward_flops_per_image_xla": forward_flops_per_image,
        "tflops_per_device": tflops,
        "tflops_basis_for_fraction": basis,
        "fraction_of_peak": tflops.get(basis, 0.0) / args.peak_tflops,
        "fraction_of_achievable": tflops.get(basis, 0.0) / args.achievable_tflops,
        "final_loss": loss,
    }


def time_torch(args: argparse.Namespace) -> dict:
    """torchvision's model on one device (cuda when available), autocast bf16, channels_last, eager."""
    import torch
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = getattr(torchvision.models, args.model)(num_classes=common.NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=common.LEARNING_RATE, momentum=common.MOMENTUM
    )
    batch = common.synthetic_batch(args.batch_size, args.image_size)
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(batch["label"].astype("int64")).to(device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype, enabled=args.dtype == "bfloat16"):
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        run()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        run()
    synchronize()
    seconds_per_step = (time.perf_counter() - start) / args.steps
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "seconds_per_step": seconds_per_step,
        "images_per_s": args.batch_size / seconds_per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=256, help="per device")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--achievable_tflops", type=float, default=790.0)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="CPU-sized check of the whole path: 32 px, 2 images, 1 warmup + 1 timed step",
    )
    args = parser.parse_args()
    if args.dry_run:
        args.image_size, args.batch_size, args.warmup, args.steps = 32, 2, 1, 1
    ours = time_jax(args)
    result = {"benchmark": "gpu", "args": vars(args), "ours": ours}
    tflops = ", ".join(f"{v:.1f} ({k})" for k, v in ours["tflops_per_device"].items())
    print(
        f"ours: {args.model} {args.image_size}px {args.dtype}, {ours['num_devices']} x "
        f"{ours['device_kind']}, global batch {ours['global_batch']}: {ours['images_per_s']:.1f} "
        f"images/s ({ours['images_per_s_per_device']:.1f} per device), compile {ours['compile_s']:.1f} s"
    )
    print(
        f"  TFLOP/s per device: {tflops or 'n/a'}; fraction of peak {args.peak_tflops:.0f}: "
        f"{ours['fraction_of_peak']:.3f}, of achievable {args.achievable_tflops:.0f}: "
        f"{ours['fraction_of_achievable']:.3f} (basis: {ours['tflops_basis_for_fraction']})"
    )
    if args.torch:
        theirs = time_torch(args)
        result["torch_eager"] = theirs
        result["ratio_ours_per_device_over_torch"] = (
            ours["images_per_s_per_device"] / theirs["images_per_s"]
        )
        print(
            f"torch eager ({theirs['device']}, channels_last, autocast): {theirs['images_per_s']:.1f} "
            f"images/s; ratio ours (per device) / torch: {result['ratio_ours_per_device_over_torch']:.2f}"
        )
    name = "gpu_dry_run" if args.dry_run else "gpu"
    path = common.write_result(args.results_dir, name, result)
    print(json.dumps({"wrote": path}))


if __name__ == "__main__":
    main()
