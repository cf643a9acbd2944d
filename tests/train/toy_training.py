"""A toy model and batch source that honour the trainer's contracts, small enough for subprocess tests.

Run as a script (also under torchrun) to train the toy in a run directory:
    python tests/train/toy_training.py RUN_DIR [--resume] [--bleu STEP:VALUE,...] [--key value ...]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 29
SEQ_LEN = 12


@dataclass
class ToyOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor
    n_targets: torch.Tensor


class ToyLM(nn.Module):
    """Predicts the next token from the current one (embedding, dropout, MLP): learns `x -> x + step`."""

    def __init__(self, dropout: float = 0.1, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width), nn.Linear(width, width)])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, lengths=None, labels=None, label_smoothing=0.0):
        hidden = self.dropout(self.embed(input_ids))
        for block in self.blocks:
            hidden = hidden + torch.tanh(block(hidden))
        logits = self.head(hidden)[:, :-1]
        targets = labels[:, 1:]
        mask = torch.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
        targets = targets.masked_fill(~mask, -100)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing)
        n_targets = mask.sum()
        correct = ((logits.argmax(-1) == targets) & mask).sum()
        return ToyOutput(loss=loss, accuracy=correct / n_targets, n_targets=n_targets)

    def configure_optimizers(self, weight_decay, lr, betas=(0.9, 0.98), fused=None):
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed"))]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    def config_dict(self) -> dict:
        return {"dropout": self.dropout.p, "width": self.head.in_features}

    @classmethod
    def from_config_dict(cls, values: dict) -> "ToyLM":
        return cls(**values)

    def save(self, directory, metadata=None):
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "toy.pt")


class ToyBatches:
    """Arithmetic sequences `start, start + step, ...` (mod VOCAB) with random lengths; deterministic from
    (seed, epoch, index). `delay` seconds per batch slows a run down so that a test can kill it mid-way."""

    def __init__(self, *, batch_size: int = 4, num_batches: int = 64, seed: int = 0, delay: float = 0.0):
        self.batch_size, self.count, self.seed, self.delay = batch_size, num_batches, seed, delay

    def num_batches(self, epoch: int) -> int:
        return self.count

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + index)
        start = torch.randint(0, VOCAB, (self.batch_size, 1), generator=generator)
        step = torch.randint(1, 3, (self.batch_size, 1), generator=generator)
        ids = (start + step * torch.arange(SEQ_LEN)) % VOCAB
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (self.batch_size,), generator=generator)
        ids = ids.masked_fill(torch.arange(SEQ_LEN)[None, :] >= lengths[:, None], 0)
        return {"input_ids": ids, "lengths": lengths, "labels": ids.clone()}


class ScriptedBleu:
    """An extra_eval reporting the BLEU scripted for the trainer's step ({step: value}), on rank 0 only as real
    BLEU is: the selection's input under a test's control. Set `trainer` once the Trainer exists."""

    def __init__(self, values: dict[int, float]):
        self.values, self.trainer = values, None

    def __call__(self, model: nn.Module) -> dict:
        return {"bleu": self.values[self.trainer.step]}

    @classmethod
    def parse(cls, text: str) -> ScriptedBleu:
        """From '2:1.0,4:3.5' (step:value pairs)."""
        return cls({int(step): float(value) for step, value in (pair.split(":") for pair in text.split(","))})


def main(argv: list[str]) -> None:
    from fastlm.train import TrainConfig, Trainer, close_world, init_world
    from fastlm.train.config import parse_overrides, typed_overrides

    run_dir, rest = Path(argv[0]), argv[1:]
    resume = "--resume" in rest
    rest = [a for a in rest if a != "--resume"]
    overrides = parse_overrides(rest)
    delay = float(overrides.pop("delay", "0"))
    dropout = float(overrides.pop("dropout", "0.1"))
    bleu = ScriptedBleu.parse(overrides.pop("bleu")) if "bleu" in overrides else None
    config = TrainConfig(**{"progress": False, "warmup_steps": 5, "max_steps": 30, "batch_size": 4,
                            "eval_interval": 10, "eval_batches": 5, "checkpoint_interval": 5,
                            **typed_overrides(TrainConfig, overrides)})
    world = init_world("cpu")
    # 5 validation batches: an odd count, so with 2 ranks one rank's share is a batch short.
    torch.manual_seed(1234)  # identical initial weights on every rank and in every run
    trainer = Trainer(ToyLM(dropout=dropout), ToyBatches(batch_size=config.batch_size, seed=config.seed, delay=delay),
                      config, run_dir, valid_batches=ToyBatches(batch_size=8, num_batches=5, seed=99), world=world,
                      extra_eval=bleu)
    if bleu is not None:
        bleu.trainer = trainer
    if resume:
        trainer.resume()
    trainer.fit()
    trainer.export_model(run_dir / "model")
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1:])
