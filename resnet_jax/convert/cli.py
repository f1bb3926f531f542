"""`python -m resnet_jax.convert`: the command line over the conversion API, one error line on failure."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from resnet_jax.convert.formats import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    CheckpointFileError,
    load_state_dict_file,
    load_variables_checkpoint,
    save_state_dict_file,
    save_variables_checkpoint,
)
from resnet_jax.convert.mapping import (
    CONVERTIBLE_MODELS,
    ConversionError,
    Variables,
    flax_to_torchvision,
    infer_architecture,
    likely_cause,
    torch_shapes,
    torchvision_to_flax,
)

_EPILOG = """\
directions:
  from-torch  a torchvision/timm state dict (.pth, .pt, .bin: read with torch.load(weights_only=True);
              .safetensors: read without torch) -> a resnet_jax variables checkpoint (Orbax directory with
              'variables' = {params, batch_stats} and 'metadata' = {model, num_classes, source}) that the
              trainer can start or fine-tune from.
  to-torch    a resnet_jax variables checkpoint, or a training workdir (its latest checkpoint) -> a
              torchvision state dict (timm's, for timm's variants such as resnet50d or resnetv2_50x1_bit;
              .pth/.pt via torch.save, or .safetensors), loadable with model.load_state_dict(..., strict=True).

examples:
  python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights='DEFAULT').state_dict(), 'resnet50.pth')"
  python -m resnet_jax.convert from-torch resnet50.pth checkpoints/resnet50
  python -m resnet_jax.convert to-torch checkpoints/resnet50 resnet50_back.safetensors
  python -c "import torch, timm; torch.save(timm.create_model('resnet50d', pretrained=True).state_dict(), 'timm_resnet50d.pth')"
  python -m resnet_jax.convert from-torch timm_resnet50d.pth checkpoints/resnet50d --model resnet50d

The architecture is read from the weights (or the checkpoint's metadata) unless --model names it.
Nothing is overwritten without --overwrite, and an old output is replaced only once the new one is complete.
Exit status: 0 on success, 2 on any error (one message, no traceback).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.convert",
        description="Convert ResNet weights between torchvision/timm state dicts and resnet_jax checkpoints, "
        "exactly (values are only transposed, never recomputed).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    directions = parser.add_subparsers(
        dest="direction", required=True, metavar="{from-torch,to-torch}"
    )
    from_torch = directions.add_parser(
        "from-torch",
        help="torchvision/timm .pth/.pt/.safetensors -> resnet_jax variables checkpoint",
        description="Convert a torchvision/timm state dict into a resnet_jax variables checkpoint.",
    )
    from_torch.add_argument("source", help="state dict file: .pth, .pt, .bin or .safetensors")
    from_torch.add_argument("destination", help="checkpoint directory to write (Orbax)")
    from_torch.add_argument(
        "--strip-prefix",
        default="",
        metavar="PREFIX",
        help="remove this prefix from every key first, e.g. 'module.' for DistributedDataParallel saves",
    )
    to_torch = directions.add_parser(
        "to-torch",
        help="resnet_jax variables checkpoint or training workdir -> torchvision .pth/.pt/.safetensors",
        description="Convert a resnet_jax variables checkpoint (or a training workdir's latest "
        "checkpoint) into a torchvision state dict file.",
    )
    to_torch.add_argument("source", help="variables checkpoint directory, or a training workdir")
    to_torch.add_argument("destination", help="file to write: .pth, .pt or .safetensors")
    for sub in (from_torch, to_torch):
        sub.add_argument(
            "--model",
            choices=list(CONVERTIBLE_MODELS),
            metavar="NAME",
            help=f"architecture ({', '.join(CONVERTIBLE_MODELS)}); default: inferred from the weights",
        )
        sub.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def _param_count(variables: Variables) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables["params"]))


def _infer_or_fail(shapes: Mapping[str, Sequence[int]], source: str) -> str:
    name = infer_architecture(shapes)
    if name is None:
        cause = likely_cause(shapes)
        raise ConversionError(
            f"could not tell which architecture {source} holds ({cause or 'no torchvision ResNet layout'}); "
            f"pass --model, one of: {', '.join(CONVERTIBLE_MODELS)}"
        )
    return name


def _from_torch(args: argparse.Namespace) -> str:
    state_dict = load_state_dict_file(args.source)
    if args.strip_prefix:
        lacking = [key for key in state_dict if not key.startswith(args.strip_prefix)]
        if lacking:
            raise ConversionError(
                f"--strip-prefix {args.strip_prefix!r}: {len(lacking)} keys lack it, e.g. {lacking[0]!r}"
            )
        state_dict = {key[len(args.strip_prefix) :]: value for key, value in state_dict.items()}
    shapes = {key: value.shape for key, value in state_dict.items()}
    name = args.model or _infer_or_fail(shapes, args.source)
    variables = torchvision_to_flax(state_dict, name)
    num_classes = (
        int(variables["params"]["fc"]["bias"].shape[0]) if "fc" in variables["params"] else 0
    )
    metadata = {"model": name, "num_classes": num_classes, "source": os.path.abspath(args.source)}
    save_variables_checkpoint(args.destination, variables, metadata)
    return (
        f"wrote {args.destination}: {name}, {num_classes} classes, "
        f"{_param_count(variables):,} parameters, from {args.source}"
    )


def _to_torch(args: argparse.Namespace) -> str:
    if not args.destination.endswith((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)):
        raise ConversionError(
            f"{args.destination}: the file name says which format to write; end it in .pth, .pt or .safetensors"
        )
    variables, metadata = load_variables_checkpoint(args.source)
    name = (
        args.model or metadata.get("model") or _infer_or_fail(torch_shapes(variables), args.source)
    )
    state_dict = flax_to_torchvision(variables, name)
    save_state_dict_file(state_dict, args.destination)
    fc_bias = state_dict.get("fc.bias", state_dict.get("head.fc.bias"))  # timm ResNetV2: head.fc
    num_classes = fc_bias.shape[0] if fc_bias is not None else 0
    return f"wrote {args.destination}: {name}, {num_classes} classes, {len(state_dict)} tensors, from {args.source}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0, or 2 with one error message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if os.path.lexists(args.destination) and not args.overwrite:
            raise FileExistsError(
                f"{args.destination} exists; pass --overwrite to replace it (the old one is kept until "
                "the new one is complete)"
            )
        message = _from_torch(args) if args.direction == "from-torch" else _to_torch(args)
    except (ConversionError, CheckpointFileError, OSError) as error:  # OSError: e.g. a full disk
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0
