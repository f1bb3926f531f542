"""The training stream's order and augmentation draws, pinned: what `stream.TrainBatches` promises to compute."""

import io

import grain
import numpy as np
from PIL import Image

from resnet_jax.data import jpeg, sources, stream, transforms


def test_epoch_order_is_a_fixed_function_of_seed_and_epoch_only():
    # Pinned values: the permutation must not change with the NumPy version, the process or the call order.
    order = stream.EpochOrder(10, 7)
    assert order.permutation(3).tolist() == [5, 0, 6, 9, 8, 7, 4, 2, 3, 1]
    assert order.permutation(2).tolist() == [0, 2, 6, 9, 3, 7, 1, 4, 5, 8]
    assert [order[20 + i] for i in range(10)] == [0, 2, 6, 9, 3, 7, 1, 4, 5, 8]
    assert stream.EpochOrder(10, 8).permutation(2).tolist() != order.permutation(2).tolist()


def test_stream_rows_are_the_epoch_permutation_with_grains_random_map_draws():
    # 1,293 train digits, global batch 16: 80 batches (1,280 positions) an epoch, the other 13 left out.
    # Row r of batch k is position k * 16 + r of the cut stream, i.e. epoch-stream position
    # (k // 80) * 1293 + (k % 80) * 16 + r, augmented with the generator Grain's random_map gives it.
    source = sources.DigitsSource("train")
    preprocess = transforms.TrainPreprocess(
        augment="imagenet", image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, host_normalize=False
    )
    seed = 3
    order = stream.EpochOrder(len(source), stream.derived_seed(seed, "order"))
    by_grain = (
        grain.MapDataset.range(3 * len(source))
        .map(lambda position: source[order[position]])
        .random_map(preprocess, seed=stream.derived_seed(seed, "augment"))
    )
    # Process 1 of 2 reads rows 8..15 of each global batch.
    batches = stream.TrainBatches(
        source, preprocess, seed=seed, global_batch_size=16, process_index=1, process_count=2
    )
    for k in (0, 79, 80, 161):
        batch = batches[k]
        assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.uint8
        for row in range(8):
            position = (k // 80) * len(source) + (k % 80) * 16 + 8 + row
            expected = by_grain[position]
            np.testing.assert_array_equal(batch["image"][row], expected["image"])
            assert batch["label"][row] == expected["label"]


def test_a_drafted_crop_box_maps_with_the_exact_dct_scale_and_matches_a_full_decode():
    # 375 rows at 1/2 scale decode to 188 rows: the box must map with 1/2, not 188 / 375.
    y, x = np.mgrid[0:375, 0:500]
    array = np.stack([x * 255 // 500, y * 255 // 375, (x + y) * 255 // 875], -1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="JPEG", quality=95)
    image = Image.open(io.BytesIO(encoded.getvalue()))
    box = jpeg.drafted_crop_box(image, (10, 101, 480, 270), image_size=100)
    assert image.size == (250, 188)  # decoded at 1/2: the crop is >= 2 * 100 wide and high
    assert box == (5.0, 50.5, 245.0, 185.5)
    drafted = np.asarray(image.convert("RGB").resize((100, 100), Image.BILINEAR, box=box), int)
    full = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
    exact = np.asarray(full.resize((100, 100), Image.BILINEAR, box=(10, 101, 490, 371)), int)
    assert np.abs(drafted - exact).mean() < 1.0
