"""`DataParallel.device_batches`: the training loop's batches, sent to the devices ahead of the step."""

import jax
import numpy as np
import pytest

from resnet_jax.parallel import DEVICE_PREFETCH, DataParallel


def _local_batches(count: int, pulled: list[int]):
    """`count` distinct batches; appends each one's index to `pulled` when it is read."""
    for i in range(count):
        pulled.append(i)
        yield {
            "image": np.full((4, 2, 2, 3), i, np.uint8),
            "label": np.arange(4, dtype=np.int32) + i,
        }


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_device_batches_are_the_batches_in_order_with_a_bounded_read_ahead(parallelism):
    data_parallel = DataParallel(parallelism, devices=jax.devices()[:1])
    pulled: list[int] = []
    batches = data_parallel.device_batches(_local_batches(5, pulled))
    assert pulled == []  # nothing is read before the first batch is asked for
    received = []
    for i in range(5):
        batch = next(batches)
        # Batch i and the DEVICE_PREFETCH - 1 after it have been read, no more (fewer at the end).
        assert len(pulled) == min(5, i + DEVICE_PREFETCH), (i, pulled)
        assert isinstance(batch["image"], jax.Array)
        received.append(jax.device_get(batch))
    with pytest.raises(StopIteration):
        next(batches)
    for i, batch in enumerate(received):
        expected = data_parallel.shard_batch(
            {"image": np.full((4, 2, 2, 3), i, np.uint8), "label": np.arange(4, dtype=np.int32) + i}
        )
        for key in ("image", "label"):
            np.testing.assert_array_equal(batch[key], jax.device_get(expected[key]))


def test_a_read_ahead_of_one_reads_nothing_early():
    data_parallel = DataParallel("shard_map", devices=jax.devices()[:1])
    pulled: list[int] = []
    batches = data_parallel.device_batches(_local_batches(3, pulled), ahead=1)
    next(batches)
    assert pulled == [0]
