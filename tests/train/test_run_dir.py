"""A run directory is never silently reused, and a signalled run stops cleanly: the Trainer's side of both (the
`fastlm` command's side is in tests/test_cli.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastlm.train import TrainConfig, Trainer, TrainingInterrupted, World, distributed
from fastlm.train.metrics import read_records
from fastlm.train.run_dir import RunDirectoryInUse, refuse_or_clear

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import (  # noqa: E402
    TOY_SCRIPT, children_of, run_toy, stop_with_children, subprocess_env, toy_config, train_losses,
)
from toy_training import ToyBatches, ToyLM  # noqa: E402


def toy_trainer(run_dir: Path, config: TrainConfig, **options) -> Trainer:
    return Trainer(ToyLM(), ToyBatches(), config, run_dir, **options)


def test_fit_refuses_an_earlier_run_and_overwrite_replaces_only_its_files(tmp_path):
    toy_trainer(tmp_path, toy_config(max_steps=4, checkpoint_interval=2, eval_interval=0)).fit()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints" / "keep.txt").write_text("mine too")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}

    with pytest.raises(RunDirectoryInUse, match="holds an earlier run .*--resume.*--overwrite"):
        toy_trainer(tmp_path, toy_config(max_steps=2)).fit()
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before

    toy_trainer(tmp_path, toy_config(max_steps=3, checkpoint_interval=10, eval_interval=0), overwrite=True).fit()
    assert [step for step, _ in train_losses(tmp_path)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "keep.txt", "step-00000003.pt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tensorboard_event_files_are_the_run_s_and_go_with_an_overwrite(tmp_path):
    events = tmp_path / "events.out.tfevents.1700000000.host.123.0"
    events.write_bytes(b"")
    (tmp_path / "events.txt").write_text("mine")
    with pytest.raises(RunDirectoryInUse, match="events.out.tfevents"):
        refuse_or_clear(tmp_path, overwrite=False)
    refuse_or_clear(tmp_path, overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["events.txt"]


def test_a_run_that_failed_before_its_first_step_is_no_earlier_run(tmp_path):
    class NoData(ToyBatches):
        def num_batches(self, epoch):
            return 0

    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        Trainer(ToyLM(), NoData(), toy_config(), tmp_path).fit()
    assert [path.name for path in tmp_path.iterdir()] == ["config.json"]
    toy_trainer(tmp_path, toy_config(max_steps=2, eval_interval=0)).fit()
    assert [step for step, _ in train_losses(tmp_path)] == [1, 2]


def test_a_resumed_trainer_continues_the_run_in_its_directory(tmp_path):
    toy_trainer(tmp_path, toy_config(max_steps=4, checkpoint_interval=2, eval_interval=0)).fit()
    resumed = toy_trainer(tmp_path, toy_config(max_steps=6, checkpoint_interval=2, eval_interval=0))
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    assert [step for step, _ in train_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


class SignalledLM(ToyLM):
    """Raises `signals` during its `at`-th forward, in the main thread as a real signal would be handled: in the
    middle of step `at` (no evaluation runs before it). Batches are built ahead by the prefetcher's thread, so the
    batch source is no place to raise them."""

    def __init__(self, at: int, *signals: int):
        super().__init__()
        self.calls, self.at, self.signals = 0, at, signals

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            for number in self.signals:
                signal.raise_signal(number)
        return super().forward(*args, **kwargs)


def test_a_signal_ends_the_step_writes_a_checkpoint_and_raises(tmp_path):
    config = toy_config(max_steps=20, checkpoint_interval=10, eval_interval=0)
    trainer = Trainer(SignalledLM(3, signal.SIGTERM), ToyBatches(), config, tmp_path)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3") as stopped:
        trainer.fit()
    assert stopped.value.signal_number == signal.SIGTERM and stopped.value.step == 3
    assert (tmp_path / "checkpoints" / "step-00000003.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_a_second_sigint_aborts_at_once(tmp_path):
    config = toy_config(max_steps=20, eval_interval=0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(SignalledLM(2, signal.SIGINT, signal.SIGINT), ToyBatches(), config, tmp_path).fit()
    assert not (tmp_path / "checkpoints").exists()


def test_a_signal_handled_during_the_stop_all_reduce_waits_for_the_next_check(tmp_path, monkeypatch):
    """The race of a 2-process run, made deterministic: this rank's SIGTERM is handled right after the stop flag's
    all-reduce has summed the flags of both ranks, none set. The other rank, deciding from that sum, trains on, so
    this one must too: stopping alone, it would wait in save_checkpoint's collectives while the other waits in the
    next step's, forever."""
    trainer = toy_trainer(tmp_path, toy_config())
    trainer.world = World(1, 2, torch.device("cpu"))  # seen by _stop_requested only, whose collective is simulated
    calls = []

    def all_reduce_then_signal(tensor, world):  # the other rank adds zeros: the sum is this rank's snapshot
        calls.append(tensor.tolist())
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_then_signal)
    with trainer._stop_on_signals():
        assert not trainer._stop_requested()
        assert trainer._stop_requested() and trainer.stop_signal == signal.SIGTERM  # the next step, on both ranks
    assert calls == [[0.0, 0.0], [0.0, 1.0]]


def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step(tmp_path):
    run = tmp_path / "ddp"
    args = ("--checkpoint_interval", "100", "--eval_interval", "100", "--delay", "0.02")
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    agent = subprocess.Popen([sys.executable, *launcher, str(TOY_SCRIPT), str(run), *args, "--max_steps", "400"],
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and len(read_records(run / "metrics.jsonl", "train")) >= 2):
            assert agent.poll() is None, agent.communicate()[1]
            assert time.monotonic() < deadline, "the two ranks never trained two steps"
            time.sleep(0.05)
        ranks = {_rank_of(pid): pid for pid in children_of(agent.pid)}
        os.kill(ranks[1], signal.SIGTERM)  # rank 1 only: rank 0 learns it by the all-reduce
        _, stderr = agent.communicate(timeout=240)  # a rank left waiting in a collective would hang here
    finally:
        stop_with_children(agent)

    steps = [step for step, _ in train_losses(run)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < 400
    assert (run / "checkpoints" / f"step-{steps[-1]:08d}.pt").is_file()
    assert f"stopped by SIGTERM after step {steps[-1]}," in stderr
    run_toy(run, *args, "--max_steps", str(steps[-1] + 2), "--resume",
            launcher=launcher)  # the checkpoint both ranks wrote resumes under the same world size
    assert [step for step, _ in train_losses(run)] == list(range(1, steps[-1] + 3))


def _rank_of(pid: int) -> int:
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(item for item in environment if item.startswith(b"RANK="))[5:])
