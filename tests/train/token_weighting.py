"""Micro-batches of very different target counts for the three models, and the gradient of one training step.

Run as a script (also under torchrun) to save the step's gradients of every task:
    python tests/train/token_weighting.py OUT_FILE --grad_accum N
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM
from fastlm.train import TrainConfig, Trainer, World, close_world, init_world

TASKS = ("masked", "causal", "translation")
# Rows of 2 to 31 tokens, and masking rates from 5% to 95%: the four micro-batches hold from a handful to dozens
# of targets, so a mean of micro-batch means and the mean over all targets differ by far more than fp32 rounding.
ROW_LENGTHS = [(3, 2), (30, 31), (5, 4), (18, 26)]
MASK_RATES = [0.95, 0.05, 0.5, 0.3]


def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0)


def build_model(task: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process and every run
    config = tiny_config()
    if task == "masked":
        return EncoderLM(config)
    if task == "causal":
        return DecoderLM(config)
    return Seq2SeqLM(config, config)


def _padded_ids(lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(4, tiny_config().vocab_size, (len(lengths), int(lengths.max())), generator=generator)
    return ids.masked_fill(torch.arange(ids.shape[1])[None, :] >= lengths[:, None], 0)


class VaryingBatches:
    """The four micro-batches of one step for `task`, a pure function of the index like the real sources."""

    def __init__(self, task: str):
        self.task = task

    def num_batches(self, epoch: int) -> int:
        return len(ROW_LENGTHS)

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        lengths = torch.tensor(ROW_LENGTHS[index])
        ids = _padded_ids(lengths, generator)
        if self.task == "causal":
            return {"input_ids": ids, "lengths": lengths, "labels": ids.clone()}
        padding = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
        if self.task == "masked":
            masked = (torch.rand(ids.shape, generator=generator) < MASK_RATES[index]) & ~padding
            masked[:, 0] = True  # at least one target per row
            return {"input_ids": ids.masked_fill(masked, 3), "lengths": lengths,
                    "labels": ids.masked_fill(~masked, -100)}
        src_lengths = lengths.flip(0) + 1
        return {"src_ids": _padded_ids(src_lengths, generator), "src_lengths": src_lengths, "tgt_ids": ids,
                "tgt_lengths": lengths, "labels": ids.masked_fill(padding, -100)}


class MergedBatches:
    """All micro-batches of `source` as one batch (rows padded to the widest): what token weighting must match."""

    def __init__(self, source: VaryingBatches):
        self.source = source

    def num_batches(self, epoch: int) -> int:
        return 1

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        parts = [self.source.batch(epoch, i) for i in range(self.source.num_batches(epoch))]
        merged = {}
        for key in parts[0]:
            tensors = [part[key] for part in parts]
            if tensors[0].dim() == 1:
                merged[key] = torch.cat(tensors)
                continue
            width = max(t.shape[1] for t in tensors)
            fill = -100 if key == "labels" else 0
            merged[key] = torch.cat([nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])
        return merged


def step_gradients(task: str, batches, grad_accum: int, world: World) -> dict[str, torch.Tensor]:
    """The gradients of one optimizer step from the initial weights (no clipping), and the step's loss."""
    # fp32: the micro-batch splits compared would round their sums differently in bf16.
    config = TrainConfig(progress=False, max_steps=1, warmup_steps=0, grad_clip=0.0, grad_accum=grad_accum,
                         eval_interval=0, precision="fp32")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(build_model(task), batches, config, run_dir, world=world)
        loss, _, _ = trainer.train_step()
    gradients = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}
    gradients["loss"] = torch.tensor(loss)
    return gradients


def main(argv: list[str]) -> None:
    out_file, grad_accum = Path(argv[0]), int(argv[argv.index("--grad_accum") + 1])
    world = init_world("cpu")
    results = {task: step_gradients(task, VaryingBatches(task), grad_accum, world) for task in TASKS}
    if world.is_main:
        torch.save(results, out_file)
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1:])
