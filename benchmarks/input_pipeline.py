"""Input-pipeline throughput on a folder of JPEGs, ours side by side with torchvision (and tf.data if installed).

    python benchmarks/input_pipeline.py [--num_images 400] [--batch_size 32] [--workers 0,1,2]

Generates `num_images` photo-like JPEGs of about 500x375 (ImageNet's typical size; smooth random fields with
grain, quality 90) in 4 classes in a temporary folder, then times on the same files, in this process:
- ours: `create_train_iterator` (RandomResizedCrop 224 + flip, uint8 batches as the trainer gets them: the
  normalization runs in the compiled step), in process and with each of `--workers` Grain worker processes;
- torchvision: `ImageFolder` + `DataLoader` with RandomResizedCrop(224), RandomHorizontalFlip, ToTensor,
  Normalize (ImageNet statistics), the same batch size and worker counts (0 = in process); torch runs with one
  intra-op thread, as its DataLoader workers do;
Like with like: with workers, each of our Grain workers decodes with one thread, as a DataLoader worker does
(`stream.decoding_threads`), so W workers are W decoding cores on both sides and the training process does
no decoding. In process, ours decodes with up to one thread per core and torchvision with one: compare their
images per CPU-second there, not their wall rates.
- tf.data (only where TensorFlow is installed; it is not a dependency): `decode_and_crop_jpeg` with
  `sample_distorted_bounding_box` (the Flax/TPU reference recipe), flip, normalize, batch, AUTOTUNE parallelism;
  in process only (it has no worker processes).
Then the same, in process, on `--num_large_images` camera-sized 1600x1200 JPEGs.

Timing runs in `--repeats` rounds; each round times every pipeline in turn, one at a time: a fresh pipeline,
`--warmup` batches plus what it reads ahead (worker start-up excluded), then `--batches` timed batches, then
closed before the next starts. Alternating rounds let the machine's drift hit every pipeline alike. Figures:
- images per CPU-second: images divided by the CPU time (user + system) of this process and all its children
  (workers) over the timed batches: the figure to compare and to scale from (k free cores deliver about k
  times it). It depends on load far less than the wall rate does, but not nothing: on a shared 2-core VM
  it moved by a third between identical runs, hence the rounds;
- the ratio to torchvision's images per CPU-second: the median of the rounds' ratios;
- wall images/s (median of the rounds): depends on the free cores; on a shared machine, read it as measured
  under the load printed with it.
Needs psutil (for the workers' CPU time) and torch/torchvision (the `test` extra).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)

from resnet_jax.config import base_config  # noqa: E402
from resnet_jax.data import create_train_iterator, transforms  # noqa: E402

IMAGE_SIZE = 224


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


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its children (the pipeline's workers)."""
    import psutil

    total = 0.0
    process = psutil.Process()
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def folder_config(root: str, num_workers: int) -> Any:
    """The trainer's config for the ImageNet recipe on the image folder `root`."""
    config = base_config()
    config.update(
        dataset=f"folder:{root}",
        image_size=IMAGE_SIZE,
        augment="imagenet",
        normalization="imagenet",
        num_workers=num_workers,
        # Every class of a small benchmark folder keeps some eval images.
        folder_val_fraction=0.25,
    )
    return config


def ours(root: str, num_workers: int, batch_size: int) -> Iterator[Any]:
    """Our training batches, as the trainer reads them (uint8; normalized in the step)."""
    config = folder_config(root, num_workers)
    return create_train_iterator(
        config,
        process_index=0,
        process_count=1,
        global_batch_size=batch_size,
        seed=0,
        uint8_images=True,
    )


def torchvision_batches(root: str, num_workers: int, batch_size: int) -> Iterator[Any]:
    """torchvision's ImageNet training input: ImageFolder + DataLoader, endless over epochs."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as tv

    transform = tv.Compose(
        [
            tv.RandomResizedCrop(IMAGE_SIZE),
            tv.RandomHorizontalFlip(),
            tv.ToTensor(),
            tv.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(root, transform=transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    while True:
        yield from loader


def tf_data_batches(root: str, num_workers: int, batch_size: int) -> Iterator[Any]:
    """tf.data's decode_and_crop_jpeg pipeline (the Flax ImageNet example's); AUTOTUNE picks its threads."""
    import tensorflow as tf

    files = tf.io.gfile.glob(os.path.join(root, "*", "*.jpg"))
    classes = sorted({os.path.basename(os.path.dirname(f)) for f in files})
    labels = [classes.index(os.path.basename(os.path.dirname(f))) for f in files]

    def decode(path: Any, label: Any) -> tuple[Any, Any]:
        data = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(data)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape,
            tf.zeros([0, 0, 4], tf.float32),
            area_range=transforms.RRC_SCALE,
            aspect_ratio_range=transforms.RRC_RATIO,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], "bilinear")
        image = tf.image.random_flip_left_right(image)
        image = (image / 255.0 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
        return image, label

    dataset = (
        tf.data.Dataset.from_tensor_slices((files, labels))
        .shuffle(len(files))
        .repeat()
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return iter(dataset)


PIPELINES: dict[str, Callable[[str, int, int], Iterator[Any]]] = {
    "ours": ours,
    "torchvision": torchvision_batches,
    "tf.data": tf_data_batches,
}


def read_ahead_batches(name: str, num_workers: int, batch_size: int) -> int:
    """Batches a pipeline can have prepared in the background before they are asked for."""
    if name == "torchvision":
        return 2 * num_workers  # DataLoader's prefetch_factor
    if name == "ours":
        config = base_config()
        per_process = math.ceil(config.prefetch_buffer_size / batch_size)
        return per_process * max(num_workers, 1) + config.worker_buffer_size * num_workers
    return 64  # tf.data's AUTOTUNE buffers: a guess, generous


def time_pipeline(
    make: Callable[[], Iterator[Any]], warmup: int, batches: int, batch_size: int
) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `batches` batches from a fresh pipeline, after `warmup` batches.

    The pipeline is closed before this returns: the CPU time is that of the whole process tree, so a
    pipeline left filling its buffers in the background would be charged to the next one timed. `warmup`
    batches must exceed what the pipeline reads ahead, so that the timed batches are all made (and paid
    for) inside the timed interval rather than taken from a buffer filled before it.
    """
    iterator = make()
    try:
        for _ in range(warmup):
            next(iterator)
        cpu_start, start = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return time.perf_counter() - start, cpu_seconds() - cpu_start
    finally:
        close(iterator)


def close(iterator: Iterator[Any]) -> None:
    """Stops an iterator's worker processes now rather than at garbage collection, and waits until this process
    is quiet: an in-process Grain iterator's read-ahead threads finish the batches they started after `close`
    (measured: ~0.13 CPU-s, ~50 images), which would otherwise be charged to the next pipeline timed."""
    if hasattr(iterator, "close"):
        iterator.close()
    for _ in range(40):  # at most ~10 s
        before = cpu_seconds()
        time.sleep(0.25)
        if cpu_seconds() - before < 0.005:
            return


def run_case(
    label: str,
    root: str,
    num_workers: int,
    names: list[str],
    args: argparse.Namespace,
    batches: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """Times the named pipelines on one folder with one worker count; prints and returns one row each.

    tf.data runs in process only: it has no worker processes (its AUTOTUNE threads take every core), so a
    "1 worker" or "2 workers" row of it would time the same pipeline again under another name."""
    if num_workers > 0:
        names = [name for name in names if name != "tf.data"]
    # Rounds alternate the pipelines, so that the machine's drift (this VM's speed moves by a third between
    # identical runs minutes apart) hits each of them alike; the ratio is the median of the rounds' ratios.
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            seconds, cpu_seconds_used = time_pipeline(
                functools.partial(PIPELINES[name], root, num_workers, args.batch_size),
                args.warmup + read_ahead_batches(name, num_workers, args.batch_size),
                batches,
                args.batch_size,
            )
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds_used)
    images = batches * args.batch_size
    timed = {
        name: (
            statistics.median(images / seconds for seconds in wall[name]),
            images * repeats / sum(cpu[name]),
        )
        for name in names
    }
    rows = []
    workers = f"{num_workers} worker(s)" if num_workers else "in process"
    for name, (rate, per_cpu_second) in timed.items():
        ratio = (
            statistics.median(t / c for c, t in zip(cpu[name], cpu["torchvision"], strict=True))
            if "torchvision" in timed
            else None
        )
        ratio_text = (
            "" if ratio is None or name == "torchvision" else f" ({ratio:.2f}x torchvision's)"
        )
        print(
            f"{label}, {workers:>12}, {name:>11}: {per_cpu_second:6.1f} images per CPU-second{ratio_text}, "
            f"{rate:6.1f} wall images/s (load {os.getloadavg()[0]:.1f})"
        )
        rows.append(
            dict(
                images=label,
                pipeline=name,
                num_workers=num_workers,
                images_per_cpu_second=round(per_cpu_second, 1),
                wall_images_per_s=round(rate, 1),
                ratio_to_torchvision_per_cpu_second=None if ratio is None else round(ratio, 3),
                load_average_1m=round(os.getloadavg()[0], 2),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=400)
    parser.add_argument("--num_large_images", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="worker counts to time (0 = in process)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--skip_large", action="store_true", help="skip the 1600x1200 JPEGs")
    parser.add_argument("--results_dir", default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--name", default="input_pipeline", help="the JSON file's name")
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    import torch
    import torchvision  # noqa: F401  (before TensorFlow: importing it after TensorFlow segfaults)

    torch.set_num_threads(
        1
    )  # what DataLoader workers use; no intra-op threads competing in process
    names = ["ours", "torchvision"]
    try:
        import tensorflow  # noqa: F401

        names.append("tf.data")
    except ImportError:
        print(
            "tf.data: skipped (TensorFlow is not installed; `pip install tensorflow-cpu` to compare)"
        )
    from resnet_jax.data import jpeg, resize

    print(
        f"ours decodes JPEGs with {jpeg.decoder_description()} and resizes the crop with "
        f"{resize.resizer_description()}"
    )
    load_at_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        total_bytes = make_photo_folder(root, args.num_images)
        print(
            f"generated {args.num_images} JPEGs of 500x375 (mean {total_bytes / args.num_images / 1024:.0f} "
            f"KiB) in {time.perf_counter() - start:.1f} s"
        )
        for num_workers in (int(w) for w in args.workers.split(",")):
            rows += run_case("500x375", root, num_workers, names, args, args.batches, args.repeats)
    if not args.skip_large:
        # Camera-sized photos: where decoding at a reduced DCT scale pays.
        with tempfile.TemporaryDirectory() as root:
            make_photo_folder(root, args.num_large_images, size=(1600, 1200))
            rows += run_case("1600x1200", root, 0, names, args, args.batches, args.repeats)
    result = dict(
        benchmark="input_pipeline",
        task="folder of JPEGs -> RandomResizedCrop 224 + flip + batches (ours: uint8, as the trainer gets "
        "them, normalized in the step; torchvision: ToTensor + Normalize, float32)",
        num_images=args.num_images,
        batch_size=args.batch_size,
        load_average_1m_at_start=round(load_at_start, 2),
        jpeg_decoder=jpeg.decoder_description(),
        crop_resizer=resize.resizer_description(),
        machine=common.machine_description(),
        runs=rows,
    )
    print(f"wrote {common.write_result(args.results_dir, args.name, result)}")


if __name__ == "__main__":
    main()
