"""The training stream's order and augmentation draws, pinned: what `stream.TrainBatches` promises to compute."""

import grain
import numpy as np

from resnet_jax.data import sources, stream, transforms


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
