"""`python -m resnet_jax.predict`: top-k classes of a saved checkpoint on generated image files."""

import os
import pathlib
import platform
import struct
import subprocess
import sys
import zlib

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
    # lazy_init: init's variables bit for bit, without running the forward pass op by op.
    variables = model.lazy_init(
        jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )
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
        (["--max_image_pixels", "-1"], "--max_image_pixels must be >= 0"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(
    checkpoint_10, image_files, capsys, argv_tail, message
):
    argv = ["--checkpoint", checkpoint_10, image_files[0], *argv_tail]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_missing_checkpoint_exit_code_2(image_files, tmp_path, capsys):
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), image_files[0]]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's; elsewhere retain_freed_memory does nothing (tests/test_host_memory.py)",
)
def test_the_command_keeps_the_memory_xla_frees_set_before_jax_starts(checkpoint_10, image_files):
    """`python -m resnet_jax.predict` sets malloc up before JAX starts (resnet_jax.host_memory), as train.py
    does. Only the command: `predict.main()` called from another program leaves its allocator alone.

    CPU-only JAX with glibc's own malloc, the case where the setting applies (the cases it leaves alone are
    tests/test_host_memory.py's).
    """
    script = (
        "import logging, runpy, sys; logging.basicConfig(level=logging.INFO); "
        f"sys.argv = ['predict', '--checkpoint', {checkpoint_10!r}, {image_files[0]!r}]; "
        "runpy.run_module('resnet_jax.predict', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == image_files[0]
    assert "host memory: malloc keeps freed memory" in result.stderr
    assert "JAX's backend has started" not in result.stderr


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
        iter(
            create_eval_batches(
                config, process_index=0, process_count=1, local_batch_size=4, split="test"
            )
        )
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


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """What load_variables returns for a training workdir: the run's config rides along."""
    path = str(tmp_path_factory.mktemp("workdir") / "ckpt")
    config = {"dataset": "digits", "image_size": 32, "model": MODEL}
    save_variables(
        path, _random_variables(10), {"model": MODEL, "num_classes": 10, "config": config}
    )
    return path


# Both preprocessing paths: torchvision's eval transform (converted checkpoints) and the trainer's own.
CHECKPOINT_KINDS = ["checkpoint_10", "training_checkpoint"]


def _png_header(path, width: int, height: int) -> str:
    """A PNG that declares width x height RGB pixels but holds no pixel data: huge and tiny at once."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return str(path)


def _run_cli(argv, capsys) -> tuple[int, list[str], list[str]]:
    code = predict.main(argv)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_cli_predicts_the_good_images_and_gives_one_line_per_unreadable_one(
    kind, request, image_files, tmp_path, capsys
):
    checkpoint = request.getfixturevalue(kind)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    good_only = _run_cli(["--checkpoint", checkpoint, *image_files], capsys)
    assert good_only[0] == 0 and good_only[2] == []

    mixed = [image_files[0], str(not_an_image), image_files[1], str(truncated)]
    code, out, err = _run_cli(["--checkpoint", checkpoint, *mixed], capsys)

    assert code == 1
    assert out == good_only[1]  # the good images' predictions, unchanged by the bad ones
    assert len(err) == 2 and all(line.startswith("error: cannot read ") for line in err)
    assert str(not_an_image) in err[0] and "not a format PIL recognizes" in err[0]
    assert str(truncated) in err[1] and "truncated" in err[1]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_cli_missing_file_is_one_error_line_and_the_others_are_predicted(
    kind, request, image_files, capsys
):
    checkpoint = request.getfixturevalue(kind)
    code, out, err = _run_cli(["--checkpoint", checkpoint, image_files[0], "missing.jpg"], capsys)
    assert code == 1
    assert out[0] == image_files[0] and len(out) == 6  # the path and its top 5
    assert err == ["error: no image file at missing.jpg"]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_cli_refuses_an_image_over_max_image_pixels_naming_the_limit_and_the_flag(
    kind, request, image_files, tmp_path, capsys
):
    checkpoint = request.getfixturevalue(kind)
    # The limit is the ramp's 48x48 exactly: it is read, one more row is not.
    Image.fromarray(np.zeros((49, 48), np.uint8)).save(tmp_path / "big.png")
    argv = ["--checkpoint", checkpoint, "--max_image_pixels", "2304", *image_files]
    code, out, err = _run_cli([*argv, str(tmp_path / "big.png")], capsys)
    assert code == 1
    assert [line for line in out if not line.startswith(" ")] == image_files
    assert len(err) == 1 and str(tmp_path / "big.png") in err[0]
    assert "48x49 = 2,352 pixels, over the limit of 2,304" in err[0]
    assert "--max_image_pixels 2352" in err[0]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_cli_refuses_a_196_megapixel_png_by_default_with_pils_limit(
    kind, request, image_files, tmp_path, capsys
):
    checkpoint = request.getfixturevalue(kind)
    huge = _png_header(tmp_path / "huge.png", 14_000, 14_000)
    pil_limit = Image.MAX_IMAGE_PIXELS
    code, out, err = _run_cli(["--checkpoint", checkpoint, huge, image_files[0]], capsys)
    assert code == 1 and out[0] == image_files[0]
    assert len(err) == 1 and huge in err[0] and "196,000,000 pixels" in err[0]
    assert f"limit of {2 * pil_limit:,}" in err[0] and "--max_image_pixels 196000000" in err[0]
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # lifted only while reading


def test_max_image_pixels_0_reads_an_image_over_pils_own_limit(
    checkpoint_10, image_files, monkeypatch, capsys
):
    # PIL would now refuse the 40x56 JPEG (over twice 1000 pixels) as a decompression bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    argv = ["--checkpoint", checkpoint_10, "--max_image_pixels", "0", image_files[0]]
    code, out, err = _run_cli(argv, capsys)
    assert (code, out[0], err) == (0, image_files[0], [])
    assert Image.MAX_IMAGE_PIXELS == 1000


def _transparent_images():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0  # index 0, stored as black, is fully transparent
    return [
        # (image, its expected RGB over white)
        (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (255, 127, 127)),  # half-transparent red
        (Image.new("LA", (8, 8), (0, 64)), (191, 191, 191)),  # quarter-opaque black
        (palette, (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), (255, 0, 0)),  # opaque: unchanged
    ]


@pytest.mark.parametrize(
    "image, expected_rgb", _transparent_images(), ids=["RGBA", "LA", "P", "opaque"]
)
def test_transparency_is_composited_over_white(image, expected_rgb, tmp_path):
    image.save(tmp_path / "alpha.png")
    pixels = predict.load_image(str(tmp_path / "alpha.png"), 8, 1.0, normalization="none")
    # Bilinear resizing of a uniform image keeps it uniform; 1/255: one level of rounding.
    np.testing.assert_allclose(
        pixels, np.broadcast_to(expected_rgb, (8, 8, 3)) / 255, atol=1.01 / 255
    )

    # The trainer's preprocessing path composites the same way: as an opaque file of the expected color.
    Image.new("RGB", (8, 8), tuple(int(round(c)) for c in pixels[0, 0] * 255)).save(
        tmp_path / "rgb.png"
    )
    load = predict.training_eval_preprocessor({"dataset": "digits", "image_size": 32})
    np.testing.assert_array_equal(
        load(str(tmp_path / "alpha.png")), load(str(tmp_path / "rgb.png"))
    )
