"""`python -m resnet_jax.predict`: top-k classes of a saved checkpoint on generated image files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import create_model, predict
from resnet_jax.checkpoint import save_variables
from resnet_jax.config import base_config
from resnet_jax.imagenet_classes import IMAGENET_CLASSES

MODEL = "cifar_resnet20"


def _random_variables(num_classes: int) -> dict:
    model = create_model(MODEL, num_classes=num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # A random head gives near-uniform probabilities; scale it so the ranking is clear-cut.
    params = jax.tree.map(np.asarray, variables["params"])
    params["fc"]["kernel"] = params["fc"]["kernel"] * 50.0
    return {"params": params, "batch_stats": jax.tree.map(np.asarray, variables["batch_stats"])}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    # A non-square RGB JPEG and a grayscale PNG: resize + crop and the mode conversion both run.
    rgb = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "noise.jpg")
    paths.append(str(root / "noise.jpg"))
    gray = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))
    Image.fromarray(gray, mode="L").save(root / "ramp.png")
    paths.append(str(root / "ramp.png"))
    return paths


@pytest.fixture(scope="module")
def checkpoint_10(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("ckpt"), "digits")
    names = [f"digit {i}" for i in range(10)]
    save_variables(
        path, _random_variables(10), {"model": MODEL, "num_classes": 10, "class_names": names}
    )
    return path


def test_predict_returns_the_top_k_classes_of_the_models_softmax(image_files):
    variables = _random_variables(10)
    batch = np.stack([predict.load_image(p, 32, crop_fraction=1.0) for p in image_files])
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.float32

    results = predict.predict(variables, MODEL, batch, top_k=3)

    # The reference: the model's own logits, softmax in float64, ranked by numpy.
    logits = create_model(MODEL, num_classes=10).apply(variables, batch, train=False)
    logits = np.asarray(logits, np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    assert len(results) == 2
    for prediction, row in zip(results, probabilities, strict=True):
        top3 = np.argsort(-row)[:3]
        assert [index for index, _, _ in prediction] == top3.tolist()
        np.testing.assert_allclose([prob for _, _, prob in prediction], row[top3], atol=1e-5)
        # No names known for a 10-way head: the index stands in.
        assert all(name == str(index) for index, name, _ in prediction)


def test_predict_names_imagenet_classes_for_a_1000_way_head():
    variables = _random_variables(1000)
    batch = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    [prediction] = predict.predict(variables, MODEL, batch, top_k=5)
    assert [name for _, name, _ in prediction] == [IMAGENET_CLASSES[i] for i, _, _ in prediction]


def test_load_image_matches_torchvision_eval_transform(image_files):
    import torchvision.transforms as transforms

    expected = transforms.Compose(
        [
            transforms.Resize(36),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )(Image.open(image_files[0]).convert("RGB"))
    ours = predict.load_image(image_files[0], 32, crop_fraction=32 / 36)
    np.testing.assert_allclose(ours, expected.numpy().transpose(1, 2, 0), atol=1e-5)


def test_cli_prints_top_k_with_checkpoint_class_names(checkpoint_10, image_files, capsys):
    code = predict.main(["--checkpoint", checkpoint_10, "--top_k", "2", *image_files])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == image_files[0] and out[3] == image_files[1]
    assert out[1].lstrip().startswith("1.") and "digit " in out[1]
    assert len(out) == 6


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--model", "resnet51"], "unknown model 'resnet51'"),
        (["--model", "resnet18"], "holds 'cifar_resnet20' but --model is 'resnet18'"),
        (["missing.jpg"], "no image file at missing.jpg"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(
    checkpoint_10, image_files, capsys, argv_tail, message
):
    argv = ["--checkpoint", checkpoint_10, image_files[0]]
    if argv_tail[0].startswith("--"):
        argv += argv_tail
    else:
        argv = ["--checkpoint", checkpoint_10, *argv_tail]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_missing_checkpoint_exit_code_2(image_files, tmp_path, capsys):
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), image_files[0]]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_mismatched_model_names_the_bad_variables():
    variables = _random_variables(10)
    batch = np.zeros((1, 32, 32, 3), np.float32)
    # cifar_resnet32 has 5 blocks per stage where the checkpoint's cifar_resnet20 has 3.
    with pytest.raises(predict.PredictError, match="do not fit cifar_resnet32") as error:
        predict.predict(variables, "cifar_resnet32", batch, top_k=1)
    assert "params/stage1_block4/conv1/kernel" in str(error.value)


def test_training_checkpoint_is_preprocessed_exactly_as_the_trainer_evaluates(tmp_path):
    from resnet_jax.data import create_eval_batches, sources

    config = base_config()
    config.update(dataset="digits", image_size=32)
    first = sources.DigitsSource("test")[0]
    Image.fromarray(first["image"]).save(tmp_path / "digit.png")  # PNG: lossless
    batch = next(
        iter(create_eval_batches(config, process_index=0, process_count=1, local_batch_size=4))
    )

    # What a checkpoint holds: the config as JSON.
    image = predict.training_eval_preprocessor(config.to_dict())(str(tmp_path / "digit.png"))

    np.testing.assert_array_equal(image, batch["image"][0])


def test_cli_on_a_training_checkpoint_names_the_dataset_classes(tmp_path, capsys):
    from resnet_jax.data import sources

    Image.fromarray(sources.DigitsSource("test")[0]["image"]).save(tmp_path / "digit.png")
    path = str(tmp_path / "ckpt")
    # What load_variables returns for a training workdir: the run's config rides along.
    config = {"dataset": "digits", "image_size": 32, "model": MODEL}
    save_variables(
        path, _random_variables(10), {"model": MODEL, "num_classes": 10, "config": config}
    )

    assert predict.main(["--checkpoint", path, "--top_k", "10", str(tmp_path / "digit.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    # Digits are named "0".."9": each of the ten ranks shows a distinct class.
    assert sorted(line.split("class ")[1] for line in out[1:]) == [str(i) for i in range(10)]
