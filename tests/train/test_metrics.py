"""TensorBoard curves, read back from the event files: the numbers of metrics.jsonl and the run's config; a resumed
run leaves neither stale nor repeated steps; without the tensorboard package training writes none and goes on."""

import sys
import time
from pathlib import Path

import pytest
import torch

from fastlm.train import Trainer
from fastlm.train.metrics import read_records

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import toy_config  # noqa: E402
from toy_training import ToyBatches, ToyLM  # noqa: E402


def read_events(run_dir: Path):
    """The run's events as TensorBoard's own reader sees them (it applies the purge markers)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run_dir), size_guidance={accumulator.SCALARS: 0})  # 0: keep all
    return events.Reload()


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = read_events(run_dir)
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) series per "kind/name", for comparison with the event files."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_records(run_dir / "metrics.jsonl"):
        for name, value in record.items():
            if name not in ("kind", "step"):
                series.setdefault(f"{record['kind']}/{name}", []).append((record["step"], value))
    return series


def assert_same_points(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in actual] == [step for step, _ in expected]
    assert [value for _, value in actual] == pytest.approx([value for _, value in expected], rel=1e-6)  # float32


def test_training_writes_its_metrics_and_config_as_tensorboard_curves(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    trainer = Trainer(ToyLM(), ToyBatches(), toy_config(max_steps=6, eval_interval=3), tmp_path,
                      valid_batches=ToyBatches(num_batches=2, seed=9), run_info={"model": {"name": "toy"}},
                      extra_eval=lambda model: {"bleu": 12.5, "samples": ["source => output"]})
    trainer.fit()
    curves = scalars(tmp_path)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/perplexity",
            "eval/accuracy", "eval/bleu"} <= set(curves)
    expected = logged(tmp_path)
    assert set(curves) == set(expected)
    for tag, points in expected.items():
        assert_same_points(curves[tag], points)
    assert [step for step, _ in curves["eval/bleu"]] == [3, 6]
    config = read_events(tmp_path).Tensors("config/text_summary")
    assert [event.step for event in config] == [0]
    assert '"name": "toy"' in config[0].tensor_proto.string_val[0].decode()


def test_a_resumed_run_leaves_no_stale_or_repeated_step_in_the_curves(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    Trainer(ToyLM(), ToyBatches(), toy_config(max_steps=6, checkpoint_interval=4, eval_interval=0), tmp_path).fit()
    # TensorBoard reads a run's event files in name order: the creation second, then a per-process counter compared
    # as text (".10" before ".9"), so a resume within the same second as the first run could be read first. A real
    # resume comes seconds later; so does this one.
    time.sleep(1.1)
    # Resume from step 4 and stop at 5: steps 5 and 6 of the first run are gone, step 5 comes back once.
    resumed = Trainer(ToyLM(), ToyBatches(), toy_config(max_steps=5, checkpoint_interval=4, eval_interval=0), tmp_path)
    assert resumed.resume(tmp_path / "checkpoints" / "step-00000004.pt")
    resumed.fit()
    curves = scalars(tmp_path)
    assert [step for step, _ in curves["train/loss"]] == [1, 2, 3, 4, 5]
    assert_same_points(curves["train/loss"], logged(tmp_path)["train/loss"])
    assert [event.step for event in read_events(tmp_path).Tensors("config/text_summary")] == [0, 5]


def test_without_tensorboard_training_writes_no_event_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # what importing it without tensorboard does
    Trainer(ToyLM(), ToyBatches(), toy_config(max_steps=2, eval_interval=0), tmp_path).fit()
    assert [step for step, _ in logged(tmp_path)["train/loss"]] == [1, 2]
    assert not list(tmp_path.glob("events.out.tfevents.*"))
