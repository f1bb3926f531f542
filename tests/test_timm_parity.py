"""timm's ResNet variants against timm itself: parameter counts, logits and pooled features on odd input sizes,
exact round trips of the state dicts, architecture inference, and the command line.

Every reference is `timm.create_model(name, pretrained=False)`: nothing is downloaded. Run with `-s` to see the
measured differences per architecture.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import linen as nn

from resnet_jax import checkpoint, create_model
from resnet_jax.convert import (
    ConversionError,
    flax_to_torchvision,
    infer_architecture,
    main,
    torchvision_to_flax,
)
from resnet_jax.models import TIMM_MODELS

# Slow to build and run on CPU; still run in CI.
LARGE = {"resnet101d", "seresnet101", "resnetv2_101", "resnetv2_101x1_bit"}
ARCHITECTURES = [
    pytest.param(name, marks=pytest.mark.full_size) if name in LARGE else name
    for name in TIMM_MODELS
]
# Logits at both odd input sizes (their feature maps differ in parity stage by stage) for each 18-50-layer net;
# a 101-layer net runs its 50-layer sibling's blocks, more of them: one size checks what it adds.
LOGITS_CASES = [
    pytest.param(name, size, marks=pytest.mark.full_size, id=f"{name}-{size}")
    if name in LARGE
    else pytest.param(name, size, id=f"{name}-{size}")
    for name in TIMM_MODELS
    for size in (33, 47)
    if size == 33 or name not in LARGE
]
# Op-by-op applies of ten nets: XLA's optimization passes cost more than they save (see conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_xla")
NUM_CLASSES = 10
TOLERANCE = 1e-4  # max|diff| <= TOLERANCE * max(1, max|reference|)


def timm_model(name: str, num_classes: int = NUM_CLASSES, device: str = "cpu") -> torch.nn.Module:
    with torch.device(device):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


@functools.cache
def randomized_timm_model(name: str, seed: int = 0) -> torch.nn.Module:
    """timm's model with its random init, random norm affine and random BN running statistics, in eval mode.

    As tests/test_torchvision_parity.py does for torchvision: BN running statistics are the batch statistics
    of random images, then perturbed (variance x U(0.5, 2), mean + 0.2 std N(0, 1)); the last BN of each v1
    residual branch draws its scale from U(0.1, 0.3), as trained nets have them (timm zero-inits it).
    GroupNorm (BiT) gets random scale and bias. The classifier is drawn anew with std 1 / sqrt(fan_in) x 4, so
    that logits are of order several and the tolerance is a relative one.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = timm_model(name)
    resnet = timm.models.resnet
    branch_ends = {
        block.bn3 if isinstance(block, resnet.Bottleneck) else block.bn2
        for block in model.modules()
        if isinstance(block, (resnet.Bottleneck, resnet.BasicBlock))
    }
    norms = [
        m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))
    ]
    batch_norms = [m for m in norms if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            low, high = (0.1, 0.3) if norm in branch_ends else (0.5, 1.5)
            norm.weight.uniform_(low, high, generator=generator)
            norm.bias.normal_(0.0, 0.1, generator=generator)
        classifier = model.get_classifier()
        fan_in = classifier.weight[0].numel()
        classifier.weight.normal_(0.0, 4.0 / fan_in**0.5, generator=generator)
        classifier.bias.normal_(0.0, 0.1, generator=generator)
        for norm in batch_norms:
            norm.momentum = 1.0  # running statistics := this batch's statistics
        model.train()
        model(torch.randn(8, 3, 33, 33, generator=generator))
        for norm in batch_norms:
            norm.momentum = 0.1
            norm.running_var.mul_(
                torch.empty_like(norm.running_var).uniform_(0.5, 2.0, generator=generator)
            )
            noise = torch.randn(norm.running_mean.shape, generator=generator)
            norm.running_mean.add_(0.2 * noise * norm.running_var.sqrt())
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    # .numpy() shares memory with torch; the copy keeps the reference fixed whatever torch does later.
    return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def meta_shapes(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape) for k, v in timm_model(name, num_classes, "meta").state_dict().items()
    }


@functools.cache
def our_variable_shapes(name: str, num_classes: int) -> dict:
    model = create_model(name, num_classes=num_classes)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_param_count_equals_timm(name):
    for num_classes in (1000, NUM_CLASSES):
        reference = timm_model(name, num_classes, device="meta")  # shapes only: nothing allocated
        expected = sum(p.numel() for p in reference.parameters())
        ours = sum(
            leaf.size for leaf in jax.tree.leaves(our_variable_shapes(name, num_classes)["params"])
        )
        assert ours == expected, (name, num_classes)


def test_param_counts_are_timms_published_ones():
    # timm 1.0's figures for 1000 classes, as the issue states them.
    for name, expected in [
        ("resnet50d", 25_576_264),
        ("seresnet50", 28_088_024),
        ("resnetv2_50x1_bit", 25_549_352),
    ]:
        shapes = our_variable_shapes(name, 1000)["params"]
        assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == expected, name


def assert_matches_timm(name: str, image_size: int, **model_options) -> None:
    """Eval-mode logits and pooled features within TOLERANCE of timm's, for a batch of 2 odd-sized images."""
    reference = randomized_timm_model(name)
    variables = torchvision_to_flax(reference.state_dict(), name)
    images = np.random.default_rng(image_size).standard_normal((2, 3, image_size, image_size))
    images = images.astype(np.float32)
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(images))
        expected_pooled = reference.forward_head(features, pre_logits=True).numpy().copy()
        expected_logits = reference.forward_head(features).numpy().copy()
    model = create_model(name, num_classes=NUM_CLASSES, **model_options)
    outputs = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), features=True)
    for key, expected in [("logits", expected_logits), ("pooled", expected_pooled)]:
        ours = np.asarray(outputs[key])
        assert ours.shape == expected.shape, key
        scale = max(1.0, float(np.abs(expected).max()))
        error = float(np.abs(ours - expected).max()) / scale
        print(f"{name} {image_size}px {key}: max |diff| / max(1, max |timm|) = {error:.2e}")
        assert error <= TOLERANCE, (name, key, error)


@pytest.mark.parametrize("name, image_size", LOGITS_CASES)
def test_logits_and_pooled_features_match_timm(name, image_size):
    assert_matches_timm(name, image_size)


def test_weight_standardized_model_matches_timm_with_lax_conv_too():
    # BiT's standardized kernels through flax's own nn.Conv, not only the CPU matmul forms.
    assert_matches_timm("resnetv2_50x1_bit", 33, conv=nn.Conv)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_timm_state_dict_round_trip_is_exact_and_loads_strictly(name):
    reference = randomized_timm_model(name)
    expected = numpy_state_dict(reference)
    variables = torchvision_to_flax(expected, name)
    if name.endswith("_bit"):
        assert variables["batch_stats"] == {}  # GroupNorm keeps no statistics
    back = flax_to_torchvision(variables, name)
    assert list(back) == list(expected)  # timm's keys, in timm's order
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert back[key].dtype == np.int64 and back[key].shape == ()
            continue
        assert (back[key].dtype, back[key].shape) == (value.dtype, value.shape), key
        assert back[key].tobytes() == value.tobytes(), key
    fresh = timm_model(name)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_architecture_is_inferred_from_timm_keys_and_shapes(name):
    assert infer_architecture(meta_shapes(name, num_classes=3)) == name


def test_a_variant_converted_under_the_plain_name_gets_a_hint():
    shapes = meta_shapes("resnet50d")
    arrays = {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}
    with pytest.raises(ConversionError, match="this looks like resnet50d weights, not resnet50"):
        torchvision_to_flax(arrays, "resnet50")
    with pytest.raises(ConversionError, match="this looks like seresnet50 weights, not resnet50"):
        torchvision_to_flax(
            {k: np.broadcast_to(np.float32(0), s) for k, s in meta_shapes("seresnet50").items()},
            "resnet50",
        )


@pytest.mark.parametrize("name", ["resnet18d", "resnetv2_50x1_bit"])
def test_cli_converts_timm_weights_both_ways(name, tmp_path, capsys):
    reference = randomized_timm_model(name)
    expected = numpy_state_dict(reference)
    source = tmp_path / f"timm_{name}.pth"
    torch.save(reference.state_dict(), source)
    # With --model, as the command line; and without it, inferred from the keys.
    assert main(["from-torch", str(source), str(tmp_path / "named"), "--model", name]) == 0
    assert main(["from-torch", str(source), str(tmp_path / "inferred")]) == 0
    assert f"{name}, {NUM_CLASSES} classes" in capsys.readouterr().out
    named, metadata = checkpoint.load_variables(str(tmp_path / "named"))
    inferred, _ = checkpoint.load_variables(str(tmp_path / "inferred"))
    assert metadata["model"] == name
    chex.assert_trees_all_equal(named, inferred)

    back = tmp_path / f"back_{name}.safetensors"
    assert main(["to-torch", str(tmp_path / "named"), str(back)]) == 0
    from safetensors.numpy import load_file

    loaded = load_file(str(back))
    fresh = timm_model(name)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()}, strict=True)
    for key, value in expected.items():
        if not key.endswith("num_batches_tracked"):
            assert loaded[key].tobytes() == value.tobytes(), key
