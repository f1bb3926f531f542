"""Fine-tuning: a 10-class backbone under a 2-class head, mismatch listings, frozen groups, per-group LRs."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct, traverse_util

from resnet_jax import config as config_lib
from resnet_jax import finetune, optim, steps
from resnet_jax.checkpoint import save_variables
from resnet_jax.checkpoint.checkpointer import TrainingCheckpointer
from resnet_jax.finetune import CheckpointMismatchError, merge_pretrained
from resnet_jax.models import create_model
from resnet_jax.parallel import DataParallel
from resnet_jax.train_state import create_train_state


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            optimizer="sgd",
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-4,
            grad_clip_norm=0.0,
        )
    )
    config.update(overrides)
    return config


def init(name: str, num_classes: int, seed: int, **options) -> dict:
    model = create_model(name, num_classes=num_classes, **options)
    # lazy_init: the variables alone, compiled without the forward pass (eager init dispatches the forward op
    # by op, a jitted init compiles it whole; neither is needed for the values).
    return dict(
        model.lazy_init(jax.random.key(seed), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    )


def abstract_init(name: str, num_classes: int) -> dict:
    model = create_model(name, num_classes=num_classes)
    return jax.eval_shape(
        lambda: dict(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    )


def bits(tree) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def pretrained_10_class() -> dict:
    """A cifar_resnet20 with 10 classes whose batch statistics are not the initial (0, 1)."""
    variables = init("cifar_resnet20", 10, seed=0)
    batch_stats = jax.tree.map(
        lambda x: x + jax.random.uniform(jax.random.key(7), x.shape), variables["batch_stats"]
    )
    return {"params": variables["params"], "batch_stats": batch_stats}


# The trainer-step tests below (multipliers, frozen groups, a linear probe's FLOPs) compile a train step per
# mode and multiplier: they run a cut-down cifar_resnet20 (one block per stage, as its stem, stages, BatchNorms
# and head) on 8x8 images. What they check (which groups move, by how much, what is differentiated) is the
# same for any backbone and image size; the full net's parameter paths are checked by the tests above.
STEP_MODEL_OPTIONS = {"stage_sizes": (1, 1, 1)}
STEP_IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def pretrained_small() -> dict:
    """The cut-down cifar_resnet20 with 10 classes and batch statistics that are not the initial (0, 1)."""
    model = create_model("cifar_resnet20", num_classes=10, **STEP_MODEL_OPTIONS)
    shape = (1, STEP_IMAGE_SIZE, STEP_IMAGE_SIZE, 3)
    variables = dict(model.lazy_init(jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32)))
    batch_stats = jax.tree.map(
        lambda x: x + jax.random.uniform(jax.random.key(7), x.shape), variables["batch_stats"]
    )
    return {"params": variables["params"], "batch_stats": batch_stats}


def test_10_class_checkpoint_restores_into_a_2_class_model(tmp_path, pretrained_10_class):
    fresh = init("cifar_resnet20", 2, seed=1)
    save_variables(
        str(tmp_path / "variables"),
        jax.device_get(pretrained_10_class),
        {"model": "cifar_resnet20", "num_classes": 10},
    )

    @struct.dataclass
    class State:
        params: dict
        batch_stats: dict
        opt_state: optax.OptState

    tx = optax.sgd(0.1, momentum=0.9)
    with TrainingCheckpointer(
        tmp_path / "workdir", save_every_steps=1, config={"model": "cifar_resnet20"}
    ) as checkpointer:
        state = State(
            pretrained_10_class["params"],
            pretrained_10_class["batch_stats"],
            tx.init(pretrained_10_class["params"]),
        )
        checkpointer.save(1, state)

    for source in ("variables", "workdir"):
        merged, metadata = finetune.load_pretrained(fresh, str(tmp_path / source))
        assert (metadata["model"], metadata["num_classes"]) == ("cifar_resnet20", 10)
        backbone = {k: v for k, v in merged["params"].items() if k != "fc"}
        pretrained_backbone = {k: v for k, v in pretrained_10_class["params"].items() if k != "fc"}
        chex.assert_trees_all_equal(backbone, jax.device_get(pretrained_backbone))
        chex.assert_trees_all_equal(
            merged["batch_stats"], jax.device_get(pretrained_10_class["batch_stats"])
        )
        chex.assert_trees_all_equal(merged["params"]["fc"], fresh["params"]["fc"])
        assert merged["params"]["fc"]["kernel"].shape == (64, 2)

    # The 2-class model computes the pretrained network's features exactly.
    images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    old = create_model("cifar_resnet20", num_classes=10).apply(
        pretrained_10_class, images, features=True
    )
    new = create_model("cifar_resnet20", num_classes=2).apply(merged, images, features=True)
    np.testing.assert_array_equal(new["pooled"], old["pooled"])
    assert new["logits"].shape == (2, 2)


def test_wrong_architecture_lists_every_mismatched_path():
    resnet18 = abstract_init("resnet18", 2)
    resnet34 = abstract_init("resnet34", 10)

    def paths(tree):
        return set(traverse_util.flatten_dict(tree, sep="/"))

    extra = set()
    for collection in ("params", "batch_stats"):
        extra |= {
            f"{collection}/{p}"
            for p in paths(resnet34[collection]) - paths(resnet18[collection])
            if not p.startswith("fc/")
        }
    assert len(extra) == 80  # 8 more basic blocks x (6 params + 4 batch statistics)
    with pytest.raises(CheckpointMismatchError) as error:
        merge_pretrained(resnet18, resnet34, pretrained_name="resnet34", model_name="resnet18")
    message = str(error.value)
    assert "0 missing, 80 unexpected, 0 mis-shaped" in message
    # Summary and hint first, then the first 20 paths and how many more there are.
    lines = message.splitlines()
    assert lines[1].startswith("hint: this looks like a different architecture")
    assert "(3, 4, 6, 3)" in lines[1]
    listed = [
        line.strip().split(" (")[0] for line in lines if line.startswith("  ") and "/" in line
    ]
    assert len(listed) == 20 and set(listed) <= extra
    assert "  ... 60 more" in lines


def test_missing_and_misshaped_paths_are_listed_together(pretrained_10_class):
    fresh = init("cifar_resnet20", 2, seed=1)
    broken = jax.tree.map(np.asarray, pretrained_10_class)
    del broken["params"]["stage2_block1"]["conv1"]
    broken["params"]["stem_conv"]["kernel"] = np.zeros((3, 3, 1, 16), np.float32)
    broken["batch_stats"]["stage3_block3"]["bn2"]["mean"] = np.zeros(32, np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        merge_pretrained(fresh, broken)
    message = str(error.value)
    assert "1 missing, 0 unexpected, 2 mis-shaped" in message
    assert "params/stage2_block1/conv1/kernel (3, 3, 16, 32)" in message
    assert "params/stem_conv/kernel: (3, 3, 1, 16), expected (3, 3, 3, 16)" in message
    assert "batch_stats/stage3_block3/bn2/mean: (32,), expected (64,)" in message


def test_param_groups_label_the_head_and_the_backbone():
    params = {"stem_conv": {"kernel": 0}, "stage1_block1": {"bn1": {"scale": 0}}, "fc": {"bias": 0}}
    assert finetune.param_groups(params) == {
        "stem_conv": {"kernel": "backbone"},
        "stage1_block1": {"bn1": {"scale": "backbone"}},
        "fc": {"bias": "head"},
    }
    assert finetune.lr_multipliers("linear_probe", 0.1) == {"head": 1.0, "backbone": 0.0}
    assert finetune.lr_multipliers("frozen_bn", 0.1) == {"head": 1.0, "backbone": 0.1}
    assert finetune.model_options("full") == {"bn_frozen": False}
    with pytest.raises(ValueError, match="unknown finetune_mode 'probe'"):
        finetune.model_options("probe")


def test_backbone_lr_multiplier_scales_the_backbone_update():
    params = {
        "stem_conv": {"kernel": jnp.ones((3, 3, 3, 4))},
        "fc": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }
    config = optimizer_config(momentum=0.0, weight_decay=0.0)
    tx = optim.create_optimizer(
        config,
        optax.constant_schedule(0.5),
        param_labels=finetune.param_groups(params),
        lr_multipliers=finetune.lr_multipliers("full", backbone_lr_multiplier=0.1),
    )
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 2.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["fc"]["kernel"], -1.0)  # -lr * grad
    np.testing.assert_allclose(updates["stem_conv"]["kernel"], -0.1, rtol=1e-6)  # x 0.1


def _finetune_step(mode: str, pretrained: dict, backbone_lr_multiplier: float = 0.5):
    """The trainer's own step (`steps.train_step`, compiled by `DataParallel` on one device) for a 2-class
    cut-down cifar_resnet20 fine-tuned from `pretrained` in `mode`, and its starting state."""
    model = create_model(
        "cifar_resnet20", num_classes=2, **STEP_MODEL_OPTIONS, **finetune.model_options(mode)
    )
    shape = (1, STEP_IMAGE_SIZE, STEP_IMAGE_SIZE, 3)
    fresh = dict(model.lazy_init(jax.random.key(1), jax.ShapeDtypeStruct(shape, jnp.float32)))
    variables = merge_pretrained(fresh, pretrained)
    labels = finetune.param_groups(variables["params"])
    multipliers = finetune.lr_multipliers(mode, backbone_lr_multiplier)
    learning_rate_fn = optax.constant_schedule(0.1)
    tx = optim.create_optimizer(
        optimizer_config(), learning_rate_fn, param_labels=labels, lr_multipliers=multipliers
    )
    data_parallel = DataParallel("shard_map", devices=jax.devices()[:1])
    step = data_parallel.compile(
        functools.partial(
            steps.train_step,
            apply_fn=model.apply,
            tx=tx,
            learning_rate_fn=learning_rate_fn,
            label_smoothing=0.0,
            ema_decay=0.0,
            trainable_mask=finetune.trainable_mask(labels, multipliers),
        ),
        donate_state=False,
    )
    state = data_parallel.replicate(create_train_state(variables, tx, use_ema=False))
    return step, state, data_parallel


def _batch(data_parallel: DataParallel, i: int) -> dict:
    shape = (8, STEP_IMAGE_SIZE, STEP_IMAGE_SIZE, 3)
    images = np.asarray(jax.random.normal(jax.random.key(10 + i), shape))
    return data_parallel.shard_batch({"image": images, "label": np.arange(8, dtype=np.int32) % 2})


def _train(mode: str, pretrained: dict, num_steps: int = 3, **options) -> dict:
    step, state, data_parallel = _finetune_step(mode, pretrained, **options)
    start = data_parallel.unreplicate(state)
    for i in range(num_steps):
        state, _ = step(state, _batch(data_parallel, i))
    end = data_parallel.unreplicate(state)
    return {"params": end.params, "batch_stats": end.batch_stats, "start": start.variables}


def test_backbone_lr_multiplier_reaches_the_trainers_step(pretrained_small):
    """One step from the same start: the backbone moves 0.5x as far at multiplier 0.5 as at 1, the head
    the same distance (the first SGD step's update is lr x multiplier x gradient)."""
    half = _train("frozen_bn", pretrained_small, num_steps=1, backbone_lr_multiplier=0.5)
    full = _train("frozen_bn", pretrained_small, num_steps=1, backbone_lr_multiplier=1.0)
    start = half["start"]["params"]

    def moved(result, module):
        leaves = jax.tree.leaves(jax.tree.map(np.subtract, result["params"][module], start[module]))
        return np.concatenate([np.ravel(leaf) for leaf in leaves]).astype(np.float64)

    def relative_error(actual, expected):
        return np.linalg.norm(actual - expected) / np.linalg.norm(expected)

    # Summed over the whole module, float32 rounding of the parameters (~1e-8) stays far below the
    # updates; a multiplier that did not reach the step would give a relative error of 1.
    backbone = [name for name in start if name != "fc"]
    half_moves = np.concatenate([moved(half, name) for name in backbone])
    full_moves = np.concatenate([moved(full, name) for name in backbone])
    assert relative_error(half_moves, 0.5 * full_moves) < 1e-2
    assert relative_error(moved(half, "fc"), moved(full, "fc")) < 1e-3


def test_linear_probe_differentiates_only_the_head(pretrained_small):
    """A linear probe's step must not compute the backbone's gradient only to drop it: its compiled step
    costs a fraction of the full fine-tune's (forward alone is about a third of forward + backward)."""

    def flops(mode: str) -> float:
        step, state, data_parallel = _finetune_step(mode, pretrained_small)
        compiled = step.lower(state, _batch(data_parallel, 0)).compile()
        return float(compiled.cost_analysis()["flops"])

    assert flops("linear_probe") < 0.5 * flops("frozen_bn")


@pytest.mark.parametrize("mode", ["linear_probe", "frozen_bn", "full"])
def test_finetune_modes_train_exactly_what_they_say(mode, pretrained_small):
    result = _train(mode, pretrained_small)
    start = result["start"]

    def backbone(params):
        return {k: v for k, v in params.items() if k != "fc"}

    backbone_same = bits(backbone(result["params"])) == bits(backbone(start["params"]))
    batch_stats_same = bits(result["batch_stats"]) == bits(start["batch_stats"])
    head_changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(result["params"]["fc"]),
            jax.tree.leaves(start["params"]["fc"]),
            strict=True,
        )
    ]
    assert all(head_changed)
    assert backbone_same == (mode == "linear_probe")
    assert batch_stats_same == (mode in ("linear_probe", "frozen_bn"))


def test_a_finetuned_training_workdir_exports_to_torchvision(tmp_path):
    """`python -m resnet_jax.convert to-torch <workdir> out.safetensors` gives torchvision the same logits."""
    import torch
    import torchvision
    from safetensors.torch import load_file

    from resnet_jax import convert

    model = create_model("resnet18", num_classes=2)
    variables = init("resnet18", 2, seed=4)
    # Non-trivial running statistics, as a fine-tuned model has.
    variables["batch_stats"] = jax.tree.map(
        lambda x: x + 0.5 * jax.random.uniform(jax.random.key(5), x.shape),
        variables["batch_stats"],
    )

    @struct.dataclass
    class State:
        step: jax.Array
        params: dict
        batch_stats: dict

    with TrainingCheckpointer(
        tmp_path / "workdir", save_every_steps=1, config={"model": "resnet18"}
    ) as checkpointer:
        checkpointer.save(7, State(jnp.asarray(7), variables["params"], variables["batch_stats"]))
    destination = str(tmp_path / "resnet18_finetuned.safetensors")
    assert convert.main(["to-torch", str(tmp_path / "workdir"), destination]) == 0

    torch_model = torchvision.models.resnet18(num_classes=2).eval()
    torch_model.load_state_dict(load_file(destination))
    images = np.asarray(jax.random.normal(jax.random.key(6), (2, 32, 32, 3)))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    # Jitted: op by op, a resnet18 apply dispatches (and compiles) each op on its own, several times slower.
    logits = jax.jit(model.apply)(variables, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# The paper's 6n+2-layer CIFAR net with n = 1 (3 basic blocks, a third of cifar_resnet20's convs): the trainer
# test below compiles three train steps and their evals, so the net's size is its run time. Not a library
# name: `tiny_trainer_model` adds it to the model table for a test's duration.
TINY_TRAINER_MODEL = "cifar_resnet8"


@pytest.fixture
def tiny_trainer_model(monkeypatch):
    from resnet_jax import models

    monkeypatch.setitem(models.MODELS, TINY_TRAINER_MODEL, models.cifar_resnet(8))
    # XLA's own conv compiles faster than the CPU matmul forms (as in test_segmentation_training.py); the forms'
    # equivalence is tested in test_conv*.py, this test checks what the trainer restores, freezes and trains.
    monkeypatch.setenv("RESNET_JAX_CONV_FORM", "lax")


def _tiny_training_config(**overrides) -> ml_collections.ConfigDict:

    config = config_lib.base_config()
    defaults = dict(
        model=TINY_TRAINER_MODEL,
        dataset="digits",
        image_size=8,
        batch_size=32,
        num_train_steps=3,
        learning_rate=0.05,
        warmup_epochs=0.0,
        log_every_steps=3,
        eval_every_steps=3,
        checkpoint_every_steps=3,
    )
    config.update({**defaults, **overrides})
    return config


def test_trainer_linear_probe_from_init_from_changes_only_the_head(tmp_path, tiny_trainer_model):
    """train_and_evaluate with config.init_from: the restored backbone and its statistics stay bit-identical."""
    from resnet_jax import training
    from resnet_jax.checkpoint import load_variables

    training.train_and_evaluate(_tiny_training_config(), str(tmp_path / "pretrain"))
    pretrained, _ = load_variables(str(tmp_path / "pretrain"))
    training.train_and_evaluate(
        _tiny_training_config(
            init_from=str(tmp_path / "pretrain"), finetune_mode="linear_probe", seed=1
        ),
        str(tmp_path / "probe"),
    )
    probed, metadata = load_variables(str(tmp_path / "probe"))
    assert metadata["step"] == 3  # a fresh step counter, not the pretrained run's

    def backbone(params):
        return {k: v for k, v in params.items() if k != "fc"}

    assert bits(backbone(probed["params"])) == bits(backbone(pretrained["params"]))
    assert bits(probed["batch_stats"]) == bits(pretrained["batch_stats"])
    assert not np.array_equal(
        probed["params"]["fc"]["kernel"], pretrained["params"]["fc"]["kernel"]
    )

    # frozen_bn with a backbone multiplier, through the trainer: statistics frozen, backbone trains.
    training.train_and_evaluate(
        _tiny_training_config(
            init_from=str(tmp_path / "pretrain"),
            finetune_mode="frozen_bn",
            backbone_lr_multiplier=0.1,
            seed=1,
        ),
        str(tmp_path / "frozen_bn"),
    )
    frozen_bn, _ = load_variables(str(tmp_path / "frozen_bn"))
    assert bits(frozen_bn["batch_stats"]) == bits(pretrained["batch_stats"])
    assert bits(backbone(frozen_bn["params"])) != bits(backbone(pretrained["params"]))

    # A checkpoint of another architecture is a config error naming the paths, before any training.
    with pytest.raises(config_lib.ConfigError, match=r"does not fit the model \(resnet18\)"):
        training.train_and_evaluate(
            _tiny_training_config(model="resnet18", init_from=str(tmp_path / "pretrain")),
            str(tmp_path / "wrong"),
        )
