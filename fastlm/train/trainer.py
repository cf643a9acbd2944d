"""The training loop: gradient accumulation, clipping, the non-finite guard, evaluation, checkpoints, resume.

Data comes from a batch source (`num_batches(epoch)`, `batch(epoch, index)`, deterministic from its seed), so the
whole data position is two integers. An optimizer step uses the global micro-batch indices
`index .. index + grad_accum * world_size - 1`; rank r takes those congruent to r modulo the world size, which makes
W processes with accumulation A compute the same step as one process with accumulation A * W.

Resuming on another world size (checkpoints are unsharded, keyed by parameter names): weights, optimizer and
scheduler state and the data position are exact, so the next step starts at the very micro-batch where the run
stopped and no batch is skipped or seen twice; grad_accum * world_size must stay (the resume checks it), so the
global batch stays. Not exact: which rank takes which micro-batch, and the dropout streams: ranks present in both
layouts continue their own, new ranks start fresh ones (seeded from seed, rank and step), and the streams of ranks
that are gone end.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from fastlm.data.prefetch import Prefetcher
from fastlm.train import distributed
from fastlm.train.checkpoint import (
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointDir, capture_rng_state, check_resumable, load_checkpoint,
    restore_rank_rng_state, seed_everything,
)
from fastlm.train.config import TrainConfig
from fastlm.train.distributed import World
from fastlm.train.evaluation import evaluate_loss, to_device
from fastlm.train.metrics import MetricsLog, ProgressBar, TensorBoardLog
from fastlm.train.optim import build_optimizer, build_scheduler
from fastlm.train.precision import autocast_for
from fastlm.train.run_dir import refuse_or_clear
from fastlm.train.selection import Selection


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after a whole step, with a checkpoint of that step to resume from."""

    def __init__(self, signal_number: int, step: int, run_dir: Path):
        self.signal_number, self.step = signal_number, step
        super().__init__(f"stopped by {signal.Signals(signal_number).name} after step {step}, checkpoint written "
                         f"to {run_dir / 'checkpoints'}")


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (unpadded) tokens in a batch: the sum of its *lengths tensors, else the size of its first tensor."""
    lengths = [value for key, value in batch.items() if key.endswith("lengths")]
    if lengths:
        return int(sum(int(value.sum()) for value in lengths))
    return next(iter(batch.values())).numel()


class Trainer:
    """Trains `model` on `train_batches` as `config` says, writing metrics and checkpoints under `run_dir`.

    `model` must return an output with `.loss` (the mean over its targets), `.accuracy` and `.n_targets` (how many
    targets that mean is over) from `model(**batch)` (validation: plain cross-entropy) and from
    `model(**batch, label_smoothing=config.label_smoothing)` (training steps: the objective, logged as "loss" of the
    train records), and offer
    `configure_optimizers(weight_decay, lr, betas, fused)`. `extra_eval(model) -> dict` adds metrics at each
    evaluation (BLEU for translation; run on rank 0 only, so not with FSDP). Each evaluation covers every batch of
    `valid_batches`: the source serves what is to be evaluated (the whole split, or a fixed sample). `run_info`
    (e.g. the model config) is stored with the config in `config.json` and in every checkpoint.

    best.pt is the checkpoint of the best evaluation by `config.select_by` (the last one without validation data),
    and `export_model` writes its weights; `config.patience` evaluations without a better value end `fit` early.

    `fit` refuses a `run_dir` that holds an earlier run unless `resume()` restored it or `overwrite=True` (which
    removes that run's files). SIGINT or SIGTERM during `fit` ends the current step, writes a checkpoint and raises
    TrainingInterrupted; a second SIGINT aborts at once.
    """

    def __init__(self, model: nn.Module, train_batches, config: TrainConfig, run_dir: str | Path, *,
                 valid_batches=None, extra_eval: Callable[[nn.Module], dict] | None = None,
                 world: World | None = None, run_info: dict | None = None, overwrite: bool = False):
        self.config = config
        self.world = world if world is not None else World(0, 1, torch.device("cpu"))
        self.train_batches = train_batches
        self.valid_batches = valid_batches
        self.extra_eval = extra_eval
        self.run_dir = Path(run_dir)
        self.run_info = run_info or {}
        self.overwrite = overwrite
        if config.fsdp and extra_eval is not None and self.world.is_distributed:
            raise ValueError("extra_eval needs the whole model on one rank: it cannot run with fsdp=True")
        # Whether evaluations measure the metric that selects best.pt: the loss needs validation batches, BLEU the
        # extra_eval of translation.
        self.selects = (valid_batches if config.select_by == "loss" else extra_eval) is not None
        if config.select_by == "bleu" and not self.selects:
            raise ValueError("select_by='bleu' needs an evaluation that reports BLEU: fastlm finetune with --valid "
                             "and --bleu-sentences > 0")
        if config.patience and not self.selects:
            raise ValueError(f"patience={config.patience} needs validation data to measure select_by="
                             f"{config.select_by!r} on (--valid)")

        # Dropout streams differ per rank (each sees different data) but are reproducible from the seed.
        seed_everything(config.seed + self.world.rank)

        self.model = model.to(self.world.device)
        self.wrapped = distributed.wrap_model(self.model, self.world, fsdp=config.fsdp)
        self.forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", config.keep_last)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.world.is_main)
        self.curves = TensorBoardLog(self.run_dir, enabled=self.world.is_main)

        self.step = 0  # optimizer steps taken
        self.epoch = 0  # data position: the next step starts at global micro-batch `index` of `epoch`
        self.index = 0
        self.selection = Selection(config.select_by)
        self.bad_steps = 0  # consecutive non-finite steps
        self._prefetcher: Prefetcher | None = None  # builds the coming micro-batches while fit runs
        self.resumed = False
        self.checkpointed_step: int | None = None  # kept in memory: every rank must agree on it without the disk
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM during fit

    # ----- setup helpers -----

    def _open_run(self) -> None:
        """Refuse (or, with overwrite, clear) an earlier run in the directory, then record this run's config."""
        if not self.resumed:
            # Rank 0 looks; its refusal is raised on every rank, so none waits in a collective forever.
            distributed.run_on_main(self.world, lambda: refuse_or_clear(self.run_dir, overwrite=self.overwrite))
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._save_run_config()
        distributed.barrier(self.world)

    def _save_run_config(self) -> None:
        record = {"train": self.config.to_dict(), **self.run_info, "world_size": self.world.world_size}
        (self.run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        self.curves.config = record

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.world.device, self.config.precision)

    @property
    def micro_batches_per_step(self) -> int:
        return self.config.grad_accum * self.world.world_size

    # ----- checkpoints -----

    def save_checkpoint(self, *, is_best: bool) -> Path:
        """Every rank must call this (FSDP gathers shards, RNG states are gathered); rank 0 writes, and a failed
        write (a full disk) raises on every rank."""
        model_state, optimizer_state = distributed.full_state_dicts(self.wrapped, self.optimizer)
        rng_states = distributed.all_gather_objects(capture_rng_state(), self.world)

        def write_on_main() -> Path:
            payload = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "step": self.step, "epoch": self.epoch, "index": self.index,
                "selection": self.selection.to_dict(), "bad_steps": self.bad_steps,
                "model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "rng": rng_states, "world_size": self.world.world_size,
                "config": self.config.to_dict(), "run_info": self.run_info,
            }
            return self.checkpoints.save(payload, self.step, is_best=is_best)

        path = distributed.run_on_main(self.world, write_on_main)
        self.curves.flush()  # a run resumed from this checkpoint finds every curve up to it on disk
        self.checkpointed_step = self.step
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore everything from `path` (default: the latest checkpoint of the run); False if there is none.

        Any world size (see the module docstring). Rank 0 alone reads and checks the file (a checkpoint of another
        run is a ValueError on every rank) and broadcasts the weights and optimizer state."""
        tensors: dict = {}

        def read_on_main() -> dict | None:
            chosen = Path(path) if path is not None else self.checkpoints.latest()
            if chosen is None:
                return None
            state = load_checkpoint(chosen)
            check_resumable(state, chosen, run_info=self.run_info, model=self.model, config=self.config,
                            world_size=self.world.world_size)
            state["selection"] = Selection.from_checkpoint(state, chosen, self.config.select_by).to_dict()
            tensors["model"], tensors["optimizer"] = state.pop("model"), state.pop("optimizer")
            return state

        state = distributed.run_on_main(self.world, read_on_main)
        if state is None:
            return False
        distributed.load_full_state_dicts(self.wrapped, self.optimizer, tensors.get("model", {}),
                                          tensors.get("optimizer", {}))
        self.scheduler.load_state_dict(state["scheduler"])
        # The lr of the coming step from this run's schedule: the saved one is that of the checkpoint's max_steps,
        # which a resume may have changed (TrainConfig.max_steps says what that means for the lr).
        for group, base_lr, multiplier in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                              self.scheduler.lr_lambdas):
            group["lr"] = base_lr * multiplier(state["step"])
        self.step, self.epoch, self.index = state["step"], state["epoch"], state["index"]
        self.selection, self.bad_steps = Selection(**state["selection"]), state["bad_steps"]
        restore_rank_rng_state(state["rng"], self.world.rank, seed=self.config.seed, step=self.step)
        self.log.truncate_after(self.step)
        self.curves.truncate_after(self.step)
        self.resumed, self.checkpointed_step = True, self.step
        return True

    # ----- the loop -----

    def _step_at(self, epoch: int, index: int) -> tuple[int, list[int], int]:
        """For the step at data position (epoch, index): its epoch, this rank's micro-batch indices, and the index
        after it. Pure, so the prefetcher can walk ahead of the data position."""
        need = self.micro_batches_per_step
        if index + need > self.train_batches.num_batches(epoch):
            epoch, index = epoch + 1, 0
            available = self.train_batches.num_batches(epoch)
            if available < need:
                raise ValueError(f"the training data gives {available} micro-batches per epoch, fewer than one "
                                 f"optimizer step needs (grad_accum * world_size = {need})")
        return epoch, list(range(index + self.world.rank, index + need, self.world.world_size)), index + need

    def _next_indices(self) -> tuple[int, list[int]]:
        """The epoch and this rank's micro-batch indices for the next step; advances the data position."""
        self.epoch, indices, self.index = self._step_at(self.epoch, self.index)
        return self.epoch, indices

    def _batches_from(self, epoch: int, index: int) -> Iterator[tuple[int, int]]:
        """(epoch, index) of this rank's micro-batches from data position (epoch, index) on, in training order."""
        while True:
            epoch, indices, index = self._step_at(epoch, index)
            yield from ((epoch, i) for i in indices)

    @contextlib.contextmanager
    def _prefetching(self) -> Iterator[None]:
        """Build the coming micro-batches in a background thread (pinned for CUDA) while the model trains; the
        micro-batches of one step wait ready, at least two."""
        self._prefetcher = Prefetcher(lambda key: self.train_batches.batch(*key),
                                      self._batches_from(self.epoch, self.index),
                                      depth=max(2, self.config.grad_accum), pin_memory=self.world.device.type == "cuda")
        try:
            yield
        finally:
            self._prefetcher.close()
            self._prefetcher = None

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches per rank: (loss, grad norm, tokens) over all ranks.

        The step's loss is the sum of the per-token losses of all its micro-batches on all ranks divided by their
        total target count, as in validation: every target weighs the same however targets fall into micro-batches
        (a mean of micro-batch means would weigh a micro-batch of 3 MLM targets as much as one of 300). Each
        micro-batch back-propagates its summed loss; the gradients are divided once the count is all-reduced.
        A non-finite loss or gradient norm leaves the weights untouched (no optimizer or scheduler step)."""
        epoch, indices = self._next_indices()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64, device=self.world.device)  # summed loss, targets
        tokens = 0
        for position, index in enumerate(indices):
            batch = (self._prefetcher.get((epoch, index)) if self._prefetcher is not None
                     else self.train_batches.batch(epoch, index))
            tokens += count_tokens(batch)
            last = position == len(indices) - 1
            with distributed.gradient_sync(self.wrapped, enabled=last):
                with self.autocast():
                    out = self.forward(**to_device(batch, self.world.device),
                                       label_smoothing=self.config.label_smoothing)
                summed_loss = out.loss * out.n_targets
                summed_loss.backward()
            sums += torch.stack([summed_loss.detach().double(), out.n_targets.double()])
        # One reduction for loss, targets and tokens. The guard must read loss and gradient norm on the host: those
        # two reads are the step's only synchronisations.
        stats = torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64, device=sums.device)])
        distributed.all_reduce_sum(stats, self.world)
        targets = stats[1].clamp_min(1)  # a step without targets has loss 0 and zero gradients
        # DDP and FSDP average the ranks' gradients: world_size / targets turns that average of sums into the mean
        # over every target of the step.
        scale = (self.world.world_size / targets).float()
        for parameter in self.model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        loss = (stats[0] / targets).item()
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        return loss, grad_norm, int(stats[2].item())

    def evaluate(self) -> dict:
        metrics = {}
        if self.valid_batches is not None:
            metrics = evaluate_loss(self.wrapped, self.valid_batches, world=self.world, autocast=self.autocast)
        if self.extra_eval is not None and self.world.is_main:
            was_training = self.model.training
            self.model.eval()
            # Generation (BLEU) on the CPU took 1.4-1.6x as long under bf16 autocast as in fp32: its many small
            # steps spend more on casts than their matmuls gain.
            generating = self.autocast() if self.world.device.type == "cuda" else contextlib.nullcontext()
            with torch.no_grad(), generating:
                metrics.update(self.extra_eval(self.model))
            self.model.train(was_training)
        return metrics

    @property
    def stopped_early(self) -> bool:
        """Whether the run ended before max_steps for want of a better select_by in `patience` evaluations."""
        return self.step < self.config.max_steps and self.selection.exhausted(self.config.patience)

    def fit(self) -> dict:
        """Train until `max_steps`, or until `patience` evaluations without improvement; returns the last
        evaluation's metrics, or {"train_loss": ...} of the last step where no evaluation gives any (no validation
        data). A run resumed after it finished (or stopped early) trains no more and returns a fresh evaluation (no
        metrics without validation data)."""
        config = self.config
        if self.step >= config.max_steps or self.stopped_early:
            metrics = self.evaluate()
            metrics.pop("samples", None)
            return metrics
        with contextlib.closing(self.curves):  # writes the buffered events, also when training stops on an error
            self._open_run()
            with self._stop_on_signals(), self._prefetching():
                return self._train_to_max_steps()

    def _train_to_max_steps(self) -> dict:
        config = self.config
        self.model.train()
        progress = ProgressBar(config.max_steps, enabled=config.progress and self.world.is_main,
                               every=config.log_interval)
        last_metrics: dict = {}
        tick = time.perf_counter()
        while self.step < config.max_steps:
            if self._stop_requested():
                progress.close()
                if self.checkpointed_step != self.step:
                    self.save_checkpoint(is_best=False)
                raise TrainingInterrupted(self.stop_signal, self.step, self.run_dir)
            loss, grad_norm, tokens = self.train_step()
            now = time.perf_counter()
            tokens_per_s, tick = tokens / max(now - tick, 1e-9), now
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._handle_bad_step(loss, grad_norm, progress)
                continue
            self.bad_steps = 0
            lr = self.scheduler.get_last_lr()[0]
            self._log("train", self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                      tokens_per_s=tokens_per_s, epoch=self.epoch)
            progress.update(self.step, loss=loss, tokens_per_s=tokens_per_s)
            last_metrics = {"train_loss": loss}
            is_last = self.step == config.max_steps
            improved = False
            if is_last or (config.eval_interval and self.step % config.eval_interval == 0):
                last_metrics = self._evaluate_and_log(progress) or last_metrics
                improved = self._select(last_metrics)
            if improved or is_last or self.stopped_early or self.step % config.checkpoint_interval == 0:
                # Without validation data the newest weights are the best we know.
                self.save_checkpoint(is_best=improved or (not self.selects and is_last))
            if self.stopped_early:
                progress.message(f"stopping early after step {self.step}: no better validation {config.select_by} "
                                 f"in {config.patience} evaluations (best: {self.selection.describe()})")
                break
            tick = time.perf_counter()  # evaluation and checkpoint time is not training throughput
        progress.close()
        return last_metrics

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM (what schedulers and spot instances send) ask the loop to stop after the current
        step; a second SIGINT aborts at once. Handlers can only be set from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signal_number, frame):
            if self.stop_signal is not None and signal_number == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signal_number

        previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _stop_requested(self) -> bool:
        """Whether any rank was signalled; under torchrun all ranks agree (one all-reduce per step), so all stop
        at the same step and none waits forever in the next step's collectives."""
        # One snapshot of the flag, and the decision from the reduced value only: a signal handled after the
        # snapshot (say while the all-reduce runs) waits for the next step's check on every rank alike. Reading the
        # flag again after the collective let that rank stop alone while the others went on into the next step.
        requested = self.stop_signal
        if not self.world.is_distributed:
            return requested is not None
        signalled = torch.tensor([requested == signal.SIGINT, requested == signal.SIGTERM],
                                 dtype=torch.float32, device=self.world.device)
        distributed.all_reduce_sum(signalled, self.world)
        if not signalled.any():
            return False
        self.stop_signal = signal.SIGINT if signalled[0] > 0 else signal.SIGTERM  # the same on every rank
        return True

    def _log(self, kind: str, step: int, **values) -> None:
        self.log.write(kind, step, **values)
        self.curves.write(kind, step, **values)

    def _select(self, metrics: dict) -> bool:
        """Give this evaluation to the selection; True if it is the best so far. Rank 0 decides (BLEU exists there
        only) and every rank adopts its selection, so that all save, stop and export alike."""

        def update_on_main() -> tuple[bool, dict]:
            value = metrics.get(self.config.select_by)
            if value is None and self.selects:
                raise ValueError(f"select_by={self.config.select_by!r}: the evaluation at step {self.step} reported "
                                 f"no {self.config.select_by!r} (only {', '.join(metrics) or 'nothing'})")
            improved = value is not None and self.selection.update(value, self.step)
            return improved, self.selection.to_dict()

        improved, selection = distributed.run_on_main(self.world, update_on_main)
        self.selection = Selection(**selection)
        return improved

    def _evaluate_and_log(self, progress: ProgressBar) -> dict:
        metrics = self.evaluate()
        samples = metrics.pop("samples", None)
        if metrics:
            self._log("eval", self.step, **metrics)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            progress.message(f"eval step {self.step}: {shown}")
        for sample in samples or []:
            progress.message(f"  {sample}")
        return metrics

    def _handle_bad_step(self, loss: float, grad_norm: float, progress: ProgressBar) -> None:
        self.bad_steps += 1
        self._log("skip", self.step, loss=loss, grad_norm=grad_norm, consecutive=self.bad_steps)
        progress.message(f"step {self.step + 1}: non-finite loss {loss} or gradient norm {grad_norm}; "
                         f"step skipped ({self.bad_steps}/{self.config.max_bad_steps} in a row)")
        if self.bad_steps >= self.config.max_bad_steps:
            latest = self.checkpoints.latest()
            where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training stopped after {self.bad_steps} consecutive non-finite steps (after step {self.step}); "
                f"{where}. Lower lr, raise warmup_steps or check the data.")

    def export_model(self, directory: str | Path, metadata: dict | None = None) -> str:
        """Write the selected weights, best.pt's (the last step's where the run has no best.pt), with the model's
        own `save` (what `finetune` and `translate` load), and `metadata` in its config.json together with which
        weights they are: "step", and "selected_by" (select_by, or "last"). Returns that in words.

        Weights other than the live ones, and under FSDP the gathered shards, go into a plain copy of the model
        (built from its `config_dict`) on rank 0."""
        best: dict = {}

        def read_best_on_main() -> int | None:
            if not self.checkpoints.best.is_file():
                return None
            best.update(load_checkpoint(self.checkpoints.best))
            return best["step"]

        best_step = distributed.run_on_main(self.world, read_best_on_main)
        state = best.get("model")  # rank 0 only
        if best_step in (None, self.step):  # the live weights
            state = None
            if self.config.fsdp and self.world.is_distributed:
                state = distributed.full_model_state_dict(self.wrapped, fsdp=True)
        step = self.step if best_step is None else best_step
        selected_by = self.config.select_by if best_step is not None and self.selects else "last"
        if self.world.is_main:
            model = self.model
            if state is not None:
                model = type(self.model).from_config_dict(self.model.config_dict())
                model.load_state_dict(state)
            model.save(directory, {**(metadata or {}), "step": step, "selected_by": selected_by})
        distributed.barrier(self.world)
        return f"last step {step}" if selected_by == "last" else f"best validation {selected_by}, step {step}"
