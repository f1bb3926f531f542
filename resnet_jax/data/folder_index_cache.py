"""The per-file header checks of a folder dataset, saved so that later runs and processes skip them.

Indexing a folder reads every image's header to skip unreadable files. At ImageNet scale (1.3M files) that
is minutes of I/O that every process of every run would repeat. The verdicts are stored in one JSON file,
beside the data (`<root>/.resnet_jax_index.json`) when that folder is writable, else in the user's cache
directory (`$XDG_CACHE_HOME` or `~/.cache`, `resnet_jax/folder_index/`, named by the folder's absolute path).

Validation: a verdict is reused only for a file whose path, size and modification time are what they were
when it was checked, so a folder whose files were added, removed or replaced is re-checked exactly where it
changed. Files modified within `RACY_SECONDS` of the check are never stored (their modification time cannot
tell a later rewrite apart: git's "racy" entries). A cache file that cannot be read, has another format or
another root is ignored and rewritten. Writes go to a temporary file renamed into place, so processes
starting at once each see either no cache or a whole one, never a torn write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence

from absl import logging

CACHE_NAME = ".resnet_jax_index.json"
FORMAT = "resnet_jax.folder_index/1"
# Files changed this recently when checked may change again within the file system's timestamp resolution.
RACY_SECONDS = 2.0

FileKey = tuple[int, int]  # (size in bytes, modification time in ns)


def user_cache_dir() -> str:
    """Where indexes of folders that are not writable go."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_jax", "folder_index")


def cache_paths(root: str) -> list[str]:
    """Candidate cache files of `root`, in order of preference: beside the data, then the user cache."""
    root = os.path.abspath(root)
    digest = hashlib.sha256(root.encode()).hexdigest()[:24]
    return [os.path.join(root, CACHE_NAME), os.path.join(user_cache_dir(), f"{digest}.json")]


def relative_name(path: str, directory: str) -> str:
    """`path` under `directory`, with '/' separators (a string cut for paths listed under it: at 100k
    files `os.path.relpath` alone took seconds)."""
    prefix = directory.rstrip(os.sep) + os.sep
    if path.startswith(prefix):
        name = path[len(prefix) :]
    else:
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(directory))
    return name.replace(os.sep, "/") if os.sep != "/" else name


def file_key(path: str) -> FileKey | None:
    """(size, mtime_ns) of a file, or None if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def load(root: str) -> dict[str, tuple[FileKey, bool]]:
    """{path relative to root: ((size, mtime_ns), readable)} from the first valid cache file of `root`."""
    root = os.path.abspath(root)
    for path in cache_paths(root):
        try:
            with open(path) as f:
                content = json.load(f)
            if content.get("format") != FORMAT or content.get("root") != root:
                raise ValueError("another format or root")
            return {
                name: ((int(size), int(mtime)), bool(readable))
                for name, (size, mtime, readable) in content["files"].items()
            }
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            logging.warning(
                "Ignoring the folder index cache %s (%s); it will be rewritten.", path, e
            )
    return {}


def save(root: str, files: dict[str, tuple[FileKey, bool]]) -> str | None:
    """Writes the verdicts atomically to the first writable cache location; returns its path (None: none)."""
    root = os.path.abspath(root)
    content = {
        "format": FORMAT,
        "root": root,
        "files": {name: [*key, readable] for name, (key, readable) in sorted(files.items())},
    }
    for path in cache_paths(root):
        directory = os.path.dirname(path)
        temporary = None
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=directory, prefix=".resnet_jax_index.", suffix=".tmp", delete=False
            ) as f:
                temporary = f.name
                json.dump(content, f, separators=(",", ":"))
            os.replace(temporary, path)
            return path
        except OSError:
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
    logging.warning("No writable place for the folder index cache of %s; not cached.", root)
    return None


def check_files(
    root: str, paths: Sequence[str], is_readable: Callable[[Sequence[str]], list[bool]]
) -> tuple[list[bool], int]:
    """(readable verdict per path, how many were checked now): cached verdicts where still valid, else
    `is_readable(paths to check)`; the cache is rewritten when anything was checked or dropped.

    Paths must lie under `root`.
    """
    cached = load(root)
    now_ns = time.time_ns()
    names = [relative_name(path, root) for path in paths]
    keys = [file_key(path) for path in paths]
    verdicts: list[bool | None] = []
    for name, key in zip(names, keys, strict=True):
        entry = cached.get(name)
        verdicts.append(entry[1] if entry is not None and entry[0] == key else None)
    to_check = [i for i, verdict in enumerate(verdicts) if verdict is None]
    for i, readable in zip(to_check, is_readable([paths[i] for i in to_check]), strict=True):
        verdicts[i] = readable
    racy_ns = now_ns - int(RACY_SECONDS * 1e9)
    files = {
        name: (key, verdict)
        for name, key, verdict in zip(names, keys, verdicts, strict=True)
        if key is not None and key[1] < racy_ns
    }
    if to_check or files.keys() != cached.keys():
        save(root, files)
    return [bool(verdict) for verdict in verdicts], len(to_check)
