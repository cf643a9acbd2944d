"""Selecting the best checkpoint by validation loss or BLEU, and stopping early: the selection against an oracle; the
trainer's best.pt, exported model, early stop and exact resume (also from a checkpoint written before selections
were saved); 2 gloo processes deciding alike although BLEU exists on rank 0 only."""

import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastlm.train import ConfigError, TrainConfig, Trainer, TrainingInterrupted, load_checkpoint
from fastlm.train.metrics import read_records
from fastlm.train.selection import Selection

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import run_toy, toy_config, train_losses  # noqa: E402
from toy_training import ScriptedBleu, ToyBatches, ToyLM  # noqa: E402

# Evaluations every 2 steps; the best BLEU at step 4, then two evaluations without a better one (a tie is not).
BLEU = {2: 1.0, 4: 3.0, 6: 2.0, 8: 3.0, 10: 9.0, 12: 9.0}
EARLY_STOP = dict(max_steps=12, eval_interval=2, checkpoint_interval=100, select_by="bleu", patience=2)


@given(st.lists(st.one_of(st.floats(-10, 10), st.just(math.nan), st.just(math.inf)), min_size=1, max_size=12),
       st.sampled_from(["loss", "bleu"]), st.integers(0, 4))
def test_the_selection_keeps_the_first_best_finite_value_and_counts_evaluations_since(values, metric, patience):
    sign = 1 if metric == "loss" else -1  # lower loss, higher BLEU
    selection = Selection(metric)
    improved = [selection.update(value, step) for step, value in enumerate(values, 1)]
    finite = [(sign * value, step) for step, value in enumerate(values, 1) if math.isfinite(value)]
    assert improved == [math.isfinite(value) and all(sign * value < key for key, s in finite if s < step)
                        for step, value in enumerate(values, 1)]
    best_key, best_step = min(finite) if finite else (None, None)
    assert selection.best_step == best_step
    assert selection.best == (None if best_key is None else sign * best_key)
    since = len(values) - (best_step or 0)
    assert selection.evaluations_since_best == since
    assert selection.exhausted(patience) == (patience > 0 and since >= patience)
    assert selection.describe().endswith(f"at step {best_step}" if finite else f"no finite validation {metric}")


class ScriptedEvalLoss:
    """A forward hook making the validation loss (eval mode only) the value scripted for the trainer's step."""

    def __init__(self, values: dict[int, float]):
        self.values, self.trainer = values, None

    def __call__(self, module, args, kwargs, output):
        if not module.training:
            output.loss = output.loss * 0 + self.values[self.trainer.step]
        return output


def scripted_trainer(run_dir: Path, *, bleu: dict | None = None, eval_loss: dict | None = None,
                     **overrides) -> Trainer:
    torch.manual_seed(0)
    model = ToyLM()
    extra_eval = ScriptedBleu(bleu) if bleu is not None else None
    trainer = Trainer(model, ToyBatches(), toy_config(**overrides), run_dir,
                      valid_batches=ToyBatches(num_batches=2, seed=9), extra_eval=extra_eval)
    if eval_loss is not None:
        hook = ScriptedEvalLoss(eval_loss)
        model.register_forward_hook(hook, with_kwargs=True)
        hook.trainer = trainer
    if extra_eval is not None:
        extra_eval.trainer = trainer
    return trainer


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_best_pt_and_the_exported_model_hold_the_lowest_validation_loss_not_the_last(tmp_path):
    trainer = scripted_trainer(tmp_path, eval_loss={2: 3.0, 4: 1.0, 6: 2.0, 8: 1.5}, max_steps=8, eval_interval=2,
                               checkpoint_interval=100)
    trainer.fit()
    assert [r["loss"] for r in read_records(tmp_path / "metrics.jsonl", "eval")] == [3.0, 1.0, 2.0, 1.5]
    best, last = load_checkpoint(trainer.checkpoints.best), load_checkpoint(trainer.checkpoints.latest())
    assert (best["step"], last["step"]) == (4, 8)
    assert not all(torch.equal(best["model"][name], last["model"][name]) for name in best["model"])
    assert trainer.export_model(tmp_path / "model") == "best validation loss, step 4"
    assert_same_weights(torch.load(tmp_path / "model" / "toy.pt"), best["model"])
    assert last["selection"] == {"metric": "loss", "best": 1.0, "best_step": 4, "evaluations_since_best": 2}


def test_without_validation_data_the_last_weights_are_exported(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(ToyLM(), ToyBatches(), toy_config(max_steps=4, checkpoint_interval=2), tmp_path)
    trainer.fit()
    assert load_checkpoint(trainer.checkpoints.best)["step"] == 4
    assert trainer.export_model(tmp_path / "model") == "last step 4"
    assert_same_weights(torch.load(tmp_path / "model" / "toy.pt"), trainer.model.state_dict())


def test_patience_stops_the_run_cleanly_and_a_resume_trains_no_further(tmp_path, capsys):
    trainer = scripted_trainer(tmp_path, bleu=BLEU, progress=True, **EARLY_STOP)
    assert trainer.fit()["bleu"] == 3.0
    assert trainer.stopped_early and trainer.step == 8
    assert "stopping early after step 8: no better validation bleu in 2 evaluations (best: validation bleu 3 at " \
           "step 4)" in capsys.readouterr().err
    assert [step for step, _ in train_losses(tmp_path)] == list(range(1, 9))
    assert load_checkpoint(trainer.checkpoints.latest())["step"] == 8  # the final checkpoint
    assert trainer.export_model(tmp_path / "model") == "best validation bleu, step 4"
    assert_same_weights(torch.load(tmp_path / "model" / "toy.pt"), load_checkpoint(trainer.checkpoints.best)["model"])

    resumed = scripted_trainer(tmp_path, bleu=BLEU, **EARLY_STOP)
    assert resumed.resume() and resumed.stopped_early
    resumed.fit()
    assert resumed.step == 8 and [step for step, _ in train_losses(tmp_path)] == list(range(1, 9))


class InterruptingBleu(ScriptedBleu):
    """Scripted BLEU that also asks the trainer to stop (as SIGTERM does) after evaluating step `at`."""

    def __init__(self, values: dict[int, float], at: int):
        super().__init__(values)
        self.at = at

    def __call__(self, model) -> dict:
        if self.trainer.step == self.at:
            self.trainer.stop_signal = signal.SIGTERM
        return super().__call__(model)


def test_a_run_interrupted_between_evaluations_stops_early_where_the_straight_run_does(tmp_path):
    straight = scripted_trainer(tmp_path / "straight", bleu=BLEU, **EARLY_STOP)
    straight.fit()

    interrupted = scripted_trainer(tmp_path / "interrupted", bleu=BLEU, **EARLY_STOP)
    interrupted.extra_eval = InterruptingBleu(BLEU, at=6)
    interrupted.extra_eval.trainer = interrupted
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    saved = load_checkpoint(interrupted.checkpoints.latest())
    assert saved["step"] == 6 and saved["selection"]["evaluations_since_best"] == 1
    resumed = scripted_trainer(tmp_path / "interrupted", bleu=BLEU, **EARLY_STOP)
    assert resumed.resume()
    resumed.fit()
    assert resumed.step == straight.step == 8 and resumed.selection == straight.selection
    assert train_losses(tmp_path / "interrupted") == train_losses(tmp_path / "straight")


@pytest.mark.parametrize("best_eval_loss, expected", [(1.25, 1.25), (math.inf, None)])
def test_a_checkpoint_written_before_selections_were_saved_still_resumes(tmp_path, best_eval_loss, expected):
    scripted_trainer(tmp_path, max_steps=4, eval_interval=2, checkpoint_interval=2).fit()
    path = tmp_path / "checkpoints" / "step-00000004.pt"
    old = load_checkpoint(path)
    del old["selection"]
    torch.save({**old, "best_eval_loss": best_eval_loss}, path)
    resumed = scripted_trainer(tmp_path, max_steps=4, eval_interval=2, checkpoint_interval=2)
    assert resumed.resume()
    assert resumed.selection == Selection("loss", best=expected)
    with pytest.raises(ValueError, match="select_by: checkpoint has 'loss', this run 'bleu'"):
        scripted_trainer(tmp_path, bleu=BLEU, max_steps=4, select_by="bleu").resume()


def test_selection_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="select_by='accuracy': expected one of loss, bleu"):
        TrainConfig(select_by="accuracy")
    with pytest.raises(ConfigError, match="patience=-1: expected a value >= 0"):
        TrainConfig(patience=-1)
    with pytest.raises(ValueError, match="select_by='bleu' needs an evaluation that reports BLEU"):
        Trainer(ToyLM(), ToyBatches(), toy_config(select_by="bleu"), tmp_path, valid_batches=ToyBatches())
    with pytest.raises(ValueError, match=r"patience=3 needs validation data .*\(--valid\)"):
        Trainer(ToyLM(), ToyBatches(), toy_config(patience=3), tmp_path)


def test_two_gloo_processes_stop_early_alike_on_bleu_only_rank_0_computes(tmp_path):
    bleu = ",".join(f"{step}:{value}" for step, value in BLEU.items())
    args = ["--bleu", bleu, *(f"--{key}={value}" for key, value in EARLY_STOP.items())]
    run_toy(tmp_path, *args, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert [step for step, _ in train_losses(tmp_path)] == list(range(1, 9))
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 4
    assert_same_weights(torch.load(tmp_path / "model" / "toy.pt"), best["model"])
