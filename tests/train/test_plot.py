"""`fastlm plot`: the curves it draws from metrics.jsonl (raw and smoothed training loss, validation loss, several
runs overlaid), the moving average, its PNG, and errors that name the run or the option."""

import json
import re
from pathlib import Path

import pytest

from fastlm.cli import main
from fastlm.train.plot import loss_curves, plot_runs, smooth


def write_run(run_dir: Path, losses: list[float], eval_losses: dict[int, float]) -> Path:
    run_dir.mkdir(parents=True)
    records = [{"kind": "train", "step": step, "loss": loss, "lr": 1e-3} for step, loss in enumerate(losses, 1)]
    records += [{"kind": "eval", "step": step, "loss": loss, "bleu": 1.0} for step, loss in eval_losses.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "pretrained", [4.0, 3.0, 3.5, 2.0], {2: 3.2, 4: 2.5}),
            write_run(tmp_path / "random", [5.0, 4.5, 4.8], {})]


def test_each_run_gives_raw_and_smoothed_training_loss_and_its_validation_loss(runs):
    curves = loss_curves(runs, smoothing=0.5)
    assert [(curve.run, curve.kind) for curve in curves] == [
        ("pretrained", "train (raw)"), ("pretrained", "train"), ("pretrained", "validation"),
        ("random", "train (raw)"), ("random", "train")]
    assert curves[0].losses == [4.0, 3.0, 3.5, 2.0] and curves[0].steps == [1, 2, 3, 4]
    assert curves[1].losses == pytest.approx(smooth([4.0, 3.0, 3.5, 2.0], 0.5))
    assert (curves[2].steps, curves[2].losses) == ([2, 4], [3.2, 2.5])
    assert [curve.kind for curve in loss_curves(runs, smoothing=0)] == ["train", "validation", "train"]


def test_runs_of_one_name_are_told_apart_by_their_paths(tmp_path):
    first = write_run(tmp_path / "a" / "run", [1.0], {})
    second = write_run(tmp_path / "b" / "run", [2.0], {})
    assert {curve.run for curve in loss_curves([first, second])} == {str(first), str(second)}


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])   # no pull toward 0 at the start
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_plot_overlays_runs_into_one_png(runs, tmp_path, capsys):
    output = tmp_path / "compare.png"
    assert main(["plot", str(runs[0]), str(runs[1]), "--output", str(output), "--smoothing", "0.6"]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(output)
    assert plot_runs(runs[:1]) == runs[0] / "loss.png" and (runs[0] / "loss.png").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["{missing}"], "run_dir '.*empty': no metrics.jsonl"),
    (["{run}", "--smoothing", "1"], r"smoothing = 1.0: expected a number in \[0, 1\)"),
])
def test_plot_errors_name_the_run_or_the_option(arguments, message, runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    filled = [argument.format(missing=tmp_path / "empty", run=runs[0]) for argument in arguments]
    assert main(["plot", *filled]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastlm: error:") and re.search(message, error)
