"""The training loop on a toy model: learning, the non-finite guard, exact resume after SIGKILL, and DDP on
2 gloo processes matching one process with the same global batch."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastlm.train import TrainConfig, Trainer, TrainingDiverged, load_checkpoint
from fastlm.train import precision as precision_module
from fastlm.train.metrics import read_records

sys.path.insert(0, str(Path(__file__).parent))
import token_weighting  # noqa: E402
from toy_training import ToyBatches, ToyLM  # noqa: E402

TOY_SCRIPT = Path(__file__).parent / "toy_training.py"
REPO = Path(__file__).resolve().parents[2]


def toy_config(**overrides) -> TrainConfig:
    values = dict(progress=False, warmup_steps=5, max_steps=30, batch_size=4, eval_interval=10, eval_batches=4,
                  checkpoint_interval=10, lr=3e-2)
    return TrainConfig(**{**values, **overrides})


def subprocess_env() -> dict:
    # One thread per process: the CI box has 2 cores and the DDP test runs 2 processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_records(run_dir / "metrics.jsonl", "train")]


def test_toy_model_learns_and_the_run_directory_is_complete(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(ToyLM(), ToyBatches(), toy_config(), tmp_path, valid_batches=ToyBatches(num_batches=4, seed=9),
                      run_info={"model": {"name": "toy"}})
    first = trainer.evaluate()["loss"]
    final = trainer.fit()
    assert final["loss"] < 0.5 * first and final["accuracy"] > 0.5
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["lr"] == 3e-2 and saved["model"] == {"name": "toy"}
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl", "eval")] == [10, 20, 30]
    assert trainer.checkpoints.latest().name == "step-00000030.pt"
    assert load_checkpoint(trainer.checkpoints.best)["step"] == 30


def test_without_validation_data_fit_returns_the_last_train_loss(tmp_path):
    final = Trainer(ToyLM(), ToyBatches(), toy_config(max_steps=3), tmp_path).fit()
    assert final == {"train_loss": train_losses(tmp_path)[-1][1]}


@pytest.mark.parametrize("native_bf16", [False, True])
def test_precision_auto_trains_in_bf16_where_the_hardware_has_it(tmp_path, monkeypatch, native_bf16):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native_bf16)
    for precision, bf16 in (("auto", native_bf16), ("bf16", True), ("fp32", False)):
        trainer = Trainer(ToyLM(), ToyBatches(), toy_config(precision=precision), tmp_path / precision)
        with trainer.autocast():
            assert torch.is_autocast_enabled("cpu") is bf16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert precision_module.trains_in_bf16("auto", torch.device("cuda"))


def test_resuming_a_finished_run_trains_no_more_and_reports_its_evaluation(tmp_path):
    torch.manual_seed(0)
    config = toy_config(max_steps=10)
    finished = Trainer(ToyLM(), ToyBatches(), config, tmp_path, valid_batches=ToyBatches(num_batches=4, seed=9))
    final = finished.fit()
    resumed = Trainer(ToyLM(), ToyBatches(), config, tmp_path, valid_batches=ToyBatches(num_batches=4, seed=9))
    assert resumed.resume() and resumed.step == 10
    assert resumed.fit() == pytest.approx(final)
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl", "train")] == list(range(1, 11))


def test_fit_trains_on_prefetched_batches_exactly_as_steps_built_in_the_loop(tmp_path):
    # 7 micro-batches per epoch, 3 per step: each epoch skips its last one, so the look-ahead crosses epochs.
    config = toy_config(max_steps=7, grad_accum=3, eval_interval=0, checkpoint_interval=100)
    runs = {}
    for name in ("prefetched", "in_the_loop"):
        torch.manual_seed(0)
        trainer = Trainer(ToyLM(), ToyBatches(num_batches=7), config, tmp_path / name)
        if name == "prefetched":
            trainer.fit()
            losses = [loss for _, loss in train_losses(tmp_path / name)]
        else:
            losses = [trainer.train_step()[0] for _ in range(config.max_steps)]
        runs[name] = losses, trainer.model.state_dict(), (trainer.epoch, trainer.index)
    (losses, weights, position), (expected_losses, expected_weights, expected_position) = runs.values()
    assert losses == expected_losses and position == expected_position == (3, 3)
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    assert not [thread for thread in threading.enumerate() if thread.name == "fastlm-prefetch"]


class BrokenBatches(ToyBatches):
    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        if index == 5:
            raise ValueError(f"shard of batch {index} is corrupt")
        return super().batch(epoch, index)


def test_an_error_building_a_batch_stops_fit_with_that_error_and_no_thread_left(tmp_path):
    trainer = Trainer(ToyLM(), BrokenBatches(), toy_config(max_steps=10, eval_interval=0), tmp_path)
    with pytest.raises(ValueError, match="shard of batch 5 is corrupt"):
        trainer.fit()
    assert trainer.step == 5
    assert not [thread for thread in threading.enumerate() if thread.name == "fastlm-prefetch"]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    torch.manual_seed(0)
    config = toy_config(max_steps=6, eval_interval=0, checkpoint_interval=3)
    Trainer(ToyLM(), ToyBatches(), config, tmp_path).fit()
    metrics = tmp_path / "metrics.jsonl"
    # A kill in the middle of a write leaves part of a line without its newline.
    metrics.write_text(metrics.read_text() + '{"kind": "train", "step": 7, "lo', encoding="utf-8")
    resumed = Trainer(ToyLM(), ToyBatches(), config, tmp_path)
    with pytest.warns(UserWarning, match="incomplete last record"):
        assert resumed.resume()
    assert [r["step"] for r in read_records(metrics, "train")] == list(range(1, 7))
    metrics.write_text(metrics.read_text().replace('"step": 2', '"step": 2,,', 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics record"):
        read_records(metrics)  # a damaged complete line is not a torn write: still an error


class PoisonLoss:
    """A forward hook that turns the loss into NaN on the forward calls listed (0-based)."""

    def __init__(self, calls):
        self.calls, self.count = set(calls), 0

    def __call__(self, module, args, kwargs, output):
        poisoned = self.count in self.calls
        self.count += 1
        if poisoned:
            output.loss = output.loss * float("nan")
        return output


def test_a_nan_loss_skips_the_step_and_leaves_the_weights_untouched(tmp_path):
    torch.manual_seed(0)
    model = ToyLM()
    trainer = Trainer(model, ToyBatches(), toy_config(max_steps=6, eval_interval=0, max_bad_steps=3), tmp_path)
    model.register_forward_hook(PoisonLoss({2, 3}), with_kwargs=True)
    trainer.train_step(), trainer.train_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _, _ = trainer.train_step()
    assert math.isnan(loss) and trainer.step == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.fit()
    skips = read_records(tmp_path / "metrics.jsonl", "skip")
    assert [r["consecutive"] for r in skips] == [1]  # the step above was run by hand, not by fit
    assert trainer.step == 6


def test_consecutive_nans_stop_the_run_with_the_last_good_checkpoint_intact(tmp_path):
    torch.manual_seed(0)
    model = ToyLM()
    trainer = Trainer(model, ToyBatches(), toy_config(max_steps=20, checkpoint_interval=4, eval_interval=0,
                                                      max_bad_steps=3), tmp_path)
    model.register_forward_hook(PoisonLoss(range(6, 100)), with_kwargs=True)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps .*step-00000004.pt"):
        trainer.fit()
    good = load_checkpoint(tmp_path / "checkpoints" / "step-00000004.pt")
    assert good["step"] == 4 and all(torch.isfinite(v).all() for v in good["model"].values())
    assert [r["consecutive"] for r in read_records(tmp_path / "metrics.jsonl", "skip")] == [1, 2, 3]


class SmoothingRecorder(ToyLM):
    """Records (training mode, label_smoothing) of every forward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, *args, label_smoothing=0.0, **kwargs):
        self.calls.append((self.training, label_smoothing))
        return super().forward(*args, label_smoothing=label_smoothing, **kwargs)


def test_label_smoothing_reaches_the_training_steps_and_never_the_validation(tmp_path):
    model = SmoothingRecorder()
    config = toy_config(max_steps=4, eval_interval=2, label_smoothing=0.3)
    Trainer(model, ToyBatches(), config, tmp_path, valid_batches=ToyBatches(num_batches=2, seed=9)).fit()
    assert [smoothing for training, smoothing in model.calls if training] == [0.3] * 4
    assert [smoothing for training, smoothing in model.calls if not training] == [0.0] * 4  # 2 evaluations


def run_toy(run_dir: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, str(TOY_SCRIPT), str(run_dir), *args]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        stop_with_children(process)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, stdout, stderr)
    return subprocess.CompletedProcess(command, 0, stdout, stderr)


def stop_with_children(process: subprocess.Popen) -> None:
    """SIGKILL `process` and its children if it still runs (a test that failed or timed out), so that no run is
    left behind. torchrun starts each rank in a session of its own: killing the launcher's process group would
    miss them, so they are found by their parent. A process that ended is left alone: its pid may be reused."""
    if process.poll() is None:
        for pid in children_of(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
    process.communicate()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:  # a process that ended while we looked
            continue
        if f"\nPPid:\t{pid}\n" in status:
            found.append(int(entry.name))
    return found


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    args = ("--max_steps", "40", "--checkpoint_interval", "10", "--delay", "0.02")
    run_toy(tmp_path / "straight", *args)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(TOY_SCRIPT), str(interrupted), *args], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (interrupted / "checkpoints" / "step-00000020.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never wrote its step-20 checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(step for step, _ in train_losses(interrupted))
    assert killed_at < 40, "the run finished before it was killed: nothing was resumed"

    run_toy(interrupted, *args, "--resume")
    assert train_losses(interrupted) == train_losses(tmp_path / "straight")  # bit for bit, dropout included
    straight = torch.load(tmp_path / "straight" / "model" / "toy.pt")
    resumed = torch.load(interrupted / "model" / "toy.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, sharding):
    common = ("--max_steps", "8", "--dropout", "0", "--eval_interval", "4")
    run_toy(tmp_path / "single", *common, "--grad_accum", "2")
    run_toy(tmp_path / "ddp", *common, "--fsdp", str(sharding == "fsdp"),
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert [s for s, _ in ddp] == list(range(1, 9))
    assert [loss for _, loss in ddp] == pytest.approx([loss for _, loss in single], rel=1e-5)
    evals = [read_records(tmp_path / run / "metrics.jsonl", "eval") for run in ("single", "ddp")]
    assert [r["loss"] for r in evals[1]] == pytest.approx([r["loss"] for r in evals[0]], rel=1e-5)
    weights = [torch.load(tmp_path / run / "model" / "toy.pt") for run in ("single", "ddp")]
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6) for k in weights[0])


class RandomCausalBatches:
    """Packed causal-LM batches of random ids, a pure function of (epoch, index) like the real sources."""

    def __init__(self, vocab_size: int, batch_size: int = 4, block_len: int = 32, num_batches: int = 8):
        self.vocab_size, self.batch_size, self.block_len, self.count = vocab_size, batch_size, block_len, num_batches

    def num_batches(self, epoch: int) -> int:
        return self.count

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(epoch * 1000 + index)
        ids = torch.randint(0, self.vocab_size, (self.batch_size, self.block_len), generator=generator)
        return {"input_ids": ids, "labels": ids.clone(), "lengths": torch.full((self.batch_size,), self.block_len)}


def test_compiled_training_matches_eager_and_saves_the_plain_model(tmp_path):
    # torch.compile around the model: fastlm's kernels are custom ops, so the graph holds them whole; the losses
    # must be the eager ones, and checkpoints must hold the model's own parameter names (no compile wrapper).
    from fastlm.models import DecoderLM, ModelConfig

    config = ModelConfig.preset("tiny", vocab_size=512, n_layers=2, dropout=0.0)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        run_dir = tmp_path / ("compiled" if compiled else "eager")
        trainer = Trainer(DecoderLM(config), RandomCausalBatches(config.vocab_size),
                          toy_config(max_steps=3, eval_interval=0, checkpoint_interval=3, lr=1e-3, compile=compiled),
                          run_dir)
        trainer.fit()
        losses[compiled] = [loss for _, loss in train_losses(run_dir)]
        saved = load_checkpoint(trainer.checkpoints.latest())
        assert set(saved["model"]) == set(DecoderLM(config).state_dict())
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize("task", token_weighting.TASKS)
def test_accumulated_micro_batches_weigh_every_target_alike(task):
    # Four micro-batches of 3 to 57 targets: the step's gradient and loss are those of one batch holding all of
    # them (a mean of micro-batch means would weigh the 3 targets as much as the 57).
    world = token_weighting.World(0, 1, torch.device("cpu"))
    accumulated = token_weighting.step_gradients(task, token_weighting.VaryingBatches(task), 4, world)
    merged = token_weighting.step_gradients(
        task, token_weighting.MergedBatches(token_weighting.VaryingBatches(task)), 1, world)
    assert accumulated.keys() == merged.keys()
    for name in merged:
        torch.testing.assert_close(accumulated[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_gloo_processes_weigh_targets_as_one_process(tmp_path):
    # 2 ranks x 2 micro-batches = 1 process x 4: the gradients are those of the same global step, for every task.
    script = str(Path(token_weighting.__file__))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                    str(tmp_path / "ddp.pt"), "--grad_accum", "2"],
                   env=subprocess_env(), capture_output=True, text=True, timeout=240, check=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    world = token_weighting.World(0, 1, torch.device("cpu"))
    for task in token_weighting.TASKS:
        single = token_weighting.step_gradients(task, token_weighting.VaryingBatches(task), 4, world)
        for name in single:
            torch.testing.assert_close(ddp[task][name], single[name], rtol=1e-5, atol=1e-6, msg=f"{task} {name}")
