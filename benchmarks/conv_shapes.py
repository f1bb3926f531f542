"""Each of ResNet's conv shapes alone on XLA:CPU: lax.conv vs the forms of resnet_jax.conv, forward + gradients.

    python benchmarks/conv_shapes.py                  # resnet18's 3x3/7x7 shapes at 32 and 128 px input, batch 16
    python benchmarks/conv_shapes.py --batch_size 32

For every shape it jits `grad(sum(conv(x, w)**2))` w.r.t. the kernel only (what a train step needs; the
stem's input gradient is never computed) and w.r.t. kernel and input (every other layer), for three forms:
`lax` (`lax.conv_general_dilated`, what `nn.Conv` runs), `tap_grad` (lax forward and input gradient, per-tap
matmul kernel gradient) and `im2col` (patch matrix + one matmul, dead taps skipped). Runs alternate; medians
of `--repeats`. This is the evidence behind `CpuConv`'s choice per shape. Writes `<results_dir>/conv_shapes.json`.
"""

from __future__ import annotations

import argparse

import common


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from resnet_jax.conv import conv_with_tap_kernel_grad, im2col_conv, lax_conv

    forms = {"lax": lax_conv, "tap_grad": conv_with_tap_kernel_grad, "im2col": im2col_conv}
    # (input map, in channels, out channels, kernel, stride, padding): resnet18 at 128 px, then at 32 px.
    shapes = [
        (128, 3, 64, 7, 2, 3),
        (32, 64, 64, 3, 1, 1),
        (32, 64, 128, 3, 2, 1),
        (16, 128, 128, 3, 1, 1),
        (16, 128, 256, 3, 2, 1),
        (8, 256, 256, 3, 1, 1),
        (8, 256, 512, 3, 2, 1),
        (4, 512, 512, 3, 1, 1),
        (4, 256, 512, 3, 2, 1),
        (2, 512, 512, 3, 1, 1),
    ]
    machine = common.machine_description()
    print(common.describe_machine_line(machine), flush=True)
    rows = []
    for size, cin, cout, k, s, p in shapes:
        x = jax.random.normal(jax.random.key(0), (args.batch_size, size, size, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.01
        argnums = (0,) if cin == 3 else (0, 1)  # the stem's input needs no gradient
        runners = {}
        for name, form in forms.items():

            def loss(w, x, form=form, strides=(s, s), padding=((p, p), (p, p))):
                return jnp.sum(form(x, w, strides, padding) ** 2)

            grad = jax.jit(jax.grad(loss, argnums=argnums))

            def run(grad=grad, w=w, x=x):
                jax.block_until_ready(grad(w, x))

            run()
            runners[name] = run
        times = common.alternate(runners, args.repeats, 1)
        ms = {name: 1e3 * common.median(t) for name, t in times.items()}
        label = f"{size}x{size} {cin}->{cout} {k}x{k}/{s}"
        grads = "kernel" if argnums == (0,) else "kernel+input"
        print(
            f"  {label:24s} fwd+grad({grads:12s}) "
            + "  ".join(f"{n} {v:7.1f} ms" for n, v in ms.items())
        )
        rows.append(
            dict(map=size, cin=cin, cout=cout, kernel=k, stride=s, padding=p, grads=grads, ms=ms)
        )
    path = common.write_result(
        args.results_dir,
        "conv_shapes",
        {"benchmark": "conv_shapes", "args": vars(args), "machine": machine, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
