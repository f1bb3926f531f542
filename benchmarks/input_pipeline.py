"""Input-pipeline throughput on an ImageNet-like folder of JPEGs: images/s, and per CPU core.

    python benchmarks/input_pipeline.py [--num_images 400] [--batch_size 32] [--output input_pipeline.json]

Generates `num_images` photo-like JPEGs of about 500x375 (ImageNet's typical size; smooth random fields with
grain, quality 90) in 4 classes in a temporary folder, then times the training pipeline (decode with JPEG draft,
RandomResizedCrop to 224 + flip, normalize to float32, batch) in this process and with 1 and 2 Grain worker
processes; then, on 60 camera-sized 1600x1200 JPEGs, in process with and without reduced-size JPEG decoding.
Each images/s figure is the median of `--repeats` timed runs of `--batches` batches after warm-up batches (worker
start-up excluded); "per decoding process" divides it by the processes decoding (1 in process, else the worker
count). Wall-clock rates depend on how many cores are free, so the script also reports images per CPU-second
(CPU time of the main process and its workers together, via psutil if installed): the per-core figure that does
not change with machine load. Runs in about 2-3 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.config import base_config  # noqa: E402
from resnet_jax.data import create_train_iterator, transforms  # noqa: E402


def make_photo_folder(
    root: str,
    num_images: int,
    size: tuple[int, int] = (500, 375),
    num_classes: int = 4,
    seed: int = 0,
) -> int:
    """Writes root/class_k/*.jpg (a third of them portrait); returns the total bytes written."""
    rng = np.random.default_rng(seed)
    total_bytes = 0
    for i in range(num_images):
        width, height = size if i % 3 else size[::-1]
        # Low-frequency colour field (upsampled 8x6 noise) plus fine grain: JPEG sizes like real photos.
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        class_dir = os.path.join(root, f"class_{i % num_classes}")
        os.makedirs(class_dir, exist_ok=True)
        path = os.path.join(class_dir, f"{i:05d}.jpg")
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        total_bytes += os.path.getsize(path)
    return total_bytes


def _cpu_seconds() -> float | None:
    """User + system CPU time of this process and all its children (Grain workers), or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0.0
    process = psutil.Process()
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(
    config, batch_size: int, warmup: int, batches: int, repeats: int
) -> tuple[float, float | None]:
    """(median images/s over `repeats` runs of `batches` batches after `warmup` batches, images per CPU-second).

    Images per CPU-second (all processes of the pipeline together) does not depend on how busy the machine is,
    so it is the figure to scale from: a pipeline on k free cores delivers about k times it.
    """
    iterator = create_train_iterator(
        config, process_index=0, process_count=1, global_batch_size=batch_size, seed=0
    )
    for _ in range(warmup):
        next(iterator)
    rates = []
    cpu_start = _cpu_seconds()
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    cpu_end = _cpu_seconds()
    assert batch["image"].shape == (batch_size, 224, 224, 3)
    per_cpu_second = None
    if cpu_start is not None:
        per_cpu_second = repeats * batches * batch_size / (cpu_end - cpu_start)
    return statistics.median(rates), per_cpu_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=400)
    parser.add_argument("--num_large_images", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="input_pipeline.json")
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags

    runs = []

    def run(
        name: str, root: str, num_workers: int, draft: bool, batches: int, repeats: int
    ) -> None:
        config = base_config()
        config.update(
            dataset=f"folder:{root}",
            image_size=224,
            augment="imagenet",
            normalization="imagenet",
            num_workers=num_workers,
        )
        original_draft = transforms.draft_jpeg
        if not draft:  # only affects this process: used for in-process runs
            transforms.draft_jpeg = lambda image, width, height: (1.0, 1.0)
        try:
            rate, per_cpu_second = measure(config, args.batch_size, args.warmup, batches, repeats)
        finally:
            transforms.draft_jpeg = original_draft
        decoding_processes = max(num_workers, 1)
        runs.append(
            dict(
                name=name,
                num_workers=num_workers,
                jpeg_draft=draft,
                images_per_s=round(rate, 1),
                images_per_s_per_decoding_process=round(rate / decoding_processes, 1),
                images_per_cpu_second=None if per_cpu_second is None else round(per_cpu_second, 1),
            )
        )
        cpu_text = (
            "" if per_cpu_second is None else f", {per_cpu_second:6.1f} images per CPU-second"
        )
        print(
            f"{name:>40}: {rate:6.1f} images/s, {rate / decoding_processes:6.1f} images/s per decoding "
            f"process{cpu_text}"
        )

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        total_bytes = make_photo_folder(root, args.num_images)
        print(
            f"generated {args.num_images} JPEGs of 500x375 (mean {total_bytes / args.num_images / 1024:.0f} "
            f"KiB) in {time.perf_counter() - start:.1f} s"
        )
        for num_workers in (0, 1, 2):
            name = f"500x375, {num_workers} worker(s)" if num_workers else "500x375, in process"
            run(name, root, num_workers, True, args.batches, args.repeats)
    # At ImageNet's size a 224 crop rarely allows a 1/2 DCT scale; camera-sized photos show what draft saves.
    with tempfile.TemporaryDirectory() as root:
        make_photo_folder(root, args.num_large_images, size=(1600, 1200))
        for draft in (True, False):
            name = "1600x1200, in process, " + ("JPEG draft" if draft else "full-size decode")
            run(name, root, 0, draft, max(args.batches // 3, 1), 2)
    result = dict(
        benchmark="input_pipeline",
        task="folder of JPEGs ~500x375 -> RandomResizedCrop 224 + flip + normalize, float32 batches",
        num_images=args.num_images,
        batch_size=args.batch_size,
        cpu_count=os.cpu_count(),
        load_average_1min_at_end=round(os.getloadavg()[0], 2),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
        runs=runs,
    )
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
