"""The files a conversion reads and writes: torch state dicts (.pth/.pt/...: torch, .safetensors: no torch) and
resnet_jax variables checkpoints, each output replaced atomically.

Safety: torch files are read only with `torch.load(..., weights_only=True)`, so nothing from a pickle is ever
executed. torch is imported only when a torch file is read or written.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from resnet_jax import checkpoint
from resnet_jax.convert.mapping import StateDict, Variables, numpy_view

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointFileError(ValueError):
    """A file that is not a readable checkpoint: truncated, another format, or a pickle that holds code."""


def _first_line(error: BaseException) -> str:
    """`Type: first sentence` of a library's error, so that the CLI's message stays one short line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else "(no message)"
    if len(line) > 160 and ". " in line:
        line = line.split(". ", 1)[0] + "."
    return f"{type(error).__name__}: {line}"


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


# ---------------------------------------------------------------------------------------------------------------
# Reading state dicts.


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
        return _load_safetensors(path)
    state = _unwrap(_torch_load(path))
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
    # Copies: the arrays outlive the tensors, and conversion must not alias anything torch may mutate.
    return {key: np.array(numpy_view(value), copy=True) for key, value in state.items()}


def _load_safetensors(path: str) -> StateDict:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))  # fresh arrays, owned by us
    except Exception as error:  # the Rust reader raises its own SafetensorError type
        raise CheckpointFileError(
            f"{path} is not a readable safetensors file (truncated or another format): "
            f"{_first_line(error)}"
        ) from error


def _torch_load(path: str) -> Any:
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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


def _unwrap(obj: Any) -> Any:
    # Training scripts often save {'state_dict': ..., 'epoch': ...} or {'model': ..., 'optimizer': ...}.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Writing: every output goes through a temporary sibling, so an old output survives a failed write.


@contextlib.contextmanager
def _replaced_atomically(path: str) -> Iterator[str]:
    """Yields a temporary path to write to; on success it replaces `path`, on failure it is removed."""
    # Same directory as the target, so the final rename stays on one file system (and so is atomic).
    directory, base = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    _discard(temporary)
    try:
        yield temporary
        _commit(temporary, os.path.abspath(path))
    finally:
        _discard(temporary)


def _commit(temporary: str, path: str) -> None:
    """Moves a fully written `temporary` to `path`; an old `path` is removed only after the move succeeded."""
    if not (os.path.isdir(path) or os.path.isdir(temporary)):
        os.replace(temporary, path)  # atomic for files
        return
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


def _discard(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def save_state_dict_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict of numpy arrays as `.safetensors` (no torch needed) or as a torch file."""
    with _replaced_atomically(path) as temporary:
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


# ---------------------------------------------------------------------------------------------------------------
# The resnet_jax side.


def save_variables_checkpoint(path: str, variables: Variables, metadata: dict[str, Any]) -> None:
    """Writes a variables checkpoint at `path`, replacing an old one only once the new one is complete."""
    with _replaced_atomically(path) as temporary:
        checkpoint.save_variables(temporary, variables, metadata=metadata)


def load_variables_checkpoint(path: str) -> tuple[Variables, dict[str, Any]]:
    """`(variables, metadata)` from a variables checkpoint or a training workdir (its latest step).

    Raises:
      CheckpointFileError: `path` is neither; the message is one line.
    """
    try:
        return checkpoint.load_variables(path)
    except Exception as error:
        raise CheckpointFileError(
            f"{path} could not be read as a resnet_jax variables checkpoint or training workdir: "
            f"{_first_line(error)}"
        ) from error
