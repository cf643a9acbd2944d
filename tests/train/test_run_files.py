"""Run directories a user hands over: a checkpoint of another run (model shape, task, tokenizer, data) or resumed
with other settings is a clear error, a resume may extend the run, a checkpoint that carries a pickled payload is
never executed, and a full disk while a checkpoint is written leaves the earlier ones intact and the run resumable
once space is freed."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest
import torch

from fastlm.train import TrainConfig, Trainer, load_checkpoint
from fastlm.train import checkpoint as checkpoint_module
from fastlm.train.metrics import read_records
from fastlm.train.optim import lr_multiplier

sys.path.insert(0, str(Path(__file__).parent))
from toy_training import ToyBatches, ToyLM  # noqa: E402

RUN_INFO = {"task": "pretrain-decoder", "model": {"d_model": 32, "n_layers": 2}, "tokenizer_sha256": "a" * 64,
            "data": {"train": "/data/train"}, "corpora": {"train": "1234"}}


def config(**overrides) -> TrainConfig:
    values = dict(progress=False, warmup_steps=2, max_steps=4, batch_size=4, eval_interval=0, checkpoint_interval=2,
                  lr=3e-2)
    return TrainConfig(**{**values, **overrides})


def trainer(run_dir: Path, *, width: int = 32, run_info: dict = RUN_INFO, **overrides) -> Trainer:
    torch.manual_seed(0)
    return Trainer(ToyLM(width=width), ToyBatches(), config(**overrides), run_dir, run_info=run_info)


@pytest.fixture
def finished_run(tmp_path):
    trainer(tmp_path).fit()
    return tmp_path


def _with(mapping: dict, **changes) -> dict:
    return {**mapping, **changes}


@pytest.mark.parametrize("width, run_info, message", [
    (16, RUN_INFO, r"holds another model \(blocks.0.bias: checkpoint has \(32,\), this run \(16,\)"),
    (32, _with(RUN_INFO, task="pretrain-encoder"),
     "belongs to another run .task: checkpoint has 'pretrain-decoder', this run 'pretrain-encoder'"),
    (32, _with(RUN_INFO, model={"d_model": 64, "n_layers": 2}), r"model.d_model: checkpoint has 32, this run 64"),
    (32, _with(RUN_INFO, tokenizer_sha256="b" * 64), "tokenizer_sha256: checkpoint has 'aaaa"),
    (32, {"task": "pretrain-decoder"}, "model: checkpoint has .*, this run 'nothing'"),
    (32, _with(RUN_INFO, corpora={"train": "5678"}), "corpora.train: checkpoint has '1234', this run '5678'"),
])
def test_resuming_with_a_foreign_config_is_a_clear_error(finished_run, width, run_info, message):
    with pytest.raises(ValueError, match=rf"checkpoint .*step-00000004.pt .*{message}"):
        trainer(finished_run, width=width, run_info=run_info).resume()


def test_moved_data_does_not_stop_a_resume(finished_run):
    moved = _with(RUN_INFO, data={"train": "/elsewhere/train"})
    assert trainer(finished_run, run_info=moved).resume()


def test_resuming_with_other_settings_is_refused_naming_each(finished_run):
    with pytest.raises(ValueError, match=r"step-00000004.pt was trained with other settings \(batch_size: checkpoint "
                                         r"has 4, this run 8; lr: checkpoint has 0.03, this run 0.0005\): resume with "
                                         "the settings the run was started with .*only max_steps, patience, eval_interval"):
        trainer(finished_run, lr=5e-4, batch_size=8).resume()
    # Another layout is no other run (a checkpoint fits any), as long as a step takes the same micro-batches.
    with pytest.raises(ValueError, match=r"\(grad_accum \* world_size: checkpoint has 1, this run 2\)"):
        trainer(finished_run, grad_accum=2).resume()
    assert trainer(finished_run, fsdp=True, max_steps=5).resume()


def test_a_resume_may_extend_the_run_and_the_lr_follows_the_longer_schedule(finished_run):
    resumed = trainer(finished_run, max_steps=8, checkpoint_interval=4, eval_interval=2)
    assert resumed.resume() and resumed.step == 4

    def lr_before_step(step: int) -> float:  # the lr of 0-based optimizer step `step` in a run of 8 steps
        return 3e-2 * lr_multiplier(step, warmup_steps=2, max_steps=8, schedule="cosine", min_lr_ratio=0.1)

    # The checkpoint's own schedule had reached its floor (0.003) at step 4 of 4.
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr_before_step(4))
    resumed.fit()
    logged = {record["step"]: record["lr"] for record in read_records(finished_run / "metrics.jsonl", "train")}
    assert [logged[step] for step in (5, 6, 7, 8)] == pytest.approx([lr_before_step(step) for step in (5, 6, 7, 8)])
    saved = json.loads((finished_run / "config.json").read_text())["train"]
    assert (saved["max_steps"], saved["checkpoint_interval"], saved["eval_interval"]) == (8, 4, 2)
    assert load_checkpoint(finished_run / "checkpoints" / "step-00000008.pt")["config"]["max_steps"] == 8


def test_what_a_checkpoint_does_not_record_counts_as_added_since(finished_run):
    path = finished_run / "checkpoints" / "step-00000004.pt"
    state = load_checkpoint(path)
    del state["config"]["mask_prob"], state["run_info"]["corpora"]  # as written before fastlm had them
    torch.save(state, path)
    assert trainer(finished_run).resume()  # mask_prob at its default, corpora not compared
    with pytest.raises(ValueError, match="mask_prob: checkpoint has 0.4, this run 0.3"):
        trainer(finished_run, mask_prob=0.3).resume()


def test_a_checkpoint_of_an_older_format_is_refused(finished_run):
    path = finished_run / "checkpoints" / "step-00000004.pt"
    state = load_checkpoint(path)
    state["version"] = 1
    torch.save(state, path)
    with pytest.raises(ValueError, match="format 'fastlm-checkpoint' version 1, expected 'fastlm-checkpoint' "
                                         "version 2"):
        trainer(finished_run).resume()


class Payload:
    """A pickle that runs code when loaded: writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_checkpoint_carrying_a_pickled_payload_is_never_executed(finished_run):
    marker = finished_run / "pwned"
    path = finished_run / "checkpoints" / "step-00000004.pt"
    state = load_checkpoint(path)
    state["run_info"] = {**state["run_info"], "note": Payload(marker)}
    torch.save(state, path)
    with pytest.raises(ValueError, match="step-00000004.pt' cannot be read: .*Weights only load failed"):
        trainer(finished_run).resume()
    assert not marker.exists(), "the payload ran"
    torch.load(path, weights_only=False)  # the file does carry it (the test can fail)
    assert marker.read_text() == "pwned"


class FullDiskAt:
    """A torch.save for the checkpoint module that fails with ENOSPC half-way through the `call`-th checkpoint."""

    def __init__(self, call: int):
        self.call, self.calls = call, 0
        self.real_save = torch.save

    def __call__(self, payload, file):
        self.calls += 1
        if self.calls == self.call:
            file.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real_save(payload, file)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(record["step"], record["loss"]) for record in read_records(run_dir / "metrics.jsonl", "train")]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    overrides = dict(max_steps=8, checkpoint_interval=2)
    straight = trainer(tmp_path / "straight", **overrides)
    straight.fit()

    run_dir = tmp_path / "full"
    monkeypatch.setattr(checkpoint_module.torch, "save", FullDiskAt(call=2))  # the step-4 checkpoint
    with pytest.raises(OSError, match=r"writing checkpoint .*step-00000004.pt failed \(No space left on device\); "
                                      "the earlier checkpoints are intact"):
        trainer(run_dir, **overrides).fit()
    monkeypatch.undo()  # space freed
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "step-00000002.pt")["step"] == 2

    resumed = trainer(run_dir, **overrides)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    assert train_losses(run_dir) == train_losses(tmp_path / "straight")
    final = [load_checkpoint(run / "checkpoints" / "step-00000008.pt")["model"] for run in (tmp_path / "straight",
                                                                                            run_dir)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
