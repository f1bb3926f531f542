"""`python -m resnet_jax.summary`: parameter counts equal torchvision's; MACs follow the quoted convention."""

import pytest
import torch
import torchvision
from flax import linen as nn

from resnet_jax import summary
from resnet_jax.conv import CpuConv


def _torchvision_resnet50():
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
    assert "stage4     (7, 7, 2048)" in out


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


# resnet18 at 32 px, 1000 classes, by hand (outputs x taps x input channels per conv): stem 7x7/2 to 16x16x64;
# stage1 four 3x3 64->64 convs on 8x8; stages 2-4 each 3x3/2 + three 3x3 + a 1x1/2 downsample, on 4x4, 2x2, 1x1;
# fc 512x1000. Channels double as maps shrink 4x, so stages 2-4 cost the same as stage2.
STAGE2_32PX_MACS = 4 * 4 * 128 * 9 * (64 + 3 * 128) + 4 * 4 * 128 * 64
RESNET18_32PX_MACS = (
    16 * 16 * 64 * 7 * 7 * 3 + 4 * 8 * 8 * 64 * 9 * 64 + 3 * STAGE2_32PX_MACS + 512 * 1000
)


@pytest.mark.parametrize("image_size", [16, 32, 224])
def test_resnet18_macs_do_not_depend_on_the_conv_implementation(image_size):
    # CpuConv (the CPU default) skips the taps of a 3x3 conv that read only padding: on a 1x1 map all but the
    # centre one. 16 px puts stages 3-4 on 1x1 maps, 32 px stage4; at 224 px no tap is skipped. The MACs must
    # be the architecture's, whichever conv would run. (Before the fix, 32 px gave 30.58 M instead of 37.52 M.)
    default = summary.summarize("resnet18", image_size=image_size)
    with_cpu_conv = summary.summarize("resnet18", image_size=image_size, conv=CpuConv)
    with_flax_conv = summary.summarize("resnet18", image_size=image_size, conv=nn.Conv)

    assert default.macs_by_part == with_cpu_conv.macs_by_part == with_flax_conv.macs_by_part
    if image_size == 32:
        assert default.macs == RESNET18_32PX_MACS == 37_523_456
    if image_size == 224:
        # torchvision's "_ops" (1.814 for resnet18): billions of conv+linear MACs, rounded to 3 decimals.
        weights_meta = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta
        assert default.macs / 1e9 == pytest.approx(weights_meta["_ops"], abs=5e-4)


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


def test_groupnorm_model_without_batch_stats_is_summarized():
    # BiT normalizes with GroupNorm: no running statistics, no batch_stats collection.
    s = summary.summarize("resnetv2_50x1_bit", image_size=32)
    assert s.num_batch_stats == 0
    assert s.macs == summary.summarize("resnetv2_50", image_size=32).macs
