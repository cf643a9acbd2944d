"""A tiny EncoderLM or DecoderLM (tied embeddings, fastlm kernels' reference path on CPU) trained on random batches,
for the scale-out checkpoint tests. Run as a script (also under torchrun) to train in a run directory:
    python tests/train/scale_out_training.py RUN_DIR ARCH [--resume] [--key value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastlm.models import DecoderLM, EncoderLM, ModelConfig
from fastlm.models.base import IGNORE_INDEX
from fastlm.train import TrainConfig, Trainer, World, close_world, init_world
from fastlm.train.config import parse_overrides, typed_overrides

ARCHS = {"decoder": DecoderLM, "encoder": EncoderLM}
MODEL = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16, dropout=0.0,
             tie_embeddings=True, attn_impl="fastlm")
SEQ_LEN = 12


class RandomBatches:
    """Random ids of random lengths, a pure function of (epoch, index) like the real batch sources; the encoder's
    labels keep a quarter of the positions (masked-LM style), the decoder's all of them."""

    def __init__(self, arch: str, batch_size: int, num_batches: int = 16):
        self.arch, self.batch_size, self.count = arch, batch_size, num_batches

    def num_batches(self, epoch: int) -> int:
        return self.count

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(epoch * 1000 + index)
        shape = (self.batch_size, SEQ_LEN)
        ids = torch.randint(4, MODEL["vocab_size"], shape, generator=generator)
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (self.batch_size,), generator=generator)
        labels = ids.clone()
        if self.arch == "encoder":
            labels[torch.rand(shape, generator=generator) > 0.25] = IGNORE_INDEX
        return {"input_ids": ids, "lengths": lengths, "labels": labels}


def build_trainer(run_dir: Path, arch: str, overrides: dict, world: World | None = None) -> Trainer:
    # fp32: world sizes split the batch differently, and bf16 would round each split's sums differently.
    config = TrainConfig(**{"progress": False, "warmup_steps": 2, "max_steps": 4, "batch_size": 2, "lr": 1e-2,
                            "eval_interval": 0, "checkpoint_interval": 2, "precision": "fp32", **overrides})
    torch.manual_seed(1234)  # identical initial weights on every rank and in every run
    model = ARCHS[arch](ModelConfig(**MODEL))
    return Trainer(model, RandomBatches(arch, config.batch_size), config, run_dir, world=world,
                   run_info={"task": f"pretrain-{arch}", "model": MODEL})


def main(argv: list[str]) -> None:
    run_dir, arch, rest = Path(argv[0]), argv[1], argv[2:]
    resume = "--resume" in rest
    overrides = typed_overrides(TrainConfig, parse_overrides([a for a in rest if a != "--resume"]))
    world = init_world("cpu")
    trainer = build_trainer(run_dir, arch, overrides, world)
    if resume:
        trainer.resume()
    trainer.fit()
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1:])
