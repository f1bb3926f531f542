"""One comparison of two variable trees: which paths are missing, unexpected or mis-shaped.

Fine-tuning (a checkpoint under a new head), conversion (a state dict against an architecture) and
prediction (a checkpoint against the model it claims to be) all ask the same question; they share this
answer and its wording, so a user sees one kind of mismatch message everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

Shape = tuple[int, ...]

# A mismatch message lists this many paths per kind, then "N more"; the summary line and the hint come
# first so that the cause is readable without scrolling through hundreds of paths.
MAX_LISTED = 20


def flat_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Shape]:
    """`{"params/stage1_block1/conv1/kernel": (3, 3, 64, 64), ...}` for a nested dict of arrays.

    Leaves may be arrays, `jax.ShapeDtypeStruct`s or anything `np.shape` understands.
    """
    flat = traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}
    return {
        prefix + path: tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in flat.items()
    }


@dataclasses.dataclass(frozen=True)
class TreeDiff:
    """Paths the reference has and the candidate lacks (`missing`), the reverse (`unexpected`), and
    paths both have with different shapes (`misshaped`), each entry already worded with its shape(s)."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def counts(self) -> str:
        return (
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.misshaped)} mis-shaped"
        )

    def format(
        self,
        summary: str,
        hint: str = "",
        *,
        missing_title: str = "missing",
        unexpected_title: str = "unexpected",
        max_listed: int = MAX_LISTED,
    ) -> str:
        """The message: `summary: <counts>`, the hint, then up to `max_listed` paths of each kind."""
        lines = [f"{summary}: {self.counts()}"]
        if hint:
            lines.append(f"hint: {hint}")
        for title, entries in (
            (missing_title, self.missing),
            (unexpected_title, self.unexpected),
            ("mis-shaped", self.misshaped),
        ):
            if entries:
                lines.append(f"{title}:")
                lines += [f"  {entry}" for entry in entries[:max_listed]]
                if len(entries) > max_listed:
                    lines.append(f"  ... {len(entries) - max_listed} more")
        return "\n".join(lines)


def diff_shapes(
    reference: Mapping[str, Shape],
    candidate: Mapping[str, Shape],
    *,
    ignore: Callable[[str], bool] = lambda path: False,
    describe: Callable[[Shape], Any] = lambda shape: shape,
) -> TreeDiff:
    """Compares two `{path: shape}` maps (e.g. from `flat_shapes`); paths where `ignore(path)` are skipped.

    `describe` renders a shape for the message (conversion shows torch's layout, for instance).
    """
    missing = [
        f"{path} {describe(shape)}"
        for path, shape in reference.items()
        if path not in candidate and not ignore(path)
    ]
    unexpected = [
        f"{path} {describe(shape)}"
        for path, shape in candidate.items()
        if path not in reference and not ignore(path)
    ]
    misshaped = [
        f"{path}: {describe(candidate[path])}, expected {describe(shape)}"
        for path, shape in reference.items()
        if path in candidate and tuple(candidate[path]) != tuple(shape) and not ignore(path)
    ]
    return TreeDiff(missing, unexpected, misshaped)


def diff_variables(
    reference: Mapping[str, Any],
    candidate: Mapping[str, Any],
    *,
    collections: Collection[str] = ("params", "batch_stats"),
    ignore: Callable[[str], bool] = lambda path: False,
) -> TreeDiff:
    """`diff_shapes` of two variable dicts over `collections`, with paths like `params/fc/kernel`."""
    reference_shapes: dict[str, Shape] = {}
    candidate_shapes: dict[str, Shape] = {}
    for collection in collections:
        reference_shapes |= flat_shapes(reference.get(collection) or {}, f"{collection}/")
        candidate_shapes |= flat_shapes(candidate.get(collection) or {}, f"{collection}/")
    return diff_shapes(reference_shapes, candidate_shapes, ignore=ignore)
