"""Model-zoo properties that need no torch: counts of the paper's CIFAR nets, init, BN state, bf16, backbone use."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model, list_models
from resnet_jax.models import (
    CIFAR_MODELS,
    IMAGENET_MODELS,
    TIMM_MODELS,
    BasicBlock,
    Bottleneck,
    ResNet,
)

# One-off inits and applies, op by op: XLA's optimization passes cost more than they save (see conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_xla")


def count_params(model, image_size=32):
    images = jnp.zeros((1, image_size, image_size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def test_list_models_has_torchvision_and_paper_names():
    assert list_models() == list(IMAGENET_MODELS) + list(TIMM_MODELS) + list(CIFAR_MODELS)
    assert {"resnet50", "resnext101_64x4d", "wide_resnet101_2", "cifar_resnet110"} <= set(
        list_models()
    )


# The paper's Table 6 rounds to these; our option-A nets carry exactly these parameters (10 classes).
@pytest.mark.parametrize(
    "name, paper_millions",
    [
        ("cifar_resnet20", 0.27),
        ("cifar_resnet32", 0.46),
        ("cifar_resnet44", 0.66),
        ("cifar_resnet56", 0.85),
        ("cifar_resnet110", 1.7),
    ],
)
def test_cifar_resnet_param_counts_match_paper(name, paper_millions):
    millions = count_params(create_model(name, num_classes=10)) / 1e6
    digits = 1 if paper_millions >= 1 else 2
    assert round(millions, digits) == paper_millions


def test_cifar_shortcuts_are_parameter_free():
    variables = jax.eval_shape(
        lambda: create_model("cifar_resnet20", num_classes=10).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    )
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    assert not any("downsample" in path for path in paths)


def test_init_is_deterministic_for_a_key_and_differs_across_keys():
    model = create_model("resnet18", num_classes=10)
    images = jnp.ones((2, 32, 32, 3))
    first = model.init(jax.random.key(3), images)
    again = model.init(jax.random.key(3), images)
    other = model.init(jax.random.key(4), images)
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(
        first["params"]["stem_conv"]["kernel"], other["params"]["stem_conv"]["kernel"]
    )


def test_eval_apply_gives_logits_and_train_apply_updates_batch_stats():
    model = create_model("cifar_resnet20", num_classes=7)
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = model.init(jax.random.key(1), images, train=False)
    assert set(variables) == {"params", "batch_stats"}
    logits = model.apply(variables, images, train=False)
    chex.assert_shape(logits, (4, 7))
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    chex.assert_shape(logits, (4, 7))
    chex.assert_trees_all_equal_structs(updates["batch_stats"], variables["batch_stats"])
    old_mean = variables["batch_stats"]["stem_bn"]["mean"]
    new_mean = updates["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(old_mean, new_mean)


def test_bn_running_mean_and_var_updates_use_torch_equivalent_momentum():
    model = create_model("cifar_resnet20", num_classes=10)
    images = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) * 2.0 + 1.0
    variables = model.init(jax.random.key(1), images)
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    conv_out = jax.lax.conv_general_dilated(
        images,
        variables["params"]["stem_conv"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    expected = 0.1 * conv_out.mean(axis=(0, 1, 2))  # torch: (1 - 0.1) * 0 + 0.1 * batch_mean
    np.testing.assert_allclose(
        updates["batch_stats"]["stem_bn"]["mean"], expected, rtol=1e-5, atol=1e-6
    )
    # torch: (1 - 0.1) * 1 + 0.1 * batch_var, but with the unbiased batch variance; flax's is the biased one
    # (tests/test_torchvision_parity.py checks against torch itself, with the (n - 1) / n factor).
    expected_var = 0.9 + 0.1 * conv_out.var(axis=(0, 1, 2))
    np.testing.assert_allclose(
        updates["batch_stats"]["stem_bn"]["var"], expected_var, rtol=1e-5, atol=1e-6
    )


def test_bfloat16_compute_keeps_params_and_batch_stats_float32():
    model = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32  # the loss is computed in float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32
    # The convolutions really ran in bf16: the result differs from float32 compute, but not by much.
    reference = create_model("resnet18", num_classes=10).apply(variables, images)
    bf16_eval = model.apply(variables, images)
    assert not np.array_equal(reference, bf16_eval)
    np.testing.assert_allclose(
        bf16_eval, reference, atol=0.1 * float(jnp.abs(reference).max()) + 0.05
    )


def test_zero_init_residual_zeroes_last_bn_scale_of_every_block():
    # One block a stage keeps this fast; the option is a field of the blocks, not of the depth.
    for block_cls, last_bn in [(BasicBlock, "bn2"), (Bottleneck, "bn3")]:
        model = ResNet(
            stage_sizes=(1, 1, 1, 1), block_cls=block_cls, num_classes=10, zero_init_residual=True
        )
        params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
        blocks = [key for key in params if key.startswith("stage")]
        assert len(blocks) == 4
        for block in blocks:
            np.testing.assert_array_equal(params[block][last_bn]["scale"], 0.0)
            np.testing.assert_array_equal(params[block]["bn1"]["scale"], 1.0)


def test_backbone_features_give_stem_stages_and_pooled():
    model = create_model("resnet50", num_classes=5)
    images = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    shapes = jax.eval_shape(lambda v: model.apply(v, images, train=False, features=True), variables)
    assert {k: v.shape for k, v in shapes.items()} == {
        "stem": (2, 16, 16, 64),
        "stage1": (2, 16, 16, 256),
        "stage2": (2, 8, 8, 512),
        "stage3": (2, 4, 4, 1024),
        "stage4": (2, 2, 2, 2048),
        "pooled": (2, 2048),
        "logits": (2, 5),
    }


def test_num_classes_zero_drops_the_classifier_and_returns_pooled_features():
    model = create_model("resnet18", num_classes=0)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    assert "fc" not in variables["params"]
    pooled = model.apply(variables, images)
    chex.assert_shape(pooled, (2, 512))
    features = model.apply(variables, images, features=True)
    assert "logits" not in features
    np.testing.assert_allclose(features["pooled"], pooled)


def test_unknown_model_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50.*cifar_resnet20"):
        create_model("resnet51")


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="bn_momentum"):
        create_model("resnet18", bn_momentum=0.1)


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 3, 32, 32), (2, 32, 32, 1)])
def test_wrong_input_shape_says_what_was_expected(shape):
    model = create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"NHWC images of shape \(batch, height, width, 3\)"):
        model.init(jax.random.key(0), jnp.zeros(shape))
