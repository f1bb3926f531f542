"""The data pipeline: sources (folder, TFDS, digits), sharding, determinism, resume, augmentation, exact eval."""

import contextlib
import io
import logging
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax.config import base_config, validate_config
from resnet_jax.data import (
    DataError,
    create_eval_batches,
    create_train_iterator,
    dataset_info,
    dataset_spec,
    folder,
    jpeg,
    num_eval_batches,
    sources,
    stream,
    transforms,
)

IMAGENET_MEAN = np.asarray(transforms.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.asarray(transforms.IMAGENET_STD, np.float32)


def _config(**overrides) -> ml_collections.ConfigDict:
    """base_config() with a test's data keys, validated: what the trainer hands the pipeline."""
    config = base_config()
    config.update(overrides)
    validate_config(config)
    return config


def _save(path, array, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


@pytest.fixture(autouse=True)
def _fresh_folder_cache():
    # index_folder is cached per process; tests rewrite trees under the same tmp paths.
    folder.index_folder.cache_clear()
    yield


@pytest.fixture
def photo_tree(tmp_path):
    """root/{Dog,bird,cat}/ with PNG and JPEG photos of different sizes, plus one corrupt JPEG in cat/."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for class_name in ("cat", "Dog", "bird"):
        for i in range(10):
            height, width = 40 + 3 * i, 56 - 2 * i
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            fmt, ext = (("PNG", "png"), ("JPEG", "jpg"), ("JPEG", "JPEG"))[i % 3]
            _save(str(root / class_name / f"img{i:02d}.{ext}"), array, fmt)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture
def indexed_tree(tmp_path):
    """root/train (2 classes x 12) and root/val (2 classes x 5) of 8x8 PNGs whose pixels encode their id."""
    root = tmp_path / "indexed"
    example_id = 0
    for split, per_class in (("train", 12), ("val", 5)):
        for label, class_name in enumerate(("a", "b")):
            for _ in range(per_class):
                array = np.zeros((8, 8, 3), np.uint8)
                array[..., 0] = example_id
                array[..., 1] = label * 100
                _save(str(root / split / class_name / f"{example_id:03d}.png"), array, "PNG")
                example_id += 1
    return root


def _indexed_config(root, **kwargs):
    return _config(
        dataset=f"folder:{root}", image_size=8, augment="none", normalization="imagenet", **kwargs
    )


def _ids(batch, mask=None):
    """Example ids and labels encoded in indexed_tree's pixels."""
    pixels = np.round((batch["image"][:, 0, 0] * IMAGENET_STD + IMAGENET_MEAN) * 255).astype(int)
    if mask is not None:
        pixels = pixels[mask > 0]
    return pixels[:, 0], pixels[:, 1] // 100


# ------------------------------------------------------------------------------------------------ folder source


def test_folder_classes_and_samples_match_torchvision_imagefolder(photo_tree):
    import torchvision

    index = folder.index_folder(str(photo_tree), val_fraction=0.2, max_bad_image_fraction=0.05)
    reference = torchvision.datasets.ImageFolder(str(photo_tree))
    assert index.class_names == tuple(reference.classes) == ("Dog", "bird", "cat")
    readable = [
        (path, label) for path, label in reference.samples if not path.endswith("broken.jpg")
    ]
    assert sorted(index.train + index.eval) == sorted(readable)
    for path, label in index.train + index.eval:
        assert os.path.basename(os.path.dirname(path)) == index.class_names[label]


def test_folder_held_out_split_is_deterministic_disjoint_and_decided_by_the_path_hash(photo_tree):
    first = folder.index_folder(str(photo_tree), val_fraction=0.2, max_bad_image_fraction=0.05)
    folder.index_folder.cache_clear()
    second = folder.index_folder(str(photo_tree), val_fraction=0.2, max_bad_image_fraction=0.05)
    assert first == second
    assert not set(first.train) & set(first.eval) and first.test == ()
    assert len(first.train) + len(first.eval) == 30
    for path, _ in first.train + first.eval:
        held_out = sources.hash_fraction(os.path.relpath(path, photo_tree)) < 0.2
        assert ((path, _) in first.eval) == held_out, path
    # Every class has images on both sides (else index_folder raises): here 3, 1 and 1 of 10 held out.
    eval_per_class = np.bincount([label for _, label in first.eval], minlength=3)
    assert eval_per_class.tolist() == [3, 1, 1]


@pytest.mark.parametrize("layout", ["classes", "train_folder"])
def test_adding_and_removing_files_moves_no_other_file_between_train_and_eval(tmp_path, layout):
    root = tmp_path / "grow"
    classes_dir = root if layout == "classes" else root / "train"
    rng = np.random.default_rng(0)

    def add(class_name, names):
        for name in names:
            _save(
                str(classes_dir / class_name / name),
                rng.integers(0, 256, (6, 6, 3), np.uint8),
                "PNG",
            )

    for class_name in ("a", "b"):
        add(class_name, [f"{i:03d}.png" for i in range(40)])
    before = folder.index_folder(str(root), val_fraction=0.25)
    for class_name in ("a", "b", "c"):  # 60 more files per class, and a new class
        add(class_name, [f"new{i:03d}.png" for i in range(60)])
    os.remove(classes_dir / "a" / "007.png")
    folder.index_folder.cache_clear()
    after = folder.index_folder(str(root), val_fraction=0.25)
    assert after.class_names == ("a", "b", "c")
    kept = {path for path, _ in before.train + before.eval} - {str(classes_dir / "a" / "007.png")}
    assert {p for p, _ in before.eval} & kept == {p for p, _ in after.eval} & kept
    assert {p for p, _ in before.train} & kept == {p for p, _ in after.train} & kept
    assert 0.15 < len(after.eval) / (len(after.train) + len(after.eval)) < 0.35


def test_folder_with_one_class_or_a_class_without_train_or_eval_images_is_one_error(tmp_path):
    def tree(name, counts):
        for class_name, count in counts.items():
            os.makedirs(tmp_path / name / class_name, exist_ok=True)
            for i in range(count):
                array = np.zeros((4, 4, 3), np.uint8)
                _save(str(tmp_path / name / class_name / f"{i}.png"), array, "PNG")

    def info(name):
        return dataset_info(_config(dataset=f"folder:{tmp_path / name}", folder_val_fraction=0.3))

    tree("one", {"only": 20})
    with pytest.raises(DataError, match=r"has 1 class \(only\): a classifier needs at least two"):
        info("one")
    tree(
        "few", {"many": 40, "few": 2}
    )  # few/0.png and few/1.png hash to 0.93 and 0.62: none held out
    with pytest.raises(
        DataError, match=r"no eval \(0.3 of the images, by path hash\) images in class\(es\) few"
    ):
        info("few")
    tree("split/train", {"full": 5, "empty": 0})
    tree("split/val", {"full": 2, "empty": 2})
    with pytest.raises(
        DataError, match=r"no training images in class\(es\) empty\. Every class needs both"
    ):
        info("split")


def test_truncated_jpeg_that_passes_the_header_check_is_skipped_by_the_pipeline(
    indexed_tree, caplog
):
    jpeg = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, format="JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]  # header intact, image data cut off
    (indexed_tree / "train" / "a" / "999_truncated.jpg").write_bytes(truncated)
    (indexed_tree / "val" / "b" / "999_truncated.jpg").write_bytes(truncated)
    config = _indexed_config(indexed_tree)
    info = dataset_info(config)  # identified by their headers: not caught up front
    assert (info.num_train_examples, info.num_eval_examples) == (25, 11)
    iterator = create_train_iterator(
        config, process_index=0, process_count=1, global_batch_size=5, seed=0
    )
    with caplog.at_level(logging.WARNING):
        ids = np.concatenate([_ids(next(iterator))[0] for _ in range(10)])
    assert "Skipping undecodable image" in caplog.text and "999_truncated.jpg" in caplog.text
    # Every readable image still comes, in full batches: the next decodable example stands in for the bad one.
    assert set(ids.tolist()) == set(range(24))
    assert [len(set(ids[:25].tolist())), len(set(ids[25:].tolist()))] == [24, 24]
    # In eval the bad image becomes a masked row: the batch count stays what every process expects.
    batches = list(
        create_eval_batches(config, process_index=0, process_count=1, local_batch_size=4)
    )
    assert len(batches) == num_eval_batches(11, 1, 4) == 3
    assert sum(b["mask"].sum() for b in batches) == 10
    assert sorted(np.concatenate([_ids(b, b["mask"])[0] for b in batches]).tolist()) == list(
        range(24, 34)
    )


def test_folder_train_val_subfolders_are_the_splits(indexed_tree):
    info = dataset_info(_indexed_config(indexed_tree))
    assert (info.num_train_examples, info.num_eval_examples, info.class_names) == (
        24,
        10,
        ("a", "b"),
    )
    # A config naming another conventional eval folder ("test", the trainer's default) finds val/.
    folder.index_folder.cache_clear()
    assert dataset_info(_indexed_config(indexed_tree, eval_split="test")).num_eval_examples == 10


@contextlib.contextmanager
def _cifar10_splits():
    """cifar10's real splits (train, test; 32x32 images): tfds.testing.mock_data's metadata lists none."""
    real = sources.tfds_defaults
    sources.tfds_defaults = lambda name, data_dir: sources.TfdsDefaults("train", None, "test", 32)
    try:
        yield
    finally:
        sources.tfds_defaults = real


def test_none_means_the_datasets_default_splits_and_augmentation(indexed_tree):
    def splits(spec):
        return (
            spec.train_split,
            spec.eval_split,
            spec.test_split,
            spec.held_out_fraction,
            spec.augment,
        )

    digits = dataset_spec(_config(dataset="digits"))
    assert splits(digits) == ("train", "validation", "test", 0.0, "none")
    photos = dataset_spec(_config(dataset=f"folder:{indexed_tree}"))
    assert splits(photos) == (
        "train",
        None,
        None,
        0.0,
        "imagenet",
    )  # the folder's val/ (see index_folder)
    with tfds.testing.mock_data(num_examples=4), _cifar10_splits():
        cifar = dataset_spec(_config(dataset="cifar10", data_dir="/nonexistent/tfds"))
    assert splits(cifar) == (
        "train",
        "validation",
        "test",
        0.1,
        "cifar",
    )  # validation held out of train
    # A config that names its eval split evaluates on it and has no test split apart from it.
    chosen = dataset_spec(_config(dataset="digits", augment="cifar", eval_split="test"))
    assert splits(chosen) == ("train", "test", None, 0.0, "cifar")


# ------------------------------------------------------------------------------------- train iterator properties


def _global_batches(config, process_count, num_steps, start_step=0, seed=3, global_batch_size=8):
    """Global batches `start_step .. start_step + num_steps - 1`: every process's rows, concatenated."""
    iterators = [
        create_train_iterator(
            config,
            process_index=process_index,
            process_count=process_count,
            global_batch_size=global_batch_size,
            seed=seed,
            start_step=start_step,
        )
        for process_index in range(process_count)
    ]
    batches = []
    for _ in range(num_steps):
        rows = [next(iterator) for iterator in iterators]
        batches.append({key: np.concatenate([r[key] for r in rows]) for key in ("image", "label")})
    return batches


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(g["image"], w["image"], err_msg=f"batch {step}")
        np.testing.assert_array_equal(g["label"], w["label"], err_msg=f"batch {step}")


def test_global_batches_are_the_same_on_one_two_or_four_processes_and_reshuffled_each_epoch(
    indexed_tree,
):
    config = _indexed_config(indexed_tree)
    one = _global_batches(config, 1, 9)  # 24 examples, global batch 8: 3 batches an epoch
    for batch in one:
        np.testing.assert_array_equal(
            batch["label"], _ids(batch)[1]
        )  # label travels with its image
    epochs = [np.concatenate([_ids(b)[0] for b in one[e * 3 : e * 3 + 3]]) for e in range(3)]
    assert all(
        sorted(ids.tolist()) == list(range(24)) for ids in epochs
    )  # each epoch: every example once
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    for process_count in (2, 4):
        _assert_same_batches(_global_batches(config, process_count, 9), one)
    # Process p holds rows [p * B / P, (p + 1) * B / P): process 1 of 2 reads rows 4..7.
    second_half = next(
        create_train_iterator(config, process_index=1, process_count=2, global_batch_size=8, seed=3)
    )
    np.testing.assert_array_equal(second_half["image"], one[0]["image"][4:])


def test_an_epoch_leaves_out_the_remainder_differently_each_time(indexed_tree):
    config = _indexed_config(indexed_tree)
    batches = _global_batches(
        config, 2, 6, global_batch_size=10
    )  # 24 examples: 2 batches, 4 left out
    epochs = [
        set(np.concatenate([_ids(b)[0] for b in batches[e * 2 : e * 2 + 2]]).tolist())
        for e in range(3)
    ]
    assert all(len(ids) == 20 for ids in epochs)
    assert len({frozenset(ids) for ids in epochs}) > 1


def test_same_seed_gives_same_batches_and_another_seed_differs():
    config = _config(dataset="digits", augment="cifar", image_size=8, crop_padding=2)
    a, b, c = (_global_batches(config, 1, 3, seed=seed, global_batch_size=16) for seed in (7, 7, 8))
    _assert_same_batches(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_a_resumed_stream_on_another_topology_continues_with_the_same_batches():
    # Across the epoch boundary (1,293 train digits, global batch 64: 20 steps an epoch), with augmentation:
    # one process read from step 0, four processes started at step 18 read exactly its batches 18..22.
    config = _config(dataset="digits", image_size=8, augment="cifar", crop_padding=2)
    uninterrupted = _global_batches(config, 1, 23, global_batch_size=64)
    _assert_same_batches(
        _global_batches(config, 4, 5, start_step=18, global_batch_size=64), uninterrupted[18:]
    )


def test_worker_processes_give_the_same_batches_as_none():
    config = _config(dataset="digits", image_size=8, augment="cifar", crop_padding=2)
    in_process = _global_batches(config, 2, 3, start_step=19, global_batch_size=64)
    config.num_workers = 2
    _assert_same_batches(
        _global_batches(config, 2, 3, start_step=19, global_batch_size=64), in_process
    )


def test_stream_seeds_of_neighbouring_run_seeds_are_far_apart():
    # Derived seeds of neighbouring run seeds must not be neighbours (a per-epoch `seed + epoch` would
    # make run 5's epoch 1 run 6's epoch 0).
    seeds = [stream.derived_seed(seed, "order") for seed in range(100)]
    assert min(abs(a - b) for a, b in zip(seeds, seeds[1:], strict=False)) > 1000
    assert stream.derived_seed(0, "order") != stream.derived_seed(0, "augment")


# ------------------------------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("augment", ["imagenet", "cifar", "none"])
def test_augmentation_output_shapes_dtypes_and_ranges(photo_tree, augment):
    config = _config(
        dataset=f"folder:{photo_tree}",
        image_size=32,
        augment=augment,
        normalization="imagenet",
        max_bad_image_fraction=0.05,
        folder_val_fraction=0.2,  # 10% would hold out none of cat's 10 images (one clear error)
    )
    low, high = (0 - IMAGENET_MEAN) / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    batch = next(
        create_train_iterator(config, process_index=0, process_count=1, global_batch_size=8, seed=0)
    )
    evaluation = next(
        create_eval_batches(config, process_index=0, process_count=1, local_batch_size=8)
    )
    for b in (batch, evaluation):
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32
        assert np.all(b["image"] >= low - 1e-5) and np.all(b["image"] <= high + 1e-5)
        assert b["image"].std() > 0.1  # real pixels, not padding
    if augment == "cifar":  # zero padding (black) shows at the borders of some crops
        assert np.isclose(batch["image"], low, atol=1e-5).all(axis=-1).any()


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in ((500, 375), (64, 640), (300, 300)):
        for _ in range(200):
            left, top, crop_width, crop_height = transforms.random_resized_crop_box(
                width, height, rng
            )
            assert (
                0 <= left
                and left + crop_width <= width
                and 0 <= top
                and top + crop_height <= height
            )
            fraction = crop_width * crop_height / (width * height)
            if (width, height) != (64, 640):  # the fallback clamps extreme aspect ratios instead
                assert 0.08 * 0.9 <= fraction <= 1.0
                assert 3 / 4 * 0.9 <= crop_width / crop_height <= 4 / 3 * 1.1


def test_imagenet_eval_crop_equals_torchvision_resize_and_center_crop():
    import torchvision.transforms as torchvision_transforms

    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    ours = transforms.eval_crop_imagenet(png.getvalue(), image_size=112)
    reference = torchvision_transforms.Compose(
        [torchvision_transforms.Resize(128), torchvision_transforms.CenterCrop(112)]
    )(Image.fromarray(array))
    np.testing.assert_array_equal(ours, np.asarray(reference))


def test_jpeg_decoded_at_reduced_size_stays_close_to_full_decode():
    # A smooth photo-like image: draft (DCT-domain downscaling) then resize ~ full decode then resize.
    y, x = np.mgrid[0:600, 0:800]
    array = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], -1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="JPEG", quality=95)
    drafted = transforms.eval_crop_imagenet(encoded.getvalue(), image_size=64)
    full = transforms.eval_crop_imagenet(np.asarray(Image.open(encoded)), image_size=64)
    assert drafted.shape == full.shape == (64, 64, 3)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 2.0
    image = Image.open(io.BytesIO(encoded.getvalue()))
    jpeg.draft_jpeg(image, 73, 73)
    assert image.size == (100, 75)  # decoded at 1/8 scale


# ---------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_batches_count_every_example_once_with_mask(indexed_tree, process_count):
    config = _indexed_config(indexed_tree)
    seen = []
    counts = []
    for process_index in range(process_count):
        batches = list(
            create_eval_batches(
                config, process_index=process_index, process_count=process_count, local_batch_size=4
            )
        )
        counts.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (4, 8, 8, 3) and batch["mask"].dtype == np.float32
            assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
            ids, labels = _ids(batch, batch["mask"])
            np.testing.assert_array_equal(batch["label"][batch["mask"] > 0], labels)
            assert np.all(batch["image"][batch["mask"] == 0] == 0)
            seen.extend(ids.tolist())
    assert sorted(seen) == list(range(24, 34))  # the 10 val images, each exactly once
    assert counts == [num_eval_batches(10, process_count, 4)] * process_count


def test_eval_batches_with_worker_processes_equal_in_process_batches():
    # Each worker would batch its own share of the examples: batches are formed before the workers instead.
    kwargs = dict(process_index=1, process_count=2, local_batch_size=64, split="test")
    in_process = list(create_eval_batches(_config(dataset="digits", image_size=8), **kwargs))
    with_workers = list(
        create_eval_batches(_config(dataset="digits", image_size=8, num_workers=2), **kwargs)
    )
    assert len(in_process) == len(with_workers) == num_eval_batches(360, 2, 64) == 3
    for want, got in zip(in_process, with_workers, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(got[key], want[key])
    assert sum(b["mask"].sum() for b in with_workers) == 180


def test_eval_pads_with_fully_masked_batches_when_a_shard_is_empty(indexed_tree):
    config = _indexed_config(indexed_tree)
    batches = list(
        create_eval_batches(config, process_index=11, process_count=12, local_batch_size=4)
    )
    assert len(batches) == 1 and batches[0]["mask"].sum() == 0


# ----------------------------------------------------------------------------------------------------- TFDS


def test_tfds_data_source_path_with_mock_data():
    config = _config(dataset="cifar10", data_dir="/nonexistent/tfds", image_size=32)
    with tfds.testing.mock_data(num_examples=40), _cifar10_splits():
        info = dataset_info(config)
        # cifar10 has no validation split: 10% of train, chosen by index hash, is held out for it.
        held_out = int((sources.index_hash_fractions(40) < 0.1).sum())
        sizes = (info.num_train_examples, info.num_eval_examples, info.num_test_examples)
        assert (info.num_classes, info.image_size, sizes) == (10, 32, (40 - held_out, held_out, 40))
        assert held_out > 0 and info.eval_split == "0.1 of train, by index hash"
        batch = next(
            create_train_iterator(
                config, process_index=0, process_count=1, global_batch_size=8, seed=0
            )
        )
        assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
        masks = [
            b["mask"].sum()
            for b in create_eval_batches(
                config, process_index=0, process_count=1, local_batch_size=16, split="test"
            )
        ]
        assert masks == [16, 16, 8]


class TinyJpegs(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder with a JPEG Image feature, prepared as ArrayRecord without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=["dark", "light"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "validation": self._generate_examples(5)}

    def _generate_examples(self, num_examples):
        for i in range(num_examples):
            label = i % 2
            jpeg = io.BytesIO()
            Image.fromarray(np.full((48, 64, 3), 40 + 170 * label, np.uint8)).save(
                jpeg, format="JPEG"
            )
            jpeg.seek(0)
            yield i, {"image": jpeg, "label": label}


def test_tfds_prepared_array_record_jpeg_is_decoded_by_the_pipeline(tmp_path):
    TinyJpegs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = _config(
        dataset="tiny_jpegs", data_dir=str(tmp_path), image_size=16, normalization="imagenet"
    )
    info = dataset_info(config)
    assert (info.num_train_examples, info.num_eval_examples, info.class_names) == (
        12,
        5,
        ("dark", "light"),
    )
    source = sources.TfdsSource("tiny_jpegs", "train", str(tmp_path))
    # JPEG stays encoded in the source: the transform decodes it at reduced size.
    assert isinstance(source[0]["image"], bytes)
    copy = pickle.loads(pickle.dumps(source))  # what Grain worker processes receive
    assert copy[3]["image"] == source[3]["image"] and repr(copy) == repr(source)
    batches = list(
        create_eval_batches(config, process_index=0, process_count=1, local_batch_size=8)
    )
    assert [b["mask"].sum() for b in batches] == [5]  # 5 examples, one batch of 8
    pixels = batches[0]["image"][:5] * IMAGENET_STD + IMAGENET_MEAN
    brightness = pixels.mean(axis=(1, 2, 3))
    np.testing.assert_array_equal(brightness > 0.5, batches[0]["label"][:5] == 1)
    with pytest.raises(DataError, match="has no split 'test'"):
        dataset_info(_config(dataset="tiny_jpegs", data_dir=str(tmp_path), eval_split="test"))


def test_tfds_unknown_or_unprepared_dataset_errors_say_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="Unknown dataset 'no_such_dataset'"):
        dataset_info(_config(dataset="no_such_dataset", data_dir=str(tmp_path)))
    with pytest.raises(
        DataError, match=r"not prepared .*python -m resnet_jax.data.prepare cifar10 --data_dir"
    ):
        dataset_info(_config(dataset="cifar10", data_dir=str(tmp_path)))


def test_prepare_without_tensorflow_says_to_install_the_extra():
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here")
    result = subprocess.run(
        [sys.executable, "-m", "resnet_jax.data.prepare", "cifar10", "--data_dir", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "pip install .[prepare]" in result.stderr


# --------------------------------------------------------------------------------------------------- digits


def _all_rows(config, split):
    batches = create_eval_batches(
        config, process_index=0, process_count=1, local_batch_size=500, split=split
    )
    return [(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0]) for b in batches][0]


def test_digits_is_the_whole_sklearn_set_in_fixed_stratified_train_validation_and_test_splits():
    config = _config(dataset="digits", image_size=8, normalization="imagenet")
    info = dataset_info(config)
    sizes = (info.num_train_examples, info.num_eval_examples, info.num_test_examples)
    assert (info.num_classes, info.image_size, sizes) == (10, 8, (1293, 144, 360))
    validation_images, validation_labels = _all_rows(config, "eval")
    test_images, test_labels = _all_rows(config, "test")
    assert np.bincount(test_labels).min() >= 34  # every class ~20% of its members
    assert np.bincount(validation_labels).min() >= 14  # and ~10% of the rest
    # The three splits partition scikit-learn's 1,797 digits: every scan in exactly one of them.
    from collections import Counter

    from sklearn.datasets import load_digits

    def key(image, label):
        return image[..., 0].tobytes() + bytes([int(label)])

    digits = load_digits()
    # sources reads scikit-learn's file without importing scikit-learn: the same arrays, dtypes and order.
    images, target = sources.load_digits_file()
    assert images.dtype == digits.images.dtype and target.dtype == digits.target.dtype
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(target, digits.target)
    scans = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    whole = Counter(key(image, label) for image, label in zip(scans, digits.target, strict=True))
    parts = Counter()
    for split in sources.DIGITS_SPLITS:
        source = sources.DigitsSource(split)
        parts.update(key(source[i]["image"], source[i]["label"]) for i in range(len(source)))
    assert parts == whole
    assert len(validation_images) == 144 and len(test_images) == 360


def test_dataset_normalization_uses_the_train_split_statistics():
    # One batch holding the whole digits train split, unaugmented: exactly zero mean and unit std per channel.
    config = _config(dataset="digits", image_size=8, normalization="dataset")
    batch = next(
        create_train_iterator(
            config, process_index=0, process_count=1, global_batch_size=1293, seed=0
        )
    )
    np.testing.assert_allclose(batch["image"].mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(
        batch["image"].astype(np.float64).std(axis=(0, 1, 2)), 1.0, atol=1e-4
    )


def test_digits_upsampled_to_a_larger_image_size():
    config = _config(dataset="digits", image_size=32, augment="cifar")
    batch = next(
        create_train_iterator(config, process_index=0, process_count=1, global_batch_size=4, seed=0)
    )
    assert batch["image"].shape == (4, 32, 32, 3)


def test_digits_pipeline_runs_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from resnet_jax.config import base_config\n"
        "from resnet_jax.data import create_train_iterator, dataset_info\n"
        "c = base_config()\n"
        "assert dataset_info(c).num_train_examples == 1293\n"
        "next(create_train_iterator(c, process_index=0, process_count=1, global_batch_size=8, seed=0))\n"
        "print('tensorflow' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_folder_with_train_and_test_folders_holds_validation_out_of_train(tmp_path):
    root = tmp_path / "cifar_like"
    for split, per_class in (("train", 30), ("test", 3)):
        for class_name in ("a", "b"):
            for i in range(per_class):
                array = np.full((4, 4, 3), i, np.uint8)
                _save(str(root / split / class_name / f"{i:02d}.png"), array, "PNG")
    config = _config(dataset=f"folder:{root}", image_size=4, augment="none")
    info = dataset_info(config)
    index = dataset_spec(config).folder_index()
    # Validation (ranks checkpoints) is held out of train/ by path hash; test/ is reported apart.
    assert info.eval_split == "0.1 of train/, by path hash" and info.num_test_examples == 6
    assert info.num_train_examples + info.num_eval_examples == 60
    assert all("/train/" in path for path, _ in index.eval) and set(index.eval).isdisjoint(
        index.train
    )
    assert all("/test/" in path for path, _ in index.test)
    test_rows = sum(
        b["mask"].sum()
        for b in create_eval_batches(
            config, process_index=0, process_count=1, local_batch_size=4, split="test"
        )
    )
    assert test_rows == 6
