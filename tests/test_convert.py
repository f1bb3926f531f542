"""The conversion API and `python -m resnet_jax.convert`: files both ways, safety, and errors a user can act on.

Logit parity for all ten architectures lives in test_torchvision_parity.py; here resnet18 carries the file
round trips, and torch models on the meta device (shapes only) carry the checks of keys and diagnoses.
"""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
import torchvision

from resnet_jax import checkpoint, create_model
from resnet_jax.convert import (
    CheckpointFileError,
    ConversionError,
    flax_to_torchvision,
    infer_architecture,
    load_state_dict_file,
    main,
    torchvision_to_flax,
)
from resnet_jax.models import IMAGENET_MODELS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
# One-off applies, op by op: XLA's optimization passes cost more than they save (see conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_xla")


def randomize_batch_norm(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Random BN affine and running statistics, so a swap of any two BN tensors changes the numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.weight.uniform_(0.5, 1.5, generator=generator)
                norm.bias.normal_(0.0, 0.1, generator=generator)
                norm.running_mean.normal_(0.0, 0.1, generator=generator)
                norm.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def numpy_state_dict(state_dict) -> dict[str, np.ndarray]:
    return {key: value.detach().cpu().numpy().copy() for key, value in state_dict.items()}


def meta_shapes(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(num_classes=num_classes)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def assert_same_bytes(actual: dict, expected: dict, skip=()) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        if key in skip:
            continue
        a, e = np.asarray(actual[key]), np.asarray(expected[key])
        assert (a.dtype, a.shape) == (e.dtype, e.shape), key
        assert a.tobytes() == e.tobytes(), key


def assert_trees_same_bytes(actual, expected) -> None:
    actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in actual_leaves] == [p for p, _ in expected_leaves]
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes(), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A torchvision resnet18 (5 classes, random BN statistics) as a .pth file and as numpy arrays."""
    torch.manual_seed(0)
    model = randomize_batch_norm(torchvision.models.resnet18(num_classes=NUM_CLASSES))
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return str(path), numpy_state_dict(model.state_dict())


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------
# Round trips through files.


def test_cli_round_trip_through_pth_and_safetensors_is_bit_exact(
    resnet18_weights, tmp_path, capsys
):
    source, expected = resnet18_weights
    status, out, _ = run_cli(capsys, "from-torch", source, str(tmp_path / "ckpt"))
    assert status == 0 and "resnet18" in out

    variables, metadata = checkpoint.load_variables(str(tmp_path / "ckpt"))
    assert metadata == {"model": "resnet18", "num_classes": NUM_CLASSES, "source": source}
    assert_trees_same_bytes(variables, torchvision_to_flax(expected, "resnet18"))

    counters = {key for key in expected if key.endswith("num_batches_tracked")}
    for suffix in (".pth", ".safetensors"):
        back = str(tmp_path / f"back{suffix}")
        status, _, _ = run_cli(capsys, "to-torch", str(tmp_path / "ckpt"), back)
        assert status == 0
        if suffix == ".pth":
            loaded = numpy_state_dict(torch.load(back, map_location="cpu", weights_only=True))
        else:
            loaded = safetensors_numpy.load_file(back)
            loaded = {key: loaded[key] for key in expected}  # safetensors stores keys sorted
        assert_same_bytes(loaded, expected, skip=counters)
        assert all(loaded[k].dtype == np.int64 and loaded[k].shape == () for k in counters)

        # ... and back again into a checkpoint: the same variables, byte for byte.
        again = str(tmp_path / f"again{suffix}")
        status, _, _ = run_cli(capsys, "from-torch", back, again)
        assert status == 0
        assert_trees_same_bytes(checkpoint.load_variables(again)[0], variables)


def test_exported_file_loads_into_torchvision_strictly_and_gives_its_logits(
    resnet18_weights, tmp_path, capsys
):
    source, _ = resnet18_weights
    run_cli(capsys, "from-torch", source, str(tmp_path / "ckpt"))
    run_cli(capsys, "to-torch", str(tmp_path / "ckpt"), str(tmp_path / "back.pth"))
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    model.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    original = torchvision.models.resnet18(num_classes=NUM_CLASSES).eval()
    original.load_state_dict(torch.load(source, weights_only=True), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), original(images))


def test_nested_state_dicts_and_a_stripped_prefix_are_read(resnet18_weights, tmp_path, capsys):
    _, expected = resnet18_weights
    tensors = {key: torch.from_numpy(value) for key, value in expected.items()}
    reference = torchvision_to_flax(expected, "resnet18")
    cases = {
        "nested_state_dict.pth": ({"state_dict": tensors, "epoch": 3}, ()),
        "nested_model.pt": ({"model": tensors, "optimizer": {}}, ()),
        "ddp.pth": ({f"module.{k}": v for k, v in tensors.items()}, ("--strip-prefix", "module.")),
    }
    for filename, (content, extra) in cases.items():
        torch.save(content, tmp_path / filename)
        destination = str(tmp_path / f"{filename}.ckpt")
        status, _, err = run_cli(
            capsys, "from-torch", str(tmp_path / filename), destination, *extra
        )
        assert status == 0, err
        assert_trees_same_bytes(checkpoint.load_variables(destination)[0], reference)


def test_a_prefixed_state_dict_without_strip_prefix_says_how_to_fix_it(
    resnet18_weights, tmp_path, capsys
):
    _, expected = resnet18_weights
    torch.save(
        {f"module.{k}": torch.from_numpy(v) for k, v in expected.items()}, tmp_path / "ddp.pth"
    )
    status, _, err = run_cli(
        capsys,
        "from-torch",
        str(tmp_path / "ddp.pth"),
        str(tmp_path / "out"),
        "--model",
        "resnet18",
    )
    assert status == 2
    assert "--strip-prefix module." in err
    assert not os.path.exists(tmp_path / "out")


def test_safetensors_both_ways_need_no_torch(resnet18_weights, tmp_path):
    _, expected = resnet18_weights
    safetensors_numpy.save_file(expected, str(tmp_path / "in.safetensors"))
    script = (
        "import sys; sys.modules['torch'] = None  # any import of torch now fails\n"
        "from resnet_jax.convert import main\n"
        f"assert main(['from-torch', {str(tmp_path / 'in.safetensors')!r}, {str(tmp_path / 'ckpt')!r}]) == 0\n"
        f"assert main(['to-torch', {str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'out.safetensors')!r}]) == 0\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    back = safetensors_numpy.load_file(str(tmp_path / "out.safetensors"))
    counters = {key for key in expected if key.endswith("num_batches_tracked")}
    assert_same_bytes({key: back[key] for key in expected}, expected, skip=counters)


def test_converting_both_ways_never_imports_grain(resnet18_weights, tmp_path):
    """Conversion needs Orbax but not the training stack: Grain is neither imported nor needed."""
    source, _ = resnet18_weights
    script = (
        "import sys\n"
        "from resnet_jax.convert import main\n"
        f"assert main(['from-torch', {source!r}, {str(tmp_path / 'ckpt')!r}]) == 0\n"
        f"assert main(['to-torch', {str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'out.pth')!r}]) == 0\n"
        "grain = [m for m in sys.modules if m == 'grain' or m.startswith('grain.')]\n"
        "assert not grain, grain\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The command line itself, as a user runs it: -X importtime names every module imported.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "resnet_jax.convert", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0 and "from-torch" in result.stdout, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "resnet_jax.convert.cli" in imported
    assert not [m for m in imported if m == "grain" or m.startswith("grain.")]


def test_help_explains_both_directions_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("from-torch", "to-torch", "weights_only=True", ".safetensors", "examples:"):
        assert expected in text


# ---------------------------------------------------------------------------------------------------------------
# Safety and files that are not checkpoints.


class _Payload:
    """Unpickling this would create `marker`: the proof that code from a checkpoint ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_malicious_checkpoint(path: str, marker: str, container: str) -> None:
    content = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": _Payload(marker)}
    if container == "zip":
        torch.save(content, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=2)


def test_the_test_payload_is_live_when_unpickled_unsafely(tmp_path):
    # The control: plain pickle runs the payload, so the marker checks below can fail.
    marker = str(tmp_path / "payload_ran")
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert os.path.isdir(marker)


@pytest.mark.parametrize("container", ["zip", "legacy_pickle"])
def test_a_pickle_that_runs_code_is_refused_and_its_payload_never_runs(container, tmp_path, capsys):
    marker = str(tmp_path / "payload_ran")
    evil = str(tmp_path / "evil.pth")
    write_malicious_checkpoint(evil, marker, container)
    with pytest.raises(CheckpointFileError, match="refused"):
        load_state_dict_file(evil)
    status, _, err = run_cli(capsys, "from-torch", evil, str(tmp_path / "out"))
    assert status == 2 and "refused" in err and "nothing in it was run" in err
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "out")


def test_the_command_line_refuses_a_malicious_pickle_with_one_line_and_no_traceback(tmp_path):
    marker = str(tmp_path / "payload_ran")
    evil = str(tmp_path / "evil.pth")
    write_malicious_checkpoint(evil, marker, "zip")
    # The whole command line, as a user runs it, in its own process.
    result = subprocess.run(
        [sys.executable, "-m", "resnet_jax.convert", "from-torch", evil, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "refused" in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "out")


def test_truncated_or_foreign_files_fail_with_one_line(resnet18_weights, tmp_path, capsys):
    source, expected = resnet18_weights
    safetensors_numpy.save_file(expected, str(tmp_path / "good.safetensors"))
    files = {}
    for name in ("resnet18.pth", "good.safetensors"):
        data = open(source if name.endswith(".pth") else tmp_path / name, "rb").read()
        files[f"truncated_{name}"] = data[: len(data) // 2]
    files["notes.pth"] = b"these are not weights\n"
    files["empty.safetensors"] = b""
    for filename, data in files.items():
        (tmp_path / filename).write_bytes(data)
        status, out, err = run_cli(
            capsys, "from-torch", str(tmp_path / filename), str(tmp_path / "out")
        )
        assert status == 2, filename
        assert err.count("\n") == 1 and err.startswith("error: ") and filename in err, err
        assert "not a readable" in err
        assert not os.path.exists(tmp_path / "out")
    status, _, err = run_cli(capsys, "to-torch", source, str(tmp_path / "out.pth"))
    assert status == 2 and "variables checkpoint" in err and err.count("\n") == 1


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(
    resnet18_weights, tmp_path, capsys
):
    source, _ = resnet18_weights
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "precious.txt").write_text("keep me")
    status, _, err = run_cli(capsys, "from-torch", source, str(checkpoint_dir))
    assert status == 2 and "--overwrite" in err
    assert (checkpoint_dir / "precious.txt").read_text() == "keep me"

    status, _, _ = run_cli(capsys, "from-torch", source, str(checkpoint_dir), "--overwrite")
    assert status == 0
    assert not (checkpoint_dir / "precious.txt").exists()
    assert checkpoint.load_variables(str(checkpoint_dir))[1]["model"] == "resnet18"

    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old")
    status, _, err = run_cli(capsys, "to-torch", str(checkpoint_dir), str(output))
    assert status == 2 and output.read_bytes() == b"old"
    status, _, _ = run_cli(capsys, "to-torch", str(checkpoint_dir), str(output), "--overwrite")
    assert status == 0 and "fc.weight" in safetensors_numpy.load_file(str(output))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out.safetensors"]  # no temporary left behind


def test_a_failed_overwrite_keeps_the_old_output(resnet18_weights, tmp_path, capsys, monkeypatch):
    source, _ = resnet18_weights
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "precious.txt").write_text("keep me")

    def interrupted_save(path, variables, metadata):
        os.makedirs(path)
        open(os.path.join(path, "half_written"), "w").close()
        raise ConversionError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "save_variables", interrupted_save)
    status, _, err = run_cli(capsys, "from-torch", source, str(checkpoint_dir), "--overwrite")
    assert status == 2 and "disk full" in err
    assert (checkpoint_dir / "precious.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["ckpt"]  # the partial output was cleaned up


# ---------------------------------------------------------------------------------------------------------------
# Errors that say what is wrong and what it probably is.


def test_key_mismatch_counts_the_keys_and_names_the_likely_architecture_first():
    shapes = meta_shapes("resnet50")
    with pytest.raises(ConversionError) as error:
        torchvision_to_flax(shapes_as_arrays(shapes), "resnet101")
    lines = str(error.value).splitlines()
    # resnet101 has 17 more bottlenecks in layer3 (layer3.6 .. layer3.22), 15 keys each without counters.
    assert lines[0].endswith(": 255 missing, 0 unexpected, 0 mis-shaped")
    assert lines[1] == "hint: this looks like resnet50 weights, not resnet101"
    # The first keys are listed, the rest counted, so the cause stays readable above them.
    assert "  layer3.6.conv1.weight (256, 1024, 1, 1)" in lines
    assert lines[-1] == "  ... 235 more" and len(lines) == 2 + 1 + 20 + 1


def test_missing_unexpected_and_misshaped_keys_are_all_listed():
    shapes = meta_shapes("resnet18")
    del shapes["layer2.1.bn2.running_var"]
    shapes["layer2.1.extra.weight"] = (3,)
    shapes["layer3.0.conv1.weight"] = (256, 128, 1, 1)
    with pytest.raises(ConversionError) as error:
        torchvision_to_flax(shapes_as_arrays(shapes), "resnet18")
    assert str(error.value).splitlines()[1:] == [
        "missing:",
        "  layer2.1.bn2.running_var (128,)",
        "unexpected:",
        "  layer2.1.extra.weight (3,)",
        "mis-shaped:",
        "  layer3.0.conv1.weight: (256, 128, 1, 1), expected (256, 128, 3, 3)",
    ]


def test_flax_side_mismatch_names_flax_paths_and_the_architecture():
    variables = torchvision_to_flax(shapes_as_arrays(meta_shapes("resnet34")), "resnet34")
    with pytest.raises(ConversionError) as error:
        flax_to_torchvision(variables, "resnet18")
    message = str(error.value)
    assert "80 unexpected" in message
    assert "this looks like resnet34 weights, not resnet18" in message
    assert "params/stage2_block4/conv1/kernel (3, 3, 128, 128)" in message


def test_cli_key_mismatch_exits_2_with_the_hint(resnet18_weights, tmp_path, capsys):
    source, _ = resnet18_weights
    status, _, err = run_cli(
        capsys, "from-torch", source, str(tmp_path / "out"), "--model", "resnet34"
    )
    assert status == 2
    assert "this looks like resnet18 weights, not resnet34" in err
    assert "80 missing" in err and "layer1.2.conv1.weight" in err and "... 60 more" in err
    assert not os.path.exists(tmp_path / "out")


def test_unknown_model_names_are_refused_with_the_list_of_names(capsys):
    for name in ("resnet51", "cifar_resnet20"):
        with pytest.raises(ConversionError) as error:
            torchvision_to_flax({}, name)
        assert all(known in str(error.value) for known in IMAGENET_MODELS)
        with pytest.raises(ConversionError, match="resnext101_64x4d"):
            flax_to_torchvision({"params": {}}, name)
    with pytest.raises(SystemExit) as exit_info:
        main(["from-torch", "a.pth", "b", "--model", "resnet51"])
    assert exit_info.value.code == 2 and "wide_resnet101_2" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(IMAGENET_MODELS))
def test_architecture_is_inferred_from_torchvision_keys_and_shapes(name):
    assert infer_architecture(meta_shapes(name, num_classes=3)) == name


def test_timm_style_deep_stem_gets_a_hint():
    shapes = meta_shapes("resnet50")
    del shapes["conv1.weight"]
    shapes.update({"conv1.0.weight": (32, 3, 3, 3), "conv1.1.weight": (32,)})
    with pytest.raises(ConversionError, match="deep stem"):
        torchvision_to_flax(shapes_as_arrays(shapes), "resnet50")


def shapes_as_arrays(shapes: dict) -> dict[str, np.ndarray]:
    # Zero-stride views: the right shapes at no memory cost (conversion validates shapes first).
    return {key: np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------
# API details.


def test_state_dict_without_fc_gives_a_model_without_classifier(resnet18_weights):
    _, expected = resnet18_weights
    backbone = {key: value for key, value in expected.items() if not key.startswith("fc.")}
    variables = torchvision_to_flax(backbone, "resnet18")
    assert "fc" not in variables["params"]
    # Batch 2 at 32x32, as the other resnet18 applies of the suite: op by op, a new shape is a new compile.
    pooled = create_model("resnet18", num_classes=0).apply(variables, jnp.ones((2, 32, 32, 3)))
    assert pooled.shape == (2, 512)

    # Back to torchvision: no fc keys, loadable strictly once fc is the identity, as backbones do it.
    state_dict = flax_to_torchvision(variables, "resnet18")
    assert list(state_dict) == list(backbone)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)


def test_converted_arrays_share_no_memory_with_their_source(resnet18_weights):
    _, expected = resnet18_weights
    tensors = {key: torch.from_numpy(value.copy()) for key, value in expected.items()}
    variables = torchvision_to_flax(tensors, "resnet18")
    before = jax.tree.map(np.copy, variables)
    for tensor in tensors.values():
        tensor.add_(1)  # torch's in-place update, as a train-mode forward would do to running stats
    assert_trees_same_bytes(variables, before)

    state_dict = flax_to_torchvision(variables, "resnet18")
    for array in jax.tree.leaves(variables):
        assert not any(np.shares_memory(array, out) for out in state_dict.values())


def test_bfloat16_and_float16_torch_weights_convert_exactly_to_float32(resnet18_weights):
    _, expected = resnet18_weights
    for dtype in (torch.bfloat16, torch.float16):
        low = {
            k: torch.from_numpy(v).to(dtype) if v.dtype == np.float32 else torch.from_numpy(v)
            for k, v in expected.items()
        }
        variables = torchvision_to_flax(low, "resnet18")
        kernel = variables["params"]["stem_conv"]["kernel"]
        assert kernel.dtype == np.float32
        np.testing.assert_array_equal(
            kernel.transpose(3, 2, 0, 1), low["conv1.weight"].float().numpy()
        )


def test_timm_resnet_converts_with_timm_own_module():
    import timm

    # Same keys and shapes as torchvision for every architecture resnet_jax defines (shapes only: meta device).
    for name in IMAGENET_MODELS:
        with torch.device("meta"):
            timm_model = timm.create_model(name, pretrained=False, num_classes=7)
        timm_shapes = {k: tuple(v.shape) for k, v in timm_model.state_dict().items()}
        assert list(timm_shapes.items()) == list(meta_shapes(name, num_classes=7).items()), name

    torch.manual_seed(0)
    timm_model = randomize_batch_norm(
        timm.create_model("resnet18", pretrained=False, num_classes=7)
    )
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(images)).numpy()
    variables = torchvision_to_flax(timm_model.state_dict(), "resnet18")
    logits = create_model("resnet18", num_classes=7).apply(variables, images.transpose(0, 2, 3, 1))
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
