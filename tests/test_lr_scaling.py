"""The learning rate follows the run's batch size: `learning_rate_per_256` is applied at run time."""

import ml_collections
import pytest

from resnet_jax import optim
from resnet_jax.config import base_config


def config_with(**values):
    config = base_config()
    # learning_rate_per_256 is added here until the schema (resnet_jax.config) has it.
    config.learning_rate_per_256 = 0.0
    config.update({"num_train_steps": 100, "warmup_epochs": 1.0, **values})
    return config


@pytest.mark.parametrize("batch_size, expected", [(1024, 0.5), (256, 0.125), (96, 0.046875)])
def test_learning_rate_per_256_scales_with_the_batch_size_the_run_uses(batch_size, expected):
    config = config_with(learning_rate_per_256=0.125, learning_rate=7.0)
    config.batch_size = batch_size  # as --config.batch_size=... does, after the config file ran
    assert optim.scaled_learning_rate(config) == pytest.approx(expected, rel=1e-12)
    # The schedule's peak (end of the 10-step warmup) is the scaled rate, not learning_rate.
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=10)
    assert float(schedule(10)) == pytest.approx(expected, rel=1e-6)
    assert "0.125 x global batch" in optim.describe_learning_rate(config)


def test_without_the_rule_learning_rate_is_used_as_given():
    config = config_with(learning_rate=0.3)
    config.batch_size = 4096
    assert optim.scaled_learning_rate(config) == 0.3
    assert optim.describe_learning_rate(config) == "peak learning rate 0.3 (config.learning_rate)"
    today = base_config()  # a schema without the key resolves to learning_rate too
    assert optim.scaled_learning_rate(today) == today.learning_rate


def test_negative_learning_rate_per_256_is_refused():
    config = ml_collections.ConfigDict(
        {"learning_rate": 0.1, "learning_rate_per_256": -1.0, "batch_size": 256}
    )
    with pytest.raises(ValueError, match="learning_rate_per_256"):
        optim.scaled_learning_rate(config)
