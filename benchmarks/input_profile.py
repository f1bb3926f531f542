"""Where the CPU time of one training image goes in our input pipeline, stage by stage.

    python benchmarks/input_profile.py [--num_images 200] [--size 500x375] [--repeats 3]

Generates photo-like JPEGs (as `input_pipeline.py` does), then times each stage of the training transform
alone, in one thread, with `time.process_time()` (CPU time, so other jobs on a shared machine matter less):
file read, header parse, crop box, JPEG decode (Pillow's draft, simplejpeg's whole image where installed, and
the region decoder where built: the pipeline's default), crop + resize, flip, float conversion + normalization,
batch copy (float32 and uint8). Then the whole pipeline in this process (`create_train_iterator` with 1 and 16
read threads) and a plain loop over the same transform: their difference is the pipeline's per-record
overhead and thread cost. Prints
milliseconds per image (median of `--repeats`) and images per CPU-second.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from input_pipeline import (  # noqa: E402
    close,
    cpu_seconds,
    folder_config,
    make_photo_folder,
    read_ahead_batches,
)

from resnet_jax.data import create_train_iterator, folder, jpeg, resize, stream, transforms  # noqa: E402

IMAGE_SIZE = 224
BATCH_SIZE = 32


def per_image_ms(stage: Callable[[int], object], count: int, repeats: int) -> float:
    """Median over `repeats` of the CPU milliseconds per call of stage(i) for i in range(count)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for i in range(count):
            stage(i)
        times.append((time.process_time() - start) * 1000 / count)
    return statistics.median(times)


def stage_breakdown(paths: list[str], repeats: int) -> dict[str, float]:
    """CPU ms per image of each stage of `transforms.train_crop_imagenet` + flip + normalize + batch copy."""
    count = len(paths)
    data = [open(p, "rb").read() for p in paths]
    rng = np.random.default_rng(0)
    boxes = []
    for raw in data:
        with Image.open(io.BytesIO(raw)) as image:
            boxes.append(transforms.random_resized_crop_box(*image.size, rng))

    def opened(i: int) -> Image.Image:
        return Image.open(io.BytesIO(data[i]))

    def drafted(i: int) -> tuple[Image.Image, tuple[float, ...]]:
        image = opened(i)
        return image, jpeg.drafted_crop_box(image, boxes[i], IMAGE_SIZE)

    def decoded(i: int) -> tuple[Image.Image, tuple[float, ...]]:
        image, box = drafted(i)
        image.load()
        return image, box

    def simplejpeg_decoded(i: int) -> tuple[Image.Image, float]:
        width, height = sizes[i]
        _, _, crop_width, crop_height = boxes[i]
        requested = (width * IMAGE_SIZE / crop_width, height * IMAGE_SIZE / crop_height)
        return jpeg.decode_scaled(data[i], sizes[i], *requested)

    def region_decoded(i: int) -> tuple[Image.Image, tuple[float, ...]]:
        return jpeg.decode_for_crop(data[i], sizes[i], boxes[i], IMAGE_SIZE)

    sizes = [jpeg.simplejpeg_size(raw) for raw in data]
    decoded_images = [decoded(i) for i in range(count)]
    crops = [
        transforms.train_crop_imagenet(raw, IMAGE_SIZE, np.random.default_rng(i))
        for i, raw in enumerate(data)
    ]
    flipped = [crop[:, ::-1] for crop in crops]
    resized = [Image.fromarray(crop) for crop in crops]
    shuffled = grain.MapDataset.range(count).shuffle(seed=0)
    order = stream.EpochOrder(count, seed=0)
    normalized = [
        transforms.normalize(f, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD) for f in flipped
    ]

    def read(i: int) -> bytes:
        with open(paths[i], "rb") as f:
            return f.read()

    cumulative = {
        "file read (open + read)": read,
        "header parse (Image.open from bytes)": lambda i: opened(i).size,
        "crop box (random_resized_crop_box)": lambda i: transforms.random_resized_crop_box(
            500, 375, rng
        ),
        "JPEG Pillow draft + decode (load; the fallback)": decoded,
        "JPEG header + decode, simplejpeg (RGBX mapped as RGB; whole image)": simplejpeg_decoded,
        "JPEG region decode (the resize's pixels only; the default)": region_decoded,
        "crop + resize to 224 (PIL, box)": lambda i: decoded_images[i][0].resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR, box=decoded_images[i][1]
        ),
        "crop + resize to 224 (fast_image_resize, box; the default)": lambda i: resize.resize_box(
            decoded_images[i][0], decoded_images[i][1], IMAGE_SIZE
        ),
        "to numpy (np.asarray of the 224 crop)": lambda i: np.asarray(resized[i]),
        "flip + contiguous copy (uint8)": lambda i: np.ascontiguousarray(crops[i][:, ::-1]),
        "flip in PIL (transpose) + to numpy": lambda i: np.asarray(
            resized[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ),
        "float32 conversion + normalize": lambda i: transforms.normalize(
            flipped[i], transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
        ),
        "shuffled index (Grain's index_shuffle, before issue 13)": lambda i: shuffled[i],
        "shuffled index (stream.EpochOrder, cached permutation)": lambda i: order[i],
        "batch copy, float32 (np.stack / 32)": lambda i: (
            np.stack(normalized[:BATCH_SIZE]) if i % BATCH_SIZE == 0 else None
        ),
        "batch copy, uint8 (np.stack / 32)": lambda i: (
            np.stack(crops[:BATCH_SIZE]) if i % BATCH_SIZE == 0 else None
        ),
    }
    if resize.cykooz_resizer is None:
        del cumulative["crop + resize to 224 (fast_image_resize, box; the default)"]
    if jpeg.simplejpeg is None:
        del cumulative["JPEG header + decode, simplejpeg (RGBX mapped as RGB; whole image)"]
    if jpeg.simplejpeg is None or jpeg._jpeg_region is None:
        del cumulative["JPEG region decode (the resize's pixels only; the default)"]
    results = {name: per_image_ms(stage, count, repeats) for name, stage in cumulative.items()}
    # Pillow's decoding includes parsing the header and drafting, so subtract what it contains.
    pillow_decode = "JPEG Pillow draft + decode (load; the fallback)"
    results[pillow_decode] -= results["header parse (Image.open from bytes)"]
    results["whole transform (TrainPreprocess.random_map, no file read)"] = per_image_ms(
        lambda i: preprocess.random_map({"image": data[i], "label": 0}, np.random.default_rng(i)),
        count,
        repeats,
    )
    results["whole transform, uint8 out (the trainer's)"] = per_image_ms(
        lambda i: preprocess_uint8.random_map(
            {"image": data[i], "label": 0}, np.random.default_rng(i)
        ),
        count,
        repeats,
    )
    return results


preprocess = transforms.TrainPreprocess(
    augment="imagenet",
    image_size=IMAGE_SIZE,
    mean=transforms.IMAGENET_MEAN,
    std=transforms.IMAGENET_STD,
)
# What the trainer runs: uint8 out, normalized in the compiled step.
preprocess_uint8 = transforms.TrainPreprocess(
    augment="imagenet",
    image_size=IMAGE_SIZE,
    mean=transforms.IMAGENET_MEAN,
    std=transforms.IMAGENET_STD,
    host_normalize=False,
)


def pipeline_rate(root: str, num_read_threads: int, batches: int, uint8_images: bool) -> float:
    """Images per CPU-second of `create_train_iterator` in this process (warmed up past its read-ahead)."""
    config = folder_config(root, num_workers=0)
    config.num_read_threads = num_read_threads
    iterator = create_train_iterator(
        config,
        process_index=0,
        process_count=1,
        global_batch_size=BATCH_SIZE,
        seed=0,
        uint8_images=uint8_images,
    )
    try:
        for _ in range(2 + read_ahead_batches("ours", 0, BATCH_SIZE)):
            next(iterator)
        start = cpu_seconds()
        for _ in range(batches):
            next(iterator)
        return batches * BATCH_SIZE / (cpu_seconds() - start)
    finally:
        close(iterator)  # its read-ahead threads must not outlive the temporary folder


def plain_loop_rate(paths: list[str], count: int) -> float:
    """Images per CPU-second of read + TrainPreprocess + np.stack in a plain loop (no Grain)."""
    start = cpu_seconds()
    for first in range(0, count, BATCH_SIZE):
        rows = []
        for i in range(first, first + BATCH_SIZE):
            with open(paths[i % len(paths)], "rb") as f:
                rows.append(
                    preprocess.random_map({"image": f.read(), "label": 0}, np.random.default_rng(i))
                )
        np.stack([row["image"] for row in rows])
    return count / (cpu_seconds() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--size", default="500x375")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    size = tuple(int(side) for side in args.size.split("x"))
    print(
        f"load average at start: {os.getloadavg()}; simplejpeg installed: {jpeg.simplejpeg is not None}"
    )
    with tempfile.TemporaryDirectory() as root:
        make_photo_folder(root, args.num_images, size=size)
        index = folder.index_folder(root, val_fraction=0.25)
        paths = [path for path, _ in index.train]
        breakdown = stage_breakdown(paths, args.repeats)
        print(f"CPU ms per image, {args.size} JPEGs, one thread, median of {args.repeats}:")
        for name, ms in breakdown.items():
            print(f"  {name:>60}: {ms:6.3f} ms")
        print("images per CPU-second, in this process:")
        print(
            f"  {'plain loop (read + transform + stack)':>60}: {plain_loop_rate(paths, 6 * BATCH_SIZE):6.1f}"
        )
        for threads, uint8_images in ((1, False), (16, False), (1, True), (16, True)):
            rate = pipeline_rate(root, threads, args.batches, uint8_images)
            used = stream.decoding_threads(threads, 0)
            images = "uint8" if uint8_images else "float32"
            name = f"Grain pipeline, {images}, num_read_threads={threads} ({used} used)"
            print(f"  {name:>60}: {rate:6.1f}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
