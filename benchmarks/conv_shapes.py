"""Each of ResNet's conv shapes alone: the forms of resnet_jax.conv_forms on XLA:CPU vs PyTorch, forward + gradients.

    python benchmarks/conv_shapes.py                         # resnet50's 3x3/7x7 convs at 128 px, batch 16
    python benchmarks/conv_shapes.py --shapes resnet18_32 --batch_size 32
    python benchmarks/conv_shapes.py --forms lax,winograd4 --no_torch

For every shape it jits `grad(sum(conv(x, w)**2))` w.r.t. the kernel only (the stem: its input gradient is
never computed in a train step) or w.r.t. kernel and input (every other layer), for each form of
`resnet_jax.conv_forms.FORMS` that can compute the shape (`--forms`), and times the same with `torch.nn.functional
.conv2d` and `backward()` (PyTorch eager, what a torchvision train step runs). Runs alternate in one process;
medians of `--repeats`. This is the evidence behind `CpuConv`'s forms and the autotuner's candidates. Writes
`<results_dir>/conv_shapes_<shapes>.json`.
"""

from __future__ import annotations

import argparse

import common

# (input map, in channels, out channels, kernel, stride, padding) of the distinct non-1x1 convs.
SHAPES = {
    "resnet50_128": [
        (128, 3, 64, 7, 2, 3),
        (32, 64, 64, 3, 1, 1),
        (32, 128, 128, 3, 2, 1),
        (16, 128, 128, 3, 1, 1),
        (16, 256, 256, 3, 2, 1),
        (8, 256, 256, 3, 1, 1),
        (8, 512, 512, 3, 2, 1),
        (4, 512, 512, 3, 1, 1),
    ],
    "resnet18_128": [
        (128, 3, 64, 7, 2, 3),
        (32, 64, 64, 3, 1, 1),
        (32, 64, 128, 3, 2, 1),
        (16, 128, 128, 3, 1, 1),
        (16, 128, 256, 3, 2, 1),
        (8, 256, 256, 3, 1, 1),
        (8, 256, 512, 3, 2, 1),
        (4, 512, 512, 3, 1, 1),
    ],
    "resnet18_32": [
        (32, 3, 64, 7, 2, 3),
        (8, 64, 64, 3, 1, 1),
        (8, 64, 128, 3, 2, 1),
        (4, 128, 128, 3, 1, 1),
        (4, 128, 256, 3, 2, 1),
        (2, 256, 256, 3, 1, 1),
        (2, 256, 512, 3, 2, 1),
        (1, 512, 512, 3, 1, 1),
    ],
}


def torch_runner(batch_size, size, cin, cout, k, s, p, kernel_only):
    import torch

    x = torch.randn(batch_size, cin, size, size, requires_grad=not kernel_only)
    w = (torch.randn(cout, cin, k, k) * 0.01).requires_grad_()

    def run():
        x.grad = w.grad = None
        y = torch.nn.functional.conv2d(x, w, stride=s, padding=p)
        (y * y).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="resnet50_128", help=f"one of {sorted(SHAPES)}")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--forms", default="", help="comma-separated; default: all")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from resnet_jax.conv_forms import FORMS, form_supports

    forms = args.forms.split(",") if args.forms else list(FORMS)
    machine = common.machine_description()
    print(common.describe_machine_line(machine), flush=True)
    rows = []
    for size, cin, cout, k, s, p in SHAPES[args.shapes]:
        x = jax.random.normal(jax.random.key(0), (args.batch_size, size, size, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.01
        kernel_only = cin == 3  # the stem's input needs no gradient
        argnums = (0,) if kernel_only else (0, 1)
        strides, padding = (s, s), ((p, p), (p, p))
        runners = {}
        for name in forms:
            if not form_supports(name, w.shape, strides, padding, 1):
                continue

            def loss(w, x, form=FORMS[name], strides=strides, padding=padding):
                return jnp.sum(form(x, w, strides, padding) ** 2)

            grad = jax.jit(jax.grad(loss, argnums=argnums))

            def run(grad=grad, w=w, x=x):
                jax.block_until_ready(grad(w, x))

            run()
            runners[name] = run
        if not args.no_torch:
            runners["torch"] = torch_runner(args.batch_size, size, cin, cout, k, s, p, kernel_only)
            runners["torch"]()
        times = common.alternate(runners, args.repeats, 1)
        ms = {name: 1e3 * common.median(t) for name, t in times.items()}
        label = f"{size}x{size} {cin}->{cout} {k}x{k}/{s}"
        print(f"  {label:24s} " + "  ".join(f"{n} {v:7.1f}" for n, v in ms.items()), flush=True)
        grads = "kernel" if kernel_only else "kernel+input"
        rows.append(
            dict(map=size, cin=cin, cout=cout, kernel=k, stride=s, padding=p, grads=grads, ms=ms)
        )
    machine["load_average_1m_end"] = common.os.getloadavg()[0]
    path = common.write_result(
        args.results_dir,
        f"conv_shapes_{args.shapes}",
        {"benchmark": "conv_shapes", "args": vars(args), "machine": machine, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
