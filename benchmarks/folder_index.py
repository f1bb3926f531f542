"""Start-up time of a large image folder: indexing it cold, from the index cache, and after a few changes.

    python benchmarks/folder_index.py [--num_files 100000] [--num_classes 100]

Writes `num_files` tiny JPEGs (the same 8x8 image's bytes) as root/class_k/*.jpg under a temporary folder,
then times `resnet_jax.data.folder.index_folder` (listing, train/eval split, header checks):
1. cold: no index cache, every header read;
2. warm: the cache written by 1 (what every later run and every other process of the same run pays);
3. after replacing 1% of the files: only those headers are read again.
Wall seconds and CPU seconds of this process (header reads run in 16 threads). The folder is deleted at the
end. Files must be older than the cache's racy window to be cached, so the script waits that long after
writing them.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from resnet_jax.data import folder, folder_index_cache  # noqa: E402


def write_files(root: str, num_files: int, num_classes: int) -> list[str]:
    """root/class_k/NNNNNNN.jpg, all the same tiny JPEG; returns the paths."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    paths = []
    for k in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{k:03d}"))
    for i in range(num_files):
        path = os.path.join(root, f"class_{i % num_classes:03d}", f"{i:07d}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def timed_index(root: str) -> tuple[float, float, folder.FolderIndex]:
    """(wall s, CPU s, index) of one uncached-in-memory `index_folder` call."""
    folder.index_folder.cache_clear()
    wall, cpu = time.perf_counter(), time.process_time()
    index = folder.index_folder(root)
    return time.perf_counter() - wall, time.process_time() - cpu, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_files", type=int, default=100_000)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="folder_index_")
    rows = []
    try:
        start = time.perf_counter()
        paths = write_files(root, args.num_files, args.num_classes)
        print(f"wrote {args.num_files} files in {time.perf_counter() - start:.1f} s")
        time.sleep(folder_index_cache.RACY_SECONDS + 0.5)
        cases = [("cold (no index cache)", None), ("warm (index cache)", None)]
        cases.append(("after replacing 1% of the files", paths[:: max(1, 100)]))
        first = None
        for name, to_replace in cases:
            if to_replace:
                for path in to_replace:
                    with open(path, "ab") as f:
                        f.write(b"\0")  # a changed size: the cached verdict no longer applies
                time.sleep(folder_index_cache.RACY_SECONDS + 0.5)
            wall, cpu, index = timed_index(root)
            first = first or index
            assert len(index.train) + len(index.eval) == args.num_files
            print(
                f"{name:>34}: {wall:6.2f} s wall, {cpu:6.2f} s CPU (load {os.getloadavg()[0]:.1f})"
            )
            rows.append(dict(case=name, wall_s=round(wall, 3), cpu_s=round(cpu, 3)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = dict(
        benchmark="folder_index",
        num_files=args.num_files,
        num_classes=args.num_classes,
        load_average_1m_at_start=round(load_at_start, 2),
        load_average_1m_at_end=round(os.getloadavg()[0], 2),
        cpu=common.machine_description()["cpu"],
        runs=rows,
    )
    print(f"wrote {common.write_result(args.results_dir, 'folder_index', result)}")


if __name__ == "__main__":
    main()
