"""`python -m resnet_jax.summary`: parameter counts equal torchvision's; MACs follow the quoted convention."""

import pytest

from resnet_jax import summary


def _torchvision_resnet50():
    import torch
    import torchvision

    # On the meta device: shapes only, no memory and no init cost.
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    weights_meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta
    return model, weights_meta


def test_resnet50_summary_prints_torchvision_parameter_count(capsys):
    torch_model, _ = _torchvision_resnet50()
    torch_params = sum(p.numel() for p in torch_model.parameters())

    assert summary.main(["resnet50"]) == 0
    out = capsys.readouterr().out

    assert torch_params == 25_557_032
    assert f"{torch_params:,} parameters" in out
    assert "stage4   (7, 7, 2048)" in out


def test_resnet50_macs_match_torchvision_quoted_gflops_and_stage_shapes():
    _, weights_meta = _torchvision_resnet50()
    s = summary.summarize("resnet50", image_size=224)

    # torchvision's "_ops" (4.089 for resnet50) counts conv+linear multiply-accumulates in billions,
    # rounded to 3 decimals.
    assert s.macs / 1e9 == pytest.approx(weights_meta["_ops"], abs=5e-4)
    assert s.flops == 2 * s.macs
    assert s.output_shapes["stem"] == (56, 56, 64)
    assert s.output_shapes["stage1"] == (56, 56, 256)
    assert s.output_shapes["stage4"] == (7, 7, 2048)
    assert s.output_shapes["logits"] == (1000,)
    assert s.params_by_part["fc"] == 2048 * 1000 + 1000
    assert sum(s.params_by_part.values()) == s.num_params == 25_557_032


def test_cifar_resnet20_macs_by_part_hand_computed():
    s = summary.summarize("cifar_resnet20")  # defaults: 32x32, 10 classes

    assert (s.image_size, s.num_classes) == (32, 10)
    # stem: 3x3 conv, 3 -> 16 channels, on 32x32: outputs x taps x input channels.
    assert s.macs_by_part["stem"] == 32 * 32 * 16 * (3 * 3 * 3)
    # stage1: 3 blocks x 2 convs of 3x3, 16 -> 16, on 32x32.
    assert s.macs_by_part["stage1"] == 6 * 32 * 32 * 16 * (3 * 3 * 16)
    assert s.macs_by_part["fc"] == 64 * 10
    assert s.output_shapes["stage3"] == (8, 8, 64)


def test_markdown_table_has_one_row_per_model(capsys):
    assert summary.main(["cifar_resnet20", "resnet18", "--image_size", "32", "--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["cifar_resnet20", "resnet18"]


def test_unknown_model_is_one_line_and_exit_code_2(capsys):
    assert summary.main(["resnet51"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet51" in err and "resnet50" in err


def test_log_model_summary_logs_every_line():
    lines = []
    text = summary.log_model_summary("cifar_resnet20", log=lines.append)
    assert lines == text.splitlines()
    assert "269,722 parameters" in lines[0]
