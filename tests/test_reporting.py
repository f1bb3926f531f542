"""Metrics files, TensorBoard events (read back with TensorBoard's own reader), the progress bar, PNG curves."""

import io
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import plot, reporting


def _write_sample_run(workdir: str, num_steps: int = 40, eval_every: int = 10) -> None:
    with reporting.MetricWriter(workdir) as writer:
        writer.write_hparams(
            {
                "model": "cifar_resnet20",
                "learning_rate": 0.1,
                "optimizer": {"nesterov": True},
                "milestones": (32000, 48000),
            }
        )
        for step in range(1, num_steps + 1):
            metrics = {
                # jax and numpy scalars, as the trainer hands them over.
                "train_loss": jnp.float32(2.3 / step),
                "train_accuracy": np.float32(1 - 1 / step),
                "learning_rate": 0.1,
            }
            if step % eval_every == 0:
                metrics.update(eval_loss=2.5 / step, eval_accuracy=1 - 1.5 / step)
            writer.write(step, metrics)


def _read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_metrics_jsonl_lines_parse_and_have_step(tmp_path):
    _write_sample_run(str(tmp_path))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 40
    assert all("step" in r and "train_loss" in r for r in records)
    assert records[9]["eval_accuracy"] == pytest.approx(0.85)
    assert records[0]["train_loss"] == pytest.approx(2.3)
    assert "eval_loss" not in records[0]


def test_tensorboard_events_hold_the_same_metrics(tmp_path):
    _write_sample_run(str(tmp_path))
    scalars = _read_scalars(str(tmp_path / "tensorboard"))
    assert set(scalars) == {
        "train_loss",
        "train_accuracy",
        "learning_rate",
        "eval_loss",
        "eval_accuracy",
    }
    assert [step for step, _ in scalars["eval_accuracy"]] == [10, 20, 30, 40]
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for step, value in scalars["train_loss"]:
        assert value == pytest.approx(jsonl[step - 1]["train_loss"], rel=1e-6)


def test_hparams_go_to_config_json_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _write_sample_run(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"] == {"nesterov": True} and config["milestones"] == [32000, 48000]

    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert "config" in accumulator.Tags()["tensors"]
    content = accumulator.PluginTagToContent("hparams")
    [raw] = content.values()
    session = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    assert session.hparams["learning_rate"].number_value == pytest.approx(0.1)
    assert session.hparams["optimizer.nesterov"].bool_value is True
    assert session.hparams["model"].string_value == "cifar_resnet20"
    assert session.hparams["milestones"].string_value == "[32000, 48000]"


def test_resumed_writer_appends_and_nonfinite_values_stay_parseable(tmp_path):
    _write_sample_run(str(tmp_path), num_steps=5)
    with reporting.MetricWriter(str(tmp_path)) as writer:
        writer.write(6, {"train_loss": float("nan")})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["train_loss"] is None
    steps, _ = plot.load_metrics(str(tmp_path / "metrics.jsonl"))["train_loss"]
    assert steps.tolist() == [1, 2, 3, 4, 5]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = reporting.MetricWriter(str(workdir), enabled=False)
    writer.write_hparams({"model": "resnet18"})
    writer.write(1, {"train_loss": 1.0})
    writer.flush()
    writer.close()
    assert not workdir.exists()


def test_non_scalar_metric_is_rejected_with_its_name(tmp_path):
    with reporting.MetricWriter(str(tmp_path)) as writer:
        with pytest.raises(TypeError, match="'train_loss' must be a real scalar"):
            writer.write(1, {"train_loss": np.ones(3)})


def test_plot_is_a_png_of_sensible_size(tmp_path):
    _write_sample_run(str(tmp_path / "a"))
    out = tmp_path / "curves.png"
    plot.plot_curves(str(tmp_path / "a" / "metrics.jsonl"), str(out))
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 600 <= width <= 2000 and 300 <= height <= 1200
        # Not a blank canvas: the curves put many distinct colors on it.
        assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 50


def test_plot_draws_train_and_eval_in_their_own_colours(tmp_path):
    _write_sample_run(str(tmp_path / "a"))
    out = tmp_path / "curves.png"
    plot.plot_curves(str(tmp_path / "a" / "metrics.jsonl"), str(out))
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # matplotlib's tab:blue (train) and tab:orange (eval), each on many pixels: lines and legend.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert np.all(pixels == rgb, axis=-1).sum() > 100, rgb


def test_plot_cli_compares_runs_and_tolerates_runs_without_eval(tmp_path, capsys):
    _write_sample_run(str(tmp_path / "a"))
    _write_sample_run(str(tmp_path / "b"), num_steps=5, eval_every=100)  # no eval yet
    out = tmp_path / "compare.png"
    code = plot.main(
        [
            str(tmp_path / "a"),
            str(tmp_path / "b" / "metrics.jsonl"),
            "--labels",
            "sgd",
            "adamw",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.exists()
    with Image.open(out) as image:
        assert image.format == "PNG"


def test_plot_cli_missing_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.jsonl" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_with_no_metrics_at_all_still_writes_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    plot.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "empty.png"))
    with Image.open(tmp_path / "empty.png") as image:
        assert image.format == "PNG"


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_steps_images_per_second_and_loss_on_a_terminal():
    stream = _FakeTerminal()
    bar = reporting.progress_bar(
        10, enabled=True, desc="train", initial=2, images_per_step=128, file=stream
    )
    assert not bar.disable
    for step in range(8):
        bar.update(1)
        if step == 0:
            bar.set_postfix(loss=0.5)
    bar.close()
    final = stream.getvalue().split("\r")[-1]
    assert "train" in final and "10/10" in final and "loss=0.5" in final
    assert re.search(r"[\d,]+ img/s", final), final


def test_progress_bar_without_images_per_step_counts_steps():
    stream = _FakeTerminal()
    bar = reporting.progress_bar(4, enabled=True, desc="eval", file=stream)
    bar.update(4)
    bar.close()
    final = stream.getvalue().split("\r")[-1]
    assert "eval" in final and "4/4" in final and "img/s" not in final


def test_progress_bar_is_off_without_a_terminal_or_when_disabled():
    stream = io.StringIO()  # isatty() is False: a log file or CI
    bar = reporting.progress_bar(10, enabled=True, desc="train", images_per_step=8, file=stream)
    bar.update(5)
    bar.set_postfix(loss=1.0)
    bar.close()
    terminal = _FakeTerminal()
    disabled = reporting.progress_bar(10, enabled=False, desc="train", file=terminal)
    disabled.update(5)
    disabled.set_postfix(loss=1.0)
    disabled.close()
    assert bar.disable and disabled.disable
    assert stream.getvalue() == "" and terminal.getvalue() == ""


def test_importing_reporting_loads_neither_tensorboard_nor_matplotlib():
    code = (
        "import sys, resnet_jax.reporting\n"
        "print(sorted(m for m in ('tensorboard', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_plot_curves_png_written_atomically(tmp_path):
    _write_sample_run(str(tmp_path))
    plot.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "curves.png",
        "metrics.jsonl",
        "tensorboard",
    ]


def test_writer_redraws_the_workdir_curves_and_disabled_writer_does_not(tmp_path):
    _write_sample_run(str(tmp_path / "run"))
    with reporting.MetricWriter(str(tmp_path / "run")) as writer:
        writer.write(41, {"eval_accuracy": 0.99})
        path = writer.plot_curves()
    assert path == str(tmp_path / "run" / "curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert reporting.MetricWriter(str(tmp_path / "off"), enabled=False).plot_curves() is None
    assert not (tmp_path / "off").exists()


def test_each_record_reaches_metrics_jsonl_before_flush(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path))
    writer.write(1, {"train_loss": 1.5})
    # Read while the writer is open and unflushed: a live run is plotted and tailed like this.
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train_loss": 1.5}
    writer.close()
