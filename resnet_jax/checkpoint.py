"""Orbax checkpoints: model variables on their own (conversion, fine-tuning) and, later, the trainer's state.

A *variables checkpoint* is one Orbax directory holding `variables` ({'params', 'batch_stats'}) and a small
JSON `metadata` item ({'model': name, 'num_classes': n, ...}). `python -m resnet_jax.convert` writes one; the
trainer can start or fine-tune from it (`config.init_from`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

Variables = dict[str, Any]


def save_variables(path: str, variables: Variables, metadata: dict[str, Any]) -> None:
    """Writes `variables` and `metadata` as an Orbax checkpoint at `path` (which must not exist)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new path or remove it first")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            ocp.args.Composite(
                variables=ocp.args.StandardSave(variables),
                metadata=ocp.args.JsonSave(metadata),
            ),
        )


def load_variables(path: str) -> tuple[Variables, dict[str, Any]]:
    """Reads a variables checkpoint as numpy arrays: `(variables, metadata)`."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "variables")):
        raise FileNotFoundError(
            f"{path} is not a resnet_jax variables checkpoint (no 'variables' item inside); "
            "write one with `python -m resnet_jax.convert` or point at a training workdir"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            path,
            ocp.args.Composite(
                variables=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()
            ),
        )
    variables = jax.tree.map(np.asarray, restored["variables"])
    return variables, dict(restored["metadata"] or {})
