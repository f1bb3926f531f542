"""torchvision (and timm) ResNet weights <-> resnet_jax variables, exact both ways.

The two layouts hold the same numbers; only names and axis orders differ:

  torchvision                              resnet_jax
  conv1 / bn1                              stem_conv / stem_bn
  layer{S}.{B}.conv{K} / bn{K}             stage{S}_block{B+1}/conv{K} / bn{K}
  layer{S}.{B}.downsample.0 / .1           stage{S}_block{B+1}/downsample_conv / downsample_bn
  fc                                       fc
  conv weight (O, I/groups, kh, kw)        params .../kernel (kh, kw, I/groups, O)
  linear weight (out, in)                  params fc/kernel (in, out)
  bn weight / bias                         params .../scale / bias
  bn running_mean / running_var            batch_stats .../mean / var
  bn num_batches_tracked                   (no counterpart; written as 0 on the way back)

Every value is moved by a transpose or a copy, never by arithmetic, so torchvision -> resnet_jax ->
torchvision and resnet_jax -> torchvision -> resnet_jax are bit-exact (tests/test_torchvision_parity.py).

The key table is derived from the resnet_jax model itself (`jax.eval_shape` of its `init`: shapes only, no
compute), so it cannot drift from `models.py`.

timm: timm's plain ResNets use torchvision's names and shapes (conv1, bn1, layer1..4 with conv/bn/downsample.0/1,
fc), so their state dicts convert unchanged: timm `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152`,
`wide_resnet50_2`, `wide_resnet101_2`, `resnext50_32x4d`, `resnext101_32x8d`, `resnext101_64x4d` and all their
pretrained tags (e.g. `resnet50.a1_in1k`; mind each tag's own preprocessing). timm variants with another
structure are refused with a hint that names the difference: deep stems (`resnet18d`, `resnet50c`, `resnet50d`,
`ecaresnet50d`: keys `conv1.0.weight`, ...), squeeze-excitation (`seresnet50`: `.se.`), and block layouts
resnet_jax does not define (`resnet26`, `resnext101_32x4d`: "matches none of ...").

Command line (see `python -m resnet_jax.convert --help`):

  python -m resnet_jax.convert from-torch resnet50.pth ckpt/resnet50        # .pth/.pt/.safetensors -> Orbax
  python -m resnet_jax.convert to-torch ckpt/resnet50 resnet50_ft.safetensors  # Orbax -> .pth/.safetensors
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import checkpoint
from resnet_jax.models import IMAGENET_MODELS, Bottleneck, create_model

Variables = dict[str, Any]
StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
    """The weights do not fit the named architecture (or the name is unknown); the message lists why."""


class CheckpointFileError(ValueError):
    """A file that is not a readable checkpoint: truncated, another format, or a pickle that holds code."""


# ---------------------------------------------------------------------------------------------------------------
# The name and layout mapping.

_MODULE_TO_TORCH = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
}
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)")


def torch_key(collection: str, path: Sequence[str]) -> str:
    """The torchvision state-dict key of one resnet_jax leaf, e.g.
    `('params', ('stage1_block1', 'downsample_bn', 'scale'))` -> `'layer1.0.downsample.1.weight'`."""
    *modules, leaf = path
    parts = []
    for module in modules:
        block = _BLOCK.fullmatch(module)
        if block:
            parts.append(f"layer{block.group(1)}.{int(block.group(2)) - 1}")
        else:
            parts.append(_MODULE_TO_TORCH.get(module, module))
    parts.append(_LEAF_TO_TORCH.get((collection, leaf), leaf))
    return ".".join(parts)


# Both layout functions return a new C-ordered float32 array (one copy, never a view), so a converted state
# dict shares no memory with its source: torch's `.numpy()` and jax's `np.asarray` are views.


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    # Only kernels are 4-d (conv, HWIO -> OIHW) or 2-d (linear, (in, out) -> (out, in)); the rest is 1-d.
    if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2:
        array = array.T
    return np.array(array, dtype=np.float32, order="C")


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif array.ndim == 2:
        array = array.T
    return np.array(array, dtype=np.float32, order="C")


def _torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _flax_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape


class _Entry(NamedTuple):
    collection: str | None  # None: torch's num_batches_tracked, which resnet_jax does not keep
    path: tuple[str, ...]
    torch_shape: tuple[int, ...]


# Rank of each name within its parent, in torchvision's registration (= state_dict) order.
_TORCH_ORDER = {
    name: rank
    for rank, name in enumerate(
        "conv1 bn1 conv2 bn2 conv3 bn3 layer1 layer2 layer3 layer4 downsample fc "
        "weight bias running_mean running_var num_batches_tracked".split()
    )
}


def _torch_sort_key(key: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else _TORCH_ORDER[part] for part in key.split("."))


@functools.lru_cache(maxsize=32)
def _layout(name: str, num_classes: int) -> dict[str, _Entry]:
    """torchvision key -> where the value lives in resnet_jax, in torchvision's state_dict order."""
    model = create_model(name, num_classes=num_classes)
    # Shapes only: no parameter is materialized, so this is cheap even for resnet152.
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    table = {}
    for collection in ("params", "batch_stats"):
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            path = tuple(k.key for k in key_path)
            table[torch_key(collection, path)] = _Entry(collection, path, _torch_shape(leaf.shape))
            if collection == "batch_stats" and path[-1] == "mean":
                module = torch_key(collection, path).rsplit(".", 1)[0]
                table[f"{module}.num_batches_tracked"] = _Entry(None, path[:-1], ())
    return {key: table[key] for key in sorted(table, key=_torch_sort_key)}


def _check_name(name: str) -> None:
    if name not in IMAGENET_MODELS:
        raise ConversionError(
            f"no torchvision layout for model {name!r}; conversion covers the ImageNet-family models: "
            f"{', '.join(IMAGENET_MODELS)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Diagnosis: which architecture do some weights look like?

_TORCH_TOP_LEVEL = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}


def infer_architecture(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The resnet_jax name whose torchvision layout these `{key: shape}` have, or None.

    Reads the structure, not the numbers: blocks per stage from the `layerS.B` indices, the block type from
    `layer1.0.conv3`, groups and width per group from the shape of `layer1.0.conv2.weight`.
    """
    stage_sizes = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        stage_sizes.append(max(blocks) + 1 if blocks else 0)
    conv2 = shapes.get("layer1.0.conv2.weight")
    if conv2 is None or len(conv2) != 4 or conv2[1] == 0:
        return None
    bottleneck = "layer1.0.conv3.weight" in shapes
    groups = conv2[0] // conv2[1] if bottleneck else 1
    # Stage 1 of a bottleneck net has width = width_per_group * groups (64 base filters).
    width_per_group = conv2[0] // groups if bottleneck else 64
    for name in IMAGENET_MODELS:
        model = create_model(name, num_classes=0)  # an unbound dataclass: no parameters are built
        same_block = (model.block_cls is Bottleneck) == bottleneck
        same_width = not bottleneck or (model.groups, model.width_per_group) == (
            groups,
            width_per_group,
        )
        if tuple(model.stage_sizes) == tuple(stage_sizes) and same_block and same_width:
            return name
    return None


def _likely_cause(shapes: Mapping[str, Sequence[int]], name: str) -> str:
    """One sentence on why these torchvision-style keys do not fit `name`, if the keys reveal it."""
    top_level = {key.split(".", 1)[0] for key in shapes}
    if len(top_level) == 1 and not top_level <= _TORCH_TOP_LEVEL:
        prefix = next(iter(top_level))
        return (
            f"every key starts with {prefix + '.'!r} (e.g. saved from DistributedDataParallel or inside a "
            f"wrapper model): strip it (CLI: --strip-prefix {prefix}.)"
        )
    if "conv1.0.weight" in shapes:
        return "a deep stem (conv1.0, conv1.1, ...: timm resnet*d/c/s/t), which resnet_jax does not define"
    if any(".se." in key for key in shapes):
        return "squeeze-excitation blocks (timm seresnet*/ecaresnet*), which resnet_jax does not define"
    guess = infer_architecture(shapes)
    if guess is not None and guess != name:
        return f"this looks like {guess} weights, not {name}"
    if guess is None and "layer1.0.conv2.weight" in shapes:
        return "the block structure matches none of: " + ", ".join(IMAGENET_MODELS)
    return ""


def _mismatch_error(
    what: str, missing: list[str], unexpected: list[str], misshaped: list[str], cause: str
) -> ConversionError:
    lines = [what + (f" ({cause})" if cause else "") + ":"]
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if keys:
            lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys))
    return ConversionError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# The two directions.


def _numpy_view(value: Any) -> np.ndarray:
    """A numpy view (a copy only where unavoidable) of a torch tensor, jax array or numpy array."""
    if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16; float16/bfloat16 -> float32 is exact
        return value.numpy()  # shares memory with the tensor
    return np.asarray(value)


def _as_numpy(value: Any) -> np.ndarray:
    """A private numpy copy of a torch tensor, jax array or numpy array."""
    return np.array(_numpy_view(value), copy=True)


def torchvision_to_flax(state_dict: Mapping[str, Any], name: str) -> Variables:
    """Converts a torchvision (or timm, same layout) ResNet state dict into resnet_jax variables.

    Args:
      state_dict: torchvision key -> torch tensor or numpy array, e.g. `torch_model.state_dict()`.
      name: a resnet_jax ImageNet-family name, e.g. "resnet50" (`resnet_jax.models.IMAGENET_MODELS`).

    Returns:
      `{'params': ..., 'batch_stats': ...}` (float32 numpy arrays, copies) for
      `create_model(name, num_classes)`, where num_classes is the row count of `fc.weight`, or 0 (no
      classifier) when the state dict has no `fc.weight`. `num_batches_tracked` is accepted and dropped.

    Raises:
      ConversionError: unknown name, or keys missing / unexpected / mis-shaped (all listed, with the likely
        cause, e.g. "this looks like resnet50 weights, not resnet101").
    """
    _check_name(name)
    shapes = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
    fc_weight = shapes.get("fc.weight")
    num_classes = fc_weight[0] if fc_weight is not None and len(fc_weight) == 2 else 0
    layout = _layout(name, num_classes)

    missing = [k for k, e in layout.items() if k not in shapes and e.collection is not None]
    unexpected = [k for k in shapes if k not in layout]
    misshaped = [
        f"{k} {shapes[k]} (expected {layout[k].torch_shape})"
        for k in shapes
        if k in layout and shapes[k] != layout[k].torch_shape
    ]
    if missing or unexpected or misshaped:
        raise _mismatch_error(
            f"the state dict does not fit {name} with {num_classes} classes",
            missing,
            unexpected,
            misshaped,
            _likely_cause(shapes, name),
        )

    variables: Variables = {"params": {}, "batch_stats": {}}
    for key, entry in layout.items():
        if entry.collection is None:
            continue
        value = _from_torch_layout(_numpy_view(state_dict[key]))
        node = variables[entry.collection]
        for module in entry.path[:-1]:
            node = node.setdefault(module, {})
        node[entry.path[-1]] = value
    return variables


def _flax_leaves(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
    """`{(collection, module path): array}` for the `params` and `batch_stats` of `variables`."""
    leaves = {}
    for collection in ("params", "batch_stats"):
        subtree = variables.get(collection, {})
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(subtree)[0]:
            path = tuple(getattr(k, "key", str(k)) for k in key_path)
            leaves[(collection, path)] = leaf
    return leaves


def flax_to_torchvision(variables: Mapping[str, Any], name: str) -> StateDict:
    """Converts resnet_jax variables into a torchvision state dict of numpy arrays.

    The keys are exactly those of `torchvision.models.<name>(num_classes=n).state_dict()`, in the same order,
    including `num_batches_tracked` (int64, 0-d, value 0: resnet_jax keeps no such counter), so
    `torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)` accepts them.
    A model without a classifier (num_classes 0) gives no `fc` keys: load it into a torchvision model whose
    `fc` is `torch.nn.Identity()`.

    Raises:
      ConversionError: unknown name, or variables missing / unexpected / mis-shaped (all listed).
    """
    _check_name(name)
    leaves = _flax_leaves(variables)
    unknown_collections = sorted(set(variables) - {"params", "batch_stats"})
    fc_kernel = leaves.get(("params", ("fc", "kernel")))
    num_classes = np.shape(fc_kernel)[-1] if fc_kernel is not None else 0
    layout = _layout(name, num_classes)
    wanted = {(e.collection, e.path): e for e in layout.values() if e.collection is not None}

    def label(where: tuple[str, tuple[str, ...]]) -> str:
        return "/".join((where[0], *where[1]))

    missing = [label(w) for w in wanted if w not in leaves]
    unexpected = [label(w) for w in leaves if w not in wanted] + unknown_collections
    misshaped = [
        f"{label(w)} {tuple(np.shape(leaf))} (expected {_flax_shape(wanted[w].torch_shape)})"
        for w, leaf in leaves.items()
        if w in wanted and _torch_shape(np.shape(leaf)) != wanted[w].torch_shape
    ]
    if missing or unexpected or misshaped:
        shapes = {torch_key(c, p): _torch_shape(np.shape(leaf)) for (c, p), leaf in leaves.items()}
        raise _mismatch_error(
            f"the variables do not fit {name} with {num_classes} classes",
            missing,
            unexpected,
            misshaped,
            _likely_cause(shapes, name),
        )

    state_dict: StateDict = {}
    for key, entry in layout.items():
        if entry.collection is None:
            state_dict[key] = np.array(0, dtype=np.int64)
        else:
            state_dict[key] = _to_torch_layout(_numpy_view(leaves[(entry.collection, entry.path)]))
    return state_dict


# ---------------------------------------------------------------------------------------------------------------
# Files.

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
SAFETENSORS_SUFFIX = ".safetensors"


def _import_torch() -> Any:
    # torch is a test/conversion-time dependency only: imported here, never when resnet_jax is imported.
    try:
        import torch
    except ImportError as error:
        raise CheckpointFileError(
            "reading or writing .pth files needs PyTorch (pip install torch); "
            ".safetensors files need no torch"
        ) from error
    return torch


def _first_line(error: BaseException) -> str:
    """`Type: first sentence` of a library's error, so that the CLI's message stays one short line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else "(no message)"
    if len(line) > 160 and ". " in line:
        line = line.split(". ", 1)[0] + "."
    return f"{type(error).__name__}: {line}"


def _unwrap(obj: Any) -> Any:
    # Training scripts often save {'state_dict': ..., 'epoch': ...} or {'model': ..., 'optimizer': ...}.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def load_state_dict_file(path: str) -> StateDict:
    """Reads a torch state dict from `.safetensors` (no torch needed) or a torch file (`.pth`, `.pt`, ...).

    Torch files are read only with `torch.load(path, map_location='cpu', weights_only=True)`: a pickle that
    names anything but tensors and plain containers (e.g. a `__reduce__` that calls `os.system`) is refused
    before any of it runs. A dict nested under 'state_dict' or 'model' is unwrapped.

    Raises:
      CheckpointFileError: missing, truncated, not a checkpoint, or holding code; the message is one line.
    """
    if not os.path.isfile(path):
        what = "a directory, not a state dict file" if os.path.isdir(path) else "no such file"
        raise CheckpointFileError(f"{path}: {what}")
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))  # fresh arrays, owned by us
        except Exception as error:  # the Rust reader raises its own SafetensorError type
            raise CheckpointFileError(
                f"{path} is not a readable safetensors file (truncated or another format): "
                f"{_first_line(error)}"
            ) from error
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise CheckpointFileError(
                f"{path} is not a readable PyTorch checkpoint: {_first_line(error)}"
            ) from error
        # torch's message is long; keep the line that names what was refused.
        reason = next(
            (
                line.strip()
                for line in str(error).splitlines()
                if "GLOBAL" in line or "Unsupported" in line
            ),
            "it holds objects other than tensors",
        )
        raise CheckpointFileError(
            f"refused {path}: it is not a plain tensor checkpoint and may hold code "
            f"(torch.load with weights_only=True rejected it; nothing in it was run): {reason}; "
            "a trusted model can be re-saved as model.state_dict() (tensors only)"
        ) from error
    except Exception as error:
        raise CheckpointFileError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another format): "
            f"{_first_line(error)}"
        ) from error
    state = _unwrap(obj)
    if not isinstance(state, Mapping):
        raise CheckpointFileError(
            f"{path} holds a {type(state).__name__}, not a state dict (a mapping of key -> tensor)"
        )
    not_tensors = [
        f"{key} ({type(value).__name__})"
        for key, value in state.items()
        if not hasattr(value, "detach")
    ]
    if not_tensors:
        raise CheckpointFileError(f"{path}: entries that are not tensors: {', '.join(not_tensors)}")
    return {key: _as_numpy(value) for key, value in state.items()}


def _temporary_sibling(path: str) -> str:
    # Same directory as the target, so the final rename stays on one file system (and so is atomic).
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}")


def _commit(temporary: str, path: str) -> None:
    """Moves a fully written `temporary` to `path`; an old `path` is removed only after the move succeeded."""
    path = os.path.abspath(path)
    if os.path.isdir(path) or os.path.isdir(temporary):
        backup = None
        if os.path.lexists(path):
            backup = f"{temporary}.old"
            os.rename(path, backup)
        try:
            os.rename(temporary, path)
        except BaseException:
            if backup is not None:
                os.rename(backup, path)
            raise
        if backup is not None:
            _discard(backup)
    else:
        os.replace(temporary, path)  # atomic for files


def _discard(temporary: str) -> None:
    if os.path.isdir(temporary):
        shutil.rmtree(temporary, ignore_errors=True)
    elif os.path.lexists(temporary):
        os.remove(temporary)


def save_state_dict_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict of numpy arrays as `.safetensors` (no torch needed) or as a torch file."""
    temporary = _temporary_sibling(path)
    try:
        if path.endswith(SAFETENSORS_SUFFIX):
            from safetensors.numpy import save_file

            # np.ascontiguousarray would turn the 0-d num_batches_tracked into shape (1,).
            arrays = {key: np.require(value, requirements="C") for key, value in state_dict.items()}
            save_file(arrays, temporary)
        else:
            torch = _import_torch()
            torch.save(
                {key: torch.from_numpy(value) for key, value in state_dict.items()}, temporary
            )
        _commit(temporary, path)
    finally:
        _discard(temporary)


def save_variables_file(path: str, variables: Variables, metadata: dict[str, Any]) -> None:
    """Writes a variables checkpoint at `path` through a temporary sibling (an old `path` survives a failure)."""
    temporary = _temporary_sibling(path)
    _discard(temporary)
    try:
        checkpoint.save_variables(temporary, variables, metadata=metadata)
        _commit(temporary, path)
    finally:
        _discard(temporary)


def load_variables_any(path: str) -> tuple[Variables, dict[str, Any]]:
    """`(variables, metadata)` from a resnet_jax variables checkpoint.

    The one place where `to-torch` reads its input: when `checkpoint.load_variables` learns to read training
    workdirs, this follows.
    """
    try:
        return checkpoint.load_variables(path)
    except Exception as error:
        raise CheckpointFileError(
            f"{path} could not be read as a resnet_jax variables checkpoint: {_first_line(error)}"
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Command line.

_EPILOG = """\
directions:
  from-torch  a torchvision/timm state dict (.pth, .pt, .bin: read with torch.load(weights_only=True);
              .safetensors: read without torch) -> a resnet_jax variables checkpoint (Orbax directory with
              'variables' = {params, batch_stats} and 'metadata' = {model, num_classes, source}) that the
              trainer can start or fine-tune from.
  to-torch    a resnet_jax variables checkpoint -> a torchvision state dict (.pth/.pt via torch.save, or
              .safetensors), loadable with model.load_state_dict(..., strict=True).

examples:
  python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights='DEFAULT').state_dict(), 'resnet50.pth')"
  python -m resnet_jax.convert from-torch resnet50.pth checkpoints/resnet50
  python -m resnet_jax.convert to-torch checkpoints/resnet50 resnet50_back.safetensors

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
        help="resnet_jax variables checkpoint -> torchvision .pth/.pt/.safetensors",
        description="Convert a resnet_jax variables checkpoint into a torchvision state dict file.",
    )
    to_torch.add_argument("source", help="resnet_jax variables checkpoint directory")
    to_torch.add_argument("destination", help="file to write: .pth, .pt or .safetensors")
    for sub in (from_torch, to_torch):
        sub.add_argument(
            "--model",
            choices=list(IMAGENET_MODELS),
            metavar="NAME",
            help=f"architecture ({', '.join(IMAGENET_MODELS)}); default: inferred from the weights",
        )
        sub.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def _param_count(variables: Variables) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables["params"]))


def _infer_or_fail(shapes: Mapping[str, Sequence[int]], source: str) -> str:
    name = infer_architecture(shapes)
    if name is None:
        cause = _likely_cause(shapes, "")
        raise ConversionError(
            f"could not tell which architecture {source} holds ({cause or 'no torchvision ResNet layout'}); "
            f"pass --model, one of: {', '.join(IMAGENET_MODELS)}"
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
    save_variables_file(args.destination, variables, metadata)
    return (
        f"wrote {args.destination}: {name}, {num_classes} classes, "
        f"{_param_count(variables):,} parameters, from {args.source}"
    )


def _to_torch(args: argparse.Namespace) -> str:
    if not args.destination.endswith((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)):
        raise ConversionError(
            f"{args.destination}: the file name says which format to write; end it in .pth, .pt or .safetensors"
        )
    variables, metadata = load_variables_any(args.source)
    name = args.model or metadata.get("model")
    if name is None:
        shapes = {
            torch_key(collection, path): _torch_shape(np.shape(leaf))
            for (collection, path), leaf in _flax_leaves(variables).items()
        }
        name = _infer_or_fail(shapes, args.source)
    state_dict = flax_to_torchvision(variables, name)
    save_state_dict_file(state_dict, args.destination)
    num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 0
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


if __name__ == "__main__":
    sys.exit(main())
