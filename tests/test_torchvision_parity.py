"""Our ImageNet-family ResNets against torchvision itself: parameter counts, logits, features, exact round trips.

No hand-written torch copy: every reference is `torchvision.models.<name>`. Run with `-s` to see the measured
logits and pooled-feature differences per architecture.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import linen as nn
from flax import traverse_util

from resnet_jax import create_model
from resnet_jax.batch_norm import BatchNorm
from resnet_jax.convert import flax_to_torchvision, torchvision_to_flax
from resnet_jax.models import IMAGENET_MODELS

# Slow to build and run on CPU; still run in CI.
LARGE = {"resnet152", "wide_resnet101_2", "resnext101_32x8d", "resnext101_64x4d"}
ARCHITECTURES = [
    pytest.param(name, marks=pytest.mark.full_size) if name in LARGE else name
    for name in IMAGENET_MODELS
]
# Logits of every net but three of the four largest: resnet152 and wide_resnet101_2 repeat the blocks of
# resnet101 and wide_resnet50_2 (same code, same widths, more blocks), resnext101_32x8d the grouped blocks of
# resnext50_32x4d and resnext101_64x4d. Their parameter counts and exact round trips are checked below.
DEEP_REPEATS = {"resnet152", "wide_resnet101_2", "resnext101_32x8d"}
NUM_CLASSES = 10
# Op-by-op applies of big nets: XLA's optimization passes cost more than they save (see conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_xla")
TOLERANCE = 1e-4  # max|diff| <= TOLERANCE * max(1, max|reference|)


def torchvision_model(name: str, num_classes: int, device: str = "cpu") -> "torch.nn.Module":
    with torch.device(device):
        return getattr(torchvision.models, name)(num_classes=num_classes)


def randomized_torchvision_model(name: str, seed: int = 0) -> "torch.nn.Module":
    """torchvision's model with random weights, random BN affine and random BN running statistics, in eval mode.

    The running statistics are first set to the batch statistics of random images (so activations stay of
    order one, as in a trained net), then perturbed (variance x U(0.5, 2), mean + 0.2 std N(0, 1)), so that
    neither the defaults 0/1 nor the batch statistics can hide a mix-up of mean, var, scale or bias.
    The last BN of each residual branch draws its scale from U(0.1, 0.3), as trained ResNets have them: with
    scales near 1 in every block, resnet152's own float32 logits differ from its float64 logits by ~1e-4 of
    their size (measured), so the comparison would measure rounding noise rather than the conversion.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = torchvision_model(name, NUM_CLASSES)
    resnet = torchvision.models.resnet
    branch_ends = {
        block.bn3 if isinstance(block, resnet.Bottleneck) else block.bn2
        for block in model.modules()
        if isinstance(block, (resnet.Bottleneck, resnet.BasicBlock))
    }
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            low, high = (0.1, 0.3) if norm in branch_ends else (0.5, 1.5)
            norm.weight.uniform_(low, high, generator=generator)
            norm.bias.normal_(0.0, 0.1, generator=generator)
            norm.momentum = 1.0  # running statistics := this batch's statistics
        model.train()
        model(torch.randn(8, 3, 32, 32, generator=generator))
        for norm in norms:
            norm.momentum = 0.1
            norm.running_var.mul_(
                torch.empty_like(norm.running_var).uniform_(0.5, 2.0, generator=generator)
            )
            noise = torch.randn(norm.running_mean.shape, generator=generator)
            norm.running_mean.add_(0.2 * noise * norm.running_var.sqrt())
    return model.eval()


def numpy_state_dict(model: "torch.nn.Module") -> dict[str, np.ndarray]:
    # .numpy() shares memory with torch; the copy keeps the reference fixed whatever torch does later.
    return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def assert_bit_exact(actual: dict, expected: dict) -> None:
    actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert [path for path, _ in actual_leaves] == [path for path, _ in expected_leaves]
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert (a.dtype, a.shape) == (e.dtype, e.shape), jax.tree_util.keystr(path)
        assert a.tobytes() == e.tobytes(), f"{jax.tree_util.keystr(path)} differs"


@functools.cache
def our_variable_shapes(name: str, num_classes: int) -> dict:
    """Shapes of `create_model(name, num_classes).init(...)`, traced without computing anything."""
    model = create_model(name, num_classes=num_classes)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_param_count_equals_torchvision(name):
    for num_classes in (1000, NUM_CLASSES):
        # On the meta device torch allocates nothing, so even wide_resnet101_2 is built instantly.
        reference = torchvision_model(name, num_classes, device="meta")
        expected = sum(p.numel() for p in reference.parameters())
        ours = sum(
            leaf.size for leaf in jax.tree.leaves(our_variable_shapes(name, num_classes)["params"])
        )
        assert ours == expected, (name, num_classes)


def assert_matches_torchvision(reference, variables, name: str, **model_options) -> None:
    """Eval-mode logits and pooled features of our model within TOLERANCE of the torchvision module's."""
    images = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    captured = {}
    hook = reference.avgpool.register_forward_hook(
        lambda module, inputs, output: captured.update(pooled=output.flatten(1).numpy().copy())
    )
    with torch.no_grad():
        expected_logits = reference(torch.from_numpy(images)).numpy().copy()
    hook.remove()

    model = create_model(name, num_classes=NUM_CLASSES, **model_options)
    # Op by op, not jitted: for these one-off applies of deep nets XLA's compile costs more than it saves.
    outputs = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), features=True)

    logits_diff = float(np.abs(np.asarray(outputs["logits"]) - expected_logits).max())
    logits_scale = max(1.0, float(np.abs(expected_logits).max()))
    pooled_diff = float(np.abs(np.asarray(outputs["pooled"]) - captured["pooled"]).max())
    pooled_scale = max(1.0, float(np.abs(captured["pooled"]).max()))
    conv = model.conv.__name__
    print(
        f"\n{name} ({conv}): logits max|diff| {logits_diff:.2e} (max|logits| "
        f"{np.abs(expected_logits).max():.3g}, relative {logits_diff / logits_scale:.2e}); "
        f"pooled max|diff| {pooled_diff:.2e} (relative {pooled_diff / pooled_scale:.2e})"
    )
    assert logits_diff <= TOLERANCE * logits_scale
    assert pooled_diff <= TOLERANCE * pooled_scale


@pytest.mark.parametrize(
    "name",
    [p for p, name in zip(ARCHITECTURES, IMAGENET_MODELS, strict=True) if name not in DEEP_REPEATS],
)
def test_converted_torchvision_weights_give_torchvision_logits_and_features(name):
    reference = randomized_torchvision_model(name)
    state_dict = numpy_state_dict(reference)
    variables = torchvision_to_flax(reference.state_dict(), name)
    assert_matches_torchvision(reference, variables, name)  # with create_model's default conv

    # torchvision -> flax -> torchvision: same keys in the same order, every value bit-exact. resnet_jax keeps
    # no num_batches_tracked (the calibration pass set torch's to 1): it comes back as int64 0.
    round_trip = flax_to_torchvision(variables, name)
    assert list(round_trip) == list(state_dict)
    counters = {key for key in state_dict if key.endswith("num_batches_tracked")}
    assert_bit_exact(
        {k: v for k, v in round_trip.items() if k not in counters},
        {k: v for k, v in state_dict.items() if k not in counters},
    )
    for key in counters:
        assert (
            round_trip[key].dtype == np.int64
            and round_trip[key].shape == ()
            and round_trip[key] == 0
        )
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in round_trip.items()}, strict=True)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_flax_to_torchvision_to_flax_is_bit_exact(name):
    shapes = our_variable_shapes(name, NUM_CLASSES)
    rng = np.random.default_rng(2)
    # Any float32 values will do (variances positive); a structure-only init skips XLA entirely.
    variables = jax.tree.map(lambda leaf: rng.random(leaf.shape, dtype=np.float32) + 0.1, shapes)
    state_dict = flax_to_torchvision(variables, name)

    # torchvision itself accepts it strictly (on the meta device, assign=True adopts the arrays as they are).
    reference = torchvision_model(name, NUM_CLASSES, device="meta")
    reference.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True, assign=True
    )
    loaded = numpy_state_dict(reference)
    assert list(loaded) == list(state_dict)

    assert_bit_exact(torchvision_to_flax(loaded, name), variables)


def test_flax_variables_from_model_init_survive_the_round_trip_through_torchvision():
    # The same from a real init (dict order and dtypes as Flax makes them), on the smallest net.
    model = create_model("resnet18", num_classes=NUM_CLASSES)
    # Jitted: op by op, init compiles every op shape of the net (and each of its random draws) on its own.
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))
    variables = jax.tree.map(np.asarray, init(jax.random.key(0)))
    assert_bit_exact(
        torchvision_to_flax(flax_to_torchvision(variables, "resnet18"), "resnet18"), variables
    )


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_lax_conv_model_matches_torchvision_too(name):
    # create_model's default conv depends on the platform (matmul forms on CPU); GPU and TPU run nn.Conv.
    reference = randomized_torchvision_model(name)
    variables = torchvision_to_flax(reference.state_dict(), name)
    assert_matches_torchvision(reference, variables, name, conv=nn.Conv)


# Train mode: both frameworks update running_stat := 0.9 * running_stat + 0.1 * batch_stat, but torch's
# batch variance is the unbiased one (divides by n - 1) and flax's the biased one (divides by n), n = the
# N * H * W values each channel's statistics reduce over. So flax's new variance is torch's with its batch
# term scaled by (n - 1) / n; the check applies that factor explicitly, per layer.
TORCH_BN_MOMENTUM = 0.1  # weight of the new batch statistic (flax's momentum=0.9 is the old one's)
# Of the layer's largest statistic; measured here (resnet18, resnet50): <= 1.3e-6 for means, 6.1e-6 for
# variances, and 4.6e-2 for variances compared without the (n - 1) / n factor.
BN_STATS_RTOL = 3e-5


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_train_mode_logits_and_bn_running_mean_and_var_match_torchvision(name):
    reference = randomized_torchvision_model(name)
    variables = torchvision_to_flax(reference.state_dict(), name)
    # Batch 4 at 32 px: from n = 1024 values a channel (stem) down to n = 4 (stage4's 1x1 maps), where the
    # unbiased variance is 4/3 of the biased one. (At batch 2, n = 2 makes train-mode logits ill-conditioned:
    # they differ from torch's by ~1e-2.)
    images = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    reference.train()
    with torch.no_grad():
        expected_logits = reference(torch.from_numpy(images.copy())).numpy().copy()
    torch_stats = traverse_util.flatten_dict(
        torchvision_to_flax(numpy_state_dict(reference), name)["batch_stats"], sep="/"
    )
    old_stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")

    model = create_model(name, num_classes=NUM_CLASSES)
    # Jitted: a train-mode apply op by op compiles every new op shape, which costs more than one compile
    # (that the persistent cache keeps).
    train_apply = jax.jit(
        functools.partial(
            model.apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            # Either BatchNorm class: create_model picks resnet_jax.batch_norm.BatchNorm on CPU.
            capture_intermediates=lambda module, _: isinstance(module, (nn.BatchNorm, BatchNorm)),
        )
    )
    logits, updates = train_apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    flax_stats = traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    # A BatchNorm's output has its input's shape: n = N * H * W per layer.
    values_per_channel = {
        path.removesuffix("/__call__"): int(np.prod(outputs[0].shape[:-1]))
        for path, outputs in traverse_util.flatten_dict(updates["intermediates"], sep="/").items()
    }
    scale = max(1.0, float(np.abs(expected_logits).max()))
    assert float(np.abs(np.asarray(logits) - expected_logits).max()) <= TOLERANCE * scale
    assert flax_stats.keys() == torch_stats.keys() == old_stats.keys()
    assert {p.rsplit("/", 1)[0] for p in flax_stats} == values_per_channel.keys()
    assert min(values_per_channel.values()) == 4

    worst = {"mean": 0.0, "var": 0.0, "var_uncorrected": 0.0}
    for path, got in flax_stats.items():
        layer, stat = path.rsplit("/", 1)
        got, old, torch_new = np.asarray(got), old_stats[path], torch_stats[path]
        want = torch_new
        if stat == "var":
            n = values_per_channel[layer]
            torch_batch_var = (torch_new - (1 - TORCH_BN_MOMENTUM) * old) / TORCH_BN_MOMENTUM
            want = (1 - TORCH_BN_MOMENTUM) * old + TORCH_BN_MOMENTUM * torch_batch_var * (n - 1) / n
            uncorrected = np.abs(got - torch_new).max() / np.abs(torch_new).max()
            worst["var_uncorrected"] = max(worst["var_uncorrected"], float(uncorrected))
        # Relative to the layer's largest statistic: a mean that is near 0 carries the rounding of its sum.
        relative = float(np.abs(got - want).max() / np.abs(want).max())
        worst[stat] = max(worst[stat], relative)
        assert relative <= BN_STATS_RTOL, (path, relative)
    print(f"\n{name}: worst relative difference of the new BN statistics: {worst}")
    # Without the factor the variances would differ by up to 0.1 * (4/3 - 1) of the batch term: the check
    # above really depends on it.
    assert worst["var_uncorrected"] > 100 * BN_STATS_RTOL
