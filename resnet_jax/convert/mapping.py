"""torchvision (and timm) state-dict keys and layouts <-> resnet_jax variables: the two directions, and which
architecture some weights are.

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

timm's plain ResNets use torchvision's names and shapes, so their state dicts convert unchanged (timm
`resnet18/34/50/101/152`, `wide_resnet50_2/101_2`, `resnext50_32x4d`, `resnext101_32x8d/64x4d`, any pretrained
tag; mind each tag's own preprocessing). timm's variants that resnet_jax defines (`models.TIMM_MODELS`:
ResNet-D, SE-ResNet, ResNetV2 and BiT) convert with timm's own names (`convert/timm.py`). Other timm variants
are refused with a hint that names the difference (`resnet26`: "matches none of ...").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.convert import timm
from resnet_jax.models import IMAGENET_MODELS, TIMM_MODELS, Bottleneck, create_model
from resnet_jax.models_v2 import PreActResNet
from resnet_jax.tree_diff import diff_shapes, diff_variables

Variables = dict[str, Any]
StateDict = dict[str, np.ndarray]
Shape = tuple[int, ...]
COLLECTIONS = ("params", "batch_stats")
# torchvision's ImageNet ResNets, then timm's variants: every model with a torch counterpart.
CONVERTIBLE_MODELS = {**IMAGENET_MODELS, **TIMM_MODELS}


class ConversionError(ValueError):
    """The weights do not fit the named architecture (or the name is unknown); the message lists why."""


# ---------------------------------------------------------------------------------------------------------------
# Names and layouts.

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


def torch_key(
    collection: str, path: Sequence[str], renames: Mapping[str, str] = _MODULE_TO_TORCH
) -> str:
    """The torchvision state-dict key of one resnet_jax leaf, e.g.
    `('params', ('stage1_block1', 'downsample_bn', 'scale'))` -> `'layer1.0.downsample.1.weight'`.
    `renames` maps module names (timm's v1 variants rename the deep stem and the avg-pool shortcut)."""
    *modules, leaf = path
    parts = []
    for module in modules:
        block = _BLOCK.fullmatch(module)
        if block:
            parts.append(f"layer{block.group(1)}.{int(block.group(2)) - 1}")
        else:
            parts.append(renames.get(module, module))
    parts.append(_LEAF_TO_TORCH.get((collection, leaf), leaf))
    return ".".join(parts)


# Only kernels are 4-d (conv: HWIO <-> OIHW) or 2-d (linear: (in, out) <-> (out, in)); the rest is 1-d.
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}
_FROM_TORCH_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}


def torch_shape(shape: Sequence[int]) -> Shape:
    """The torchvision shape of a resnet_jax leaf of this shape."""
    axes = _TO_TORCH_AXES.get(len(shape))
    return tuple(shape[axis] for axis in axes) if axes else tuple(shape)


# Both layout functions return a new C-ordered float32 array (one copy, never a view), so a converted state
# dict shares no memory with its source: torch's `.numpy()` and jax's `np.asarray` are views.


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    axes = _TO_TORCH_AXES.get(array.ndim)
    return np.array(array.transpose(axes) if axes else array, dtype=np.float32, order="C")


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
    axes = _FROM_TORCH_AXES.get(array.ndim)
    return np.array(array.transpose(axes) if axes else array, dtype=np.float32, order="C")


def numpy_view(value: Any) -> np.ndarray:
    """A numpy view (a copy only where unavoidable) of a torch tensor, jax array or numpy array."""
    if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # numpy has no bfloat16; float16/bfloat16 -> float32 is exact
        return value.numpy()  # shares memory with the tensor
    return np.asarray(value)


class _Entry(NamedTuple):
    collection: str | None  # None: torch's num_batches_tracked, which resnet_jax does not keep
    path: tuple[str, ...]
    torch_shape: Shape


# Rank of each name within its parent, in torchvision's (and timm ResNet's) registration = state_dict order.
_TORCH_ORDER = {
    name: rank
    for rank, name in enumerate(
        "conv1 bn1 conv2 bn2 conv3 bn3 se layer1 layer2 layer3 layer4 downsample fc fc1 fc2 "
        "weight bias running_mean running_var num_batches_tracked".split()
    )
}


class _Naming(NamedTuple):
    """How one model's leaves are named and shaped in its torch state dict."""

    key: Callable[[str, Sequence[str]], str]  # (collection, path) -> torch key
    order: dict[str, int]  # rank of each key part within its parent
    # The classifier is a 1x1 conv (timm ResNetV2's head.fc): weight (out, in, 1, 1).
    conv_head: bool

    def sort_key(self, key: str) -> tuple[int, ...]:
        return tuple(int(part) if part.isdigit() else self.order[part] for part in key.split("."))

    def torch_shape(self, path: Sequence[str], shape: Sequence[int]) -> Shape:
        extra = (1, 1) if self.conv_head and tuple(path) == ("fc", "kernel") else ()
        return torch_shape(shape) + extra


_RESNETV2_NAMING = _Naming(timm.resnetv2_key, timm.RESNETV2_ORDER, conv_head=True)


def _v1_naming(deep_stem: bool, avg_pool_shortcut: bool) -> _Naming:
    renames = dict(_MODULE_TO_TORCH)
    if deep_stem:
        renames |= timm.DEEP_STEM_TO_TORCH
    if avg_pool_shortcut:
        renames |= timm.AVG_POOL_SHORTCUT_TO_TORCH
    return _Naming(functools.partial(torch_key, renames=renames), _TORCH_ORDER, conv_head=False)


def _naming(name: str) -> _Naming:
    model = create_model(name, num_classes=0)  # an unbound dataclass: no parameters are built
    if isinstance(model, PreActResNet):
        return _RESNETV2_NAMING
    return _v1_naming(model.stem == "deep", model.shortcut == "avg_pool")


@functools.lru_cache(maxsize=32)
def _abstract_variables(name: str, num_classes: int) -> Variables:
    """The model's variables as `jax.ShapeDtypeStruct`s: no parameter is materialized, even for resnet152."""
    model = create_model(name, num_classes=num_classes)
    return jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )


@functools.lru_cache(maxsize=32)
def _layout(name: str, num_classes: int) -> dict[str, _Entry]:
    """torch key -> where the value lives in resnet_jax, in torchvision's (timm's) state_dict order."""
    naming = _naming(name)
    table = {}
    variables = _abstract_variables(name, num_classes)
    flat = traverse_util.flatten_dict({c: variables.get(c, {}) for c in COLLECTIONS})
    for (collection, *path), leaf in flat.items():
        key = naming.key(collection, path)
        table[key] = _Entry(collection, tuple(path), naming.torch_shape(path, leaf.shape))
        if collection == "batch_stats" and path[-1] == "mean":
            table[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = _Entry(None, (), ())
    return {key: table[key] for key in sorted(table, key=naming.sort_key)}


def _check_name(name: str) -> None:
    if name not in CONVERTIBLE_MODELS:
        raise ConversionError(
            f"no torchvision/timm layout for model {name!r}; conversion covers the ImageNet-family "
            f"models: {', '.join(CONVERTIBLE_MODELS)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Which architecture do some weights look like?

_TORCH_TOP_LEVEL = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}


def infer_architecture(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The resnet_jax name whose torchvision layout these `{key: shape}` have, or None.

    Reads the structure, not the numbers: blocks per stage from the `layerS.B` indices, the block type from
    `layer1.0.conv3`, groups and width per group from the shape of `layer1.0.conv2.weight`; timm's variants
    from their own keys (`convert.timm.structure`: deep stem, avg-pool shortcut, SE, ResNetV2, GroupNorm).
    """
    if timm.structure(shapes) is not None:
        return timm.infer_variant(shapes)
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


def likely_cause(shapes: Mapping[str, Sequence[int]], name: str = "") -> str:
    """One sentence on why these torchvision-style `{key: shape}` do not fit `name` (or any model), or ""."""
    top_level = {key.split(".", 1)[0] for key in shapes}
    if len(top_level) == 1 and not top_level <= _TORCH_TOP_LEVEL:
        prefix = next(iter(top_level))
        return (
            f"every key starts with {prefix + '.'!r} (e.g. saved from DistributedDataParallel or inside a "
            f"wrapper model): strip it (CLI: --strip-prefix {prefix}.)"
        )
    guess = infer_architecture(shapes)
    if guess is not None and guess != name:
        return f"this looks like {guess} weights, not {name}"
    if guess is None and "conv1.0.weight" in shapes:
        return (
            "a deep stem (conv1.0, conv1.1, ...: timm resnet*d/c/s/t) of a layout resnet_jax does not "
            "define; it has timm's resnet18d, resnet26d, resnet50d, resnet101d"
        )
    if guess is None and any(".se." in key for key in shapes):
        return (
            "squeeze-excitation blocks (timm seresnet*/ecaresnet*) of a layout resnet_jax does not "
            "define; it has timm's seresnet50, seresnet101"
        )
    if guess is None and ("layer1.0.conv2.weight" in shapes or "stem.conv.weight" in shapes):
        return "the block structure matches none of: " + ", ".join(CONVERTIBLE_MODELS)
    return ""


def torch_shapes(variables: Mapping[str, Any]) -> dict[str, Shape]:
    """`{torch key: torch shape}` of resnet_jax variables: what `infer_architecture` reads.

    The naming is told by the module names: `final_norm` is a pre-activation net (timm ResNetV2), a
    `stem_conv1` the deep stem that only the ResNet-D variants (avg-pool shortcuts) have here.
    """
    params = variables.get("params") or {}
    if "final_norm" in params:
        naming = _RESNETV2_NAMING
    else:
        deep_stem = "stem_conv1" in params
        naming = _v1_naming(deep_stem=deep_stem, avg_pool_shortcut=deep_stem)
    flat = traverse_util.flatten_dict({c: variables.get(c) or {} for c in COLLECTIONS})
    return {
        naming.key(collection, path): naming.torch_shape(path, np.shape(leaf))
        for (collection, *path), leaf in flat.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# The two directions.


def torchvision_to_flax(state_dict: Mapping[str, Any], name: str) -> Variables:
    """Converts a torchvision or timm ResNet state dict into resnet_jax variables.

    Args:
      state_dict: torch key -> torch tensor or numpy array, e.g. `torch_model.state_dict()`.
      name: a resnet_jax name with a torch counterpart, e.g. "resnet50" (torchvision's or timm's, same
        layout) or "resnet50d", "resnetv2_50x1_bit" (timm's): `CONVERTIBLE_MODELS`.

    Returns:
      `{'params': ..., 'batch_stats': ...}` (float32 numpy arrays, copies) for
      `create_model(name, num_classes)`, where num_classes is the row count of the classifier weight
      (`fc.weight`, timm ResNetV2: `head.fc.weight`), or 0 (no classifier) when the state dict has none.
      `num_batches_tracked` is accepted and dropped. BiT models have an empty `batch_stats`.

    Raises:
      ConversionError: unknown name, or keys missing / unexpected / mis-shaped (listed, with the likely
        cause, e.g. "this looks like resnet50 weights, not resnet101").
    """
    _check_name(name)
    shapes = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
    fc_weight = shapes.get(_naming(name).key("params", ("fc", "kernel")))
    num_classes = fc_weight[0] if fc_weight is not None and len(fc_weight) >= 2 else 0
    layout = _layout(name, num_classes)
    # num_batches_tracked is optional: expected only where the state dict has it.
    expected = {
        key: entry.torch_shape
        for key, entry in layout.items()
        if entry.collection is not None or key in shapes
    }
    diff = diff_shapes(expected, shapes)
    if diff:
        raise ConversionError(
            diff.format(
                f"the state dict does not fit {name} with {num_classes} classes",
                likely_cause(shapes, name),
            )
        )
    flat = {}
    for key, entry in layout.items():
        if entry.collection is None:
            continue
        value = numpy_view(state_dict[key])
        if _conv_head(entry):
            # timm ResNetV2's classifier is a 1x1 conv, ours a Dense: (out, in, 1, 1) -> (out, in).
            value = value.reshape(entry.torch_shape[:2])
        flat[(entry.collection, *entry.path)] = _from_torch_layout(value)
    return {"params": {}, "batch_stats": {}} | traverse_util.unflatten_dict(flat)


def flax_to_torchvision(variables: Mapping[str, Any], name: str) -> StateDict:
    """Converts resnet_jax variables into a torchvision (or timm, for `TIMM_MODELS`) state dict of numpy arrays.

    The keys are exactly those of `torchvision.models.<name>(num_classes=n).state_dict()` (timm:
    `timm.create_model(name, num_classes=n).state_dict()`), in the same order,
    including `num_batches_tracked` (int64, 0-d, value 0: resnet_jax keeps no such counter), so
    `torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)` accepts them.
    A model without a classifier (num_classes 0) gives no `fc` keys: load it into a torchvision model whose
    `fc` is `torch.nn.Identity()`.

    Raises:
      ConversionError: unknown name, or variables missing / unexpected / mis-shaped (listed, with the likely
        cause).
    """
    _check_name(name)
    fc_kernel = (variables.get("params") or {}).get("fc", {}).get("kernel")
    num_classes = np.shape(fc_kernel)[-1] if fc_kernel is not None else 0
    # Every collection is compared, so that an extra one (e.g. an EMA copy) is named, not dropped.
    diff = diff_variables(
        _abstract_variables(name, num_classes),
        variables,
        collections=[*COLLECTIONS, *sorted(set(variables) - set(COLLECTIONS))],
    )
    if diff:
        raise ConversionError(
            diff.format(
                f"the variables do not fit {name} with {num_classes} classes",
                likely_cause(torch_shapes(variables), name),
            )
        )
    flat = traverse_util.flatten_dict({c: variables.get(c) or {} for c in COLLECTIONS})
    state_dict: StateDict = {}
    for key, entry in _layout(name, num_classes).items():
        if entry.collection is None:
            state_dict[key] = np.array(0, dtype=np.int64)
        else:
            value = _to_torch_layout(numpy_view(flat[(entry.collection, *entry.path)]))
            state_dict[key] = value.reshape(entry.torch_shape)  # a view of the fresh copy
    return state_dict


def _conv_head(entry: _Entry) -> bool:
    return entry.path == ("fc", "kernel") and len(entry.torch_shape) == 4
