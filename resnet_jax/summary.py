"""How big a ResNet is before you train it: parameters, multiply-accumulates per image, per-stage shapes.

    python -m resnet_jax.summary resnet50                 # 224x224, 1000 classes
    python -m resnet_jax.summary cifar_resnet56           # 32x32, 10 classes
    python -m resnet_jax.summary all --markdown           # the README's model table

Nothing is computed on real data: shapes come from `jax.eval_shape`, and MACs are counted from the
shapes of every convolution and matmul in the traced eval forward pass (`jax.make_jaxpr`), attributed to
the stem, each stage and the classifier through the module names JAX records in the trace.

Convention: one MAC (multiply-accumulate) is one multiplication and one addition of a conv or dense layer,
taps that fall in the zero padding included; FLOPs = 2 x MACs. The count is the architecture's, not the
backend's: the model is always traced with flax's `nn.Conv` (`lax.conv_general_dilated`), because the conv
the CPU backend runs by default (`resnet_jax.conv.CpuConv`) skips taps that read only padding on small
maps and would make the same model "smaller" on CPU than on GPU. This is the convention of the figures
usually quoted for ResNets (torchvision's "GFLOPS" for resnet50, 4.09, are these MACs). BatchNorm, ReLU,
pooling and residual additions are left out. `--xla_cost_analysis`
also compiles the forward pass and prints XLA's own FLOP count, which includes those element-wise ops
and follows XLA's counting rules, so it differs from 2 x MACs by a few percent.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from resnet_jax.models import CIFAR_MODELS, create_model, list_models

PARTS = ("stem", "stage1", "stage2", "stage3", "stage4", "final_norm", "fc")


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Sizes of one model at one input resolution (per image: batch 1)."""

    model_name: str
    image_size: int
    num_classes: int
    in_channels: int
    num_params: int  # trainable parameters, as torchvision counts them
    num_batch_stats: int  # BatchNorm running means and variances (torch's buffers, not parameters)
    params_by_part: dict[str, int]
    macs_by_part: dict[str, int]
    output_shapes: dict[str, tuple[int, ...]]  # per image, without the batch axis
    xla_flops: float | None = None

    @property
    def macs(self) -> int:
        return sum(self.macs_by_part.values())

    @property
    def flops(self) -> int:
        return 2 * self.macs


def default_image_size(model_name: str) -> int:
    """32 for the CIFAR ResNets, 224 for the ImageNet ones."""
    return 32 if model_name in CIFAR_MODELS else 224


def default_num_classes(model_name: str) -> int:
    """10 for the CIFAR ResNets, 1000 for the ImageNet ones."""
    return 10 if model_name in CIFAR_MODELS else 1000


def _part(path: str) -> str:
    """The stem, stage or head a parameter path / module name stack belongs to."""
    for component in path.split("/"):
        if component.startswith("stem"):
            return "stem"
        if component.startswith("stage"):
            return component.split("_")[0]
        # final_norm: pre-activation nets' last norm; fpn, head: resnet_jax.dense's segmenter's parts.
        if component in ("fc", "final_norm", "fpn", "head"):
            return component
    return "other"


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                found.append(item)
    return found


def count_macs(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """MACs of every conv and matmul in `fn(*args)`, keyed by the part of the network they run in.

    `args` may be `jax.ShapeDtypeStruct`s: only the trace is built, nothing is computed.
    """
    macs: dict[str, int] = {}

    def visit(jaxpr: Any, outer_name_stack: str = "") -> None:
        # Name stacks inside a sub-jaxpr (a custom_vjp such as CpuConv's, a pjit) are relative to the
        # equation that holds it, so the outer stack is carried down to find the part.
        for eqn in jaxpr.eqns:
            name_stack = "/".join(filter(None, [outer_name_stack, str(eqn.source_info.name_stack)]))
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                rhs_shape = eqn.invars[1].aval.shape
                out_features_dim = eqn.params["dimension_numbers"].rhs_spec[0]
                # Per output element: kernel taps x input channels of its group.
                per_output = math.prod(rhs_shape) // rhs_shape[out_features_dim]
                count = math.prod(eqn.outvars[0].aval.shape) * per_output
            elif name == "dot_general":
                (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
                lhs_shape = eqn.invars[0].aval.shape
                contracted = math.prod(lhs_shape[d] for d in lhs_contracting)
                count = math.prod(eqn.outvars[0].aval.shape) * contracted
            else:
                for sub in _sub_jaxprs(eqn.params):
                    visit(sub, name_stack)
                continue
            part = _part(name_stack)
            macs[part] = macs.get(part, 0) + int(count)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return macs


def summarize(
    model_name: str,
    image_size: int | None = None,
    num_classes: int | None = None,
    xla_cost_analysis: bool = False,
    **model_options: Any,
) -> ModelSummary:
    """Counts parameters and MACs and lists output shapes of `create_model(model_name, ...)`.

    `image_size` and `num_classes` default to 32 and 10 for the CIFAR ResNets, 224 and 1000 otherwise;
    `model_options` go to `create_model` (e.g. `in_channels=1`), except `conv`: every conv implementation
    has the same parameters and computes the same sums, and the MACs are counted with `nn.Conv` so that
    they do not depend on the backend (module docstring).
    """
    image_size = default_image_size(model_name) if image_size is None else image_size
    num_classes = default_num_classes(model_name) if num_classes is None else num_classes
    model_options = {**model_options, "conv": nn.Conv}
    model = create_model(model_name, num_classes=num_classes, **model_options)
    image = jax.ShapeDtypeStruct((1, image_size, image_size, model.in_channels), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(image.shape, image.dtype))
    )

    def forward(variables: Any, x: jax.Array) -> Any:
        return model.apply(variables, x, train=False)

    params_by_part: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(variables["params"], sep="/").items():
        part = _part(path)
        params_by_part[part] = params_by_part.get(part, 0) + math.prod(leaf.shape)
    # The GroupNorm nets (BiT) keep no running statistics: no batch_stats collection at all.
    batch_stats = variables.get("batch_stats", {})
    num_batch_stats = sum(math.prod(x.shape) for x in jax.tree.leaves(batch_stats))

    features = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, image)
    output_shapes = {name: tuple(value.shape[1:]) for name, value in features.items()}

    xla_flops = None
    if xla_cost_analysis:
        cost = jax.jit(forward).lower(variables, image).compile().cost_analysis()
        # Older jax returned a list with one dict per device program.
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        xla_flops = float(cost["flops"]) if cost and "flops" in cost else None

    return ModelSummary(
        model_name=model_name,
        image_size=image_size,
        num_classes=num_classes,
        in_channels=model.in_channels,
        num_params=sum(params_by_part.values()),
        num_batch_stats=num_batch_stats,
        params_by_part=params_by_part,
        macs_by_part=count_macs(forward, variables, image),
        output_shapes=output_shapes,
        xla_flops=xla_flops,
    )


def _giga(count: float) -> str:
    return f"{count / 1e9:.3f} G" if count >= 1e9 else f"{count / 1e6:.2f} M"


def format_summary(summary: ModelSummary) -> str:
    """The human-readable report `python -m resnet_jax.summary` prints."""
    s = summary
    lines = [
        f"{s.model_name}: {s.num_params:,} parameters ({s.num_params / 1e6:.2f} M), "
        f"{s.num_batch_stats:,} BatchNorm statistics",
        f"input per image: {s.image_size}x{s.image_size}x{s.in_channels}, {s.num_classes} classes",
        f"MACs per image: {_giga(s.macs)} (convolutions and the classifier; "
        f"FLOPs = 2 x MACs = {_giga(s.flops)})",
    ]
    if s.xla_flops is not None:
        lines.append(f"XLA cost analysis of the compiled forward pass: {_giga(s.xla_flops)} FLOPs")
    lines.append("")
    header = f"{'part':<10} {'output shape (H, W, C)':<24} {'params':>12} {'MACs':>15}"
    lines += [header, "-" * len(header)]
    shape_of = {"fc": s.output_shapes.get("logits")}
    for part in PARTS:
        if part not in s.output_shapes and part not in s.params_by_part:
            continue
        shape = shape_of.get(part, s.output_shapes.get(part))
        lines.append(
            f"{part:<10} {str(shape) if shape else '-':<24} "
            f"{s.params_by_part.get(part, 0):>12,} {s.macs_by_part.get(part, 0):>15,}"
        )
    if "pooled" in s.output_shapes:
        lines.append(f"(global average pool before fc: {s.output_shapes['pooled']})")
    return "\n".join(lines)


def model_summary(
    model_name: str, image_size: int | None = None, num_classes: int | None = None, **options: Any
) -> str:
    """`format_summary(summarize(...))`: the report as one string."""
    return format_summary(summarize(model_name, image_size, num_classes, **options))


def log_model_summary(
    model_name: str,
    image_size: int | None = None,
    num_classes: int | None = None,
    log: Callable[[str], None] | None = None,
    **model_options: Any,
) -> str:
    """Logs the summary line by line (the trainer calls this at start) and returns it.

    `log` defaults to `logging.info` (absl routes it to its handler when absl runs the program).
    Costs about a second for resnet50 (tracing only; no compilation).
    """
    log = logging.info if log is None else log
    text = model_summary(model_name, image_size, num_classes, **model_options)
    for line in text.splitlines():
        log(line)
    return text


def markdown_table(summaries: Sequence[ModelSummary]) -> str:
    """One row per model: the table of models in the README."""
    rows = [
        "| model | input | classes | params | MACs / image | FLOPs / image |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        rows.append(
            f"| `{s.model_name}` | {s.image_size}x{s.image_size} | {s.num_classes} | "
            f"{s.num_params / 1e6:.2f} M | {_giga(s.macs)} | {_giga(s.flops)} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.summary",
        description="Parameters, MACs/FLOPs per image and per-stage output shapes of ResNets.",
    )
    parser.add_argument("models", nargs="+", help=f"'all' or any of: {', '.join(list_models())}")
    parser.add_argument("--image_size", type=int, default=None, help="default 224 (CIFAR: 32)")
    parser.add_argument("--num_classes", type=int, default=None, help="default 1000 (CIFAR: 10)")
    parser.add_argument(
        "--xla_cost_analysis",
        action="store_true",
        help="also compile the forward pass and print XLA's FLOP count (a few seconds per model)",
    )
    parser.add_argument("--markdown", action="store_true", help="print one table row per model")
    args = parser.parse_args(argv)

    names = list_models() if args.models == ["all"] else args.models
    unknown = [name for name in names if name not in list_models()]
    if unknown:
        print(
            f"error: unknown model(s) {', '.join(unknown)}; available: {', '.join(list_models())}",
            file=sys.stderr,
        )
        return 2
    if args.image_size is not None and args.image_size < 1:
        print(f"error: --image_size must be positive, got {args.image_size}", file=sys.stderr)
        return 2

    summaries = []
    for name in names:
        summary = summarize(name, args.image_size, args.num_classes, args.xla_cost_analysis)
        summaries.append(summary)
        if not args.markdown:
            print(format_summary(summary) + ("\n" if len(names) > 1 else ""))
    if args.markdown:
        print(markdown_table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
