"""The variants beyond torchvision's, without torch: names, sizes, backbone features, and what each new part
computes (ResNet-D's pooled shortcut, squeeze-excitation, weight standardization, GroupNorm, dropout).

Parity with timm itself is in test_timm_parity.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resnet_jax import create_model, list_models
from resnet_jax.layers import avg_pool_ceil, standardize_kernel, weight_standardized
from resnet_jax.models import CIFAR_MODELS, TIMM_MODELS, wide_resnet
from resnet_jax.models_v2 import PreActResNet

NEW_MODELS = [*TIMM_MODELS, "wide_resnet28_10"]
# One-off inits and applies, op by op: XLA's optimization passes cost more than they save (see conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_xla")


def param_count(variables) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def abstract_variables(model, image_size: int = 32):
    images = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images))


def test_list_models_knows_every_new_name():
    assert set(NEW_MODELS) <= set(list_models())
    assert set(TIMM_MODELS) == {
        "resnet18d",
        "resnet26d",
        "resnet50d",
        "resnet101d",
        "seresnet50",
        "seresnet101",
        "resnetv2_50",
        "resnetv2_101",
        "resnetv2_50x1_bit",
        "resnetv2_101x1_bit",
    }
    assert "wide_resnet28_10" in CIFAR_MODELS


def test_wide_resnet28_10_has_the_papers_36_5m_parameters():
    variables = abstract_variables(create_model("wide_resnet28_10", num_classes=10))
    assert param_count(variables) == 36_479_194  # the paper's Table 1/4: 36.5M


def expected_feature_shapes(name: str) -> dict[str, tuple[int, ...]]:
    if name == "wide_resnet28_10":  # 32x32 CIFAR input: three stages, no downsampling stem
        return {
            "stem": (2, 32, 32, 16),
            "stage1": (2, 32, 32, 160),
            "stage2": (2, 16, 16, 320),
            "stage3": (2, 8, 8, 640),
            "pooled": (2, 640),
            "logits": (2, 5),
        }
    expansion = 1 if name == "resnet18d" else 4
    return {
        "stem": (2, 16, 16, 64),
        "stage1": (2, 16, 16, 64 * expansion),
        "stage2": (2, 8, 8, 128 * expansion),
        "stage3": (2, 4, 4, 256 * expansion),
        "stage4": (2, 2, 2, 512 * expansion),
        "pooled": (2, 512 * expansion),
        "logits": (2, 5),
    }


@pytest.mark.parametrize("name", NEW_MODELS)
def test_backbone_features_give_stem_stages_pooled_and_logits(name):
    model = create_model(name, num_classes=5)
    size = 32 if name == "wide_resnet28_10" else 64
    images = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    shapes = jax.eval_shape(lambda v: model.apply(v, images, features=True), variables)
    assert {key: value.shape for key, value in shapes.items()} == expected_feature_shapes(name)


def test_resnet_d_has_a_deep_stem_and_average_pools_before_a_stride_1_projection():
    params = abstract_variables(create_model("resnet50d", num_classes=10))["params"]
    stem = {key: params[key]["kernel"].shape for key in params if key.startswith("stem_conv")}
    assert stem == {
        "stem_conv1": (3, 3, 3, 32),
        "stem_conv2": (3, 3, 32, 32),
        "stem_conv3": (3, 3, 32, 64),
    }
    assert "stem_bn" in params and "stem_conv" not in params
    # The same 1x1 projection as ResNet-50's, now seeing the average of each 2x2 window.
    assert params["stage2_block1"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)


def test_avg_pool_shortcut_averages_only_the_real_positions_of_an_odd_map():
    x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3)
    pooled = avg_pool_ceil(x, 2)
    assert pooled.shape == (2, 3, 3, 3)
    xs = np.asarray(x)
    for i, rows in enumerate([(0, 1), (2, 3), (4,)]):
        for j, cols in enumerate([(0, 1), (2, 3), (4,)]):
            window = xs[:, list(rows)][
                :, :, list(cols)
            ]  # torch: ceil_mode, count_include_pad=False
            np.testing.assert_allclose(pooled[:, i, j], window.mean(axis=(1, 2)), rtol=1e-6)


def test_squeeze_excite_gates_each_channel_through_a_16x_bottleneck():
    params = abstract_variables(create_model("seresnet50", num_classes=10))["params"]
    se = params["stage1_block1"]["se"]
    assert se["fc1"]["kernel"].shape == (1, 1, 256, 16) and se["fc1"]["bias"].shape == (16,)
    assert se["fc2"]["kernel"].shape == (1, 1, 16, 256) and se["fc2"]["bias"].shape == (256,)
    assert params["stage4_block3"]["se"]["fc1"]["kernel"].shape == (1, 1, 2048, 128)


def test_weight_standardized_conv_computes_with_the_standardized_kernel():
    conv = weight_standardized(nn.Conv, epsilon=1e-8)
    layer = conv(6, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    variables = layer.init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]  # stored raw: what timm's StdConv2d keeps as .weight
    standardized = standardize_kernel(kernel, 1e-8)
    # Per output channel, over its fan-in: mean 0 and (biased) variance 1.
    np.testing.assert_allclose(standardized.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(standardized.var(axis=(0, 1, 2)), 1.0, rtol=1e-5)
    expected = jax.lax.conv_general_dilated(
        x, standardized, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    # Scaling the stored kernel changes nothing: only its standardized form is used.
    scaled = {"params": {"kernel": kernel * 3.0 + 0.5}}
    np.testing.assert_allclose(layer.apply(scaled, x), expected, rtol=1e-4, atol=1e-4)


def tiny_bit(**options) -> PreActResNet:
    return create_model("resnetv2_50x1_bit", num_classes=3, **options).clone(
        stage_sizes=(1, 1, 1, 1)
    )


def test_bit_keeps_no_batch_stats_and_trains_without_mutable_state():
    model = tiny_bit()
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    assert set(variables) == {"params"}
    assert not any(
        "batch_stats" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables)
    )
    train = model.apply(variables, images, train=True)
    chex.assert_trees_all_close(train, model.apply(variables, images), rtol=1e-6, atol=1e-6)
    # The train step's call: nothing to update (the step must read `updates.get("batch_stats", {})`).
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert updates == {}
    chex.assert_trees_all_close(logits, train, rtol=1e-6, atol=1e-6)
    norm = variables["params"]["stage1_block1"]["norm1"]
    assert set(norm) == {"scale", "bias"}  # GroupNorm's affine: timm's norm.weight / norm.bias


def test_group_norm_normalizes_over_32_groups_with_timms_epsilon():
    model = tiny_bit()
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)) * 3.0 + 1.0
    variables = model.init(jax.random.key(1), images)
    _, state = model.apply(
        variables,
        images,
        capture_intermediates=lambda module, _: isinstance(module, nn.GroupNorm),
        mutable=["intermediates"],
    )
    out = state["intermediates"]["stage2_block1"]["norm1"]["__call__"][0]  # scale 1, bias 0 at init
    groups = np.asarray(out).reshape(2, -1, 32, out.shape[-1] // 32)
    np.testing.assert_allclose(groups.mean(axis=(1, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(groups.var(axis=(1, 3)), 1.0, rtol=1e-3)


def test_wide_resnet_dropout_acts_only_in_training_and_draws_from_the_dropout_rng():
    model = wide_resnet(10, 1)(num_classes=10, dropout_rate=0.3)  # WRN-10-1: the same blocks, small
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = model.init(jax.random.key(1), images)
    without = wide_resnet(10, 1)(num_classes=10)
    np.testing.assert_array_equal(model.apply(variables, images), without.apply(variables, images))

    def train(key):
        logits, _ = model.apply(
            variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        return np.asarray(logits)

    np.testing.assert_array_equal(train(jax.random.key(2)), train(jax.random.key(2)))
    assert not np.allclose(train(jax.random.key(2)), train(jax.random.key(3)))
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, images, train=True, mutable=["batch_stats"])


def test_wide_resnet_blocks_are_preactivated_with_a_projection_of_the_preactivation():
    params = abstract_variables(create_model("wide_resnet28_10", num_classes=10))["params"]
    assert sorted(params["stage1_block1"]) == [
        "conv1",
        "conv2",
        "downsample_conv",
        "norm1",
        "norm2",
    ]
    assert params["stage1_block1"]["downsample_conv"]["kernel"].shape == (1, 1, 16, 160)
    assert "downsample_conv" not in params["stage1_block2"]
    assert {"stem_conv", "final_norm", "fc"} <= set(params)


def test_zero_init_residual_zeroes_the_last_conv_of_each_preactivation_block():
    model = tiny_bit(zero_init_residual=True)
    # lazy_init: init's variables bit for bit, without running the forward pass op by op.
    params = model.lazy_init(jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))[
        "params"
    ]
    for stage in range(1, 5):
        block = params[f"stage{stage}_block1"]
        np.testing.assert_array_equal(block["conv3"]["kernel"], 0.0)
        assert np.abs(block["conv2"]["kernel"]).max() > 0


def test_options_of_the_other_family_are_rejected():
    with pytest.raises(TypeError, match="groups"):
        create_model("resnetv2_50", groups=32)
    with pytest.raises(TypeError, match="dropout_rate"):
        create_model("resnet50", dropout_rate=0.3)
