"""Validation metrics: loss, perplexity and accuracy over a batch source; BLEU and sample translations."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import nn

from fastlm.train.distributed import World, all_reduce_sum


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches, *, world: World,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """Token-weighted loss, perplexity and accuracy over every batch of epoch 0 of `batches`: what is evaluated
    (the whole validation split, or a fixed sample of it) is the batch source's choice, never a prefix of its
    batches, which may be ordered by length.

    Rank r evaluates batches r, r + W, ...; the sums are all-reduced, so every rank returns the same numbers.
    Every rank runs the same number of forwards (FSDP gathers parameters collectively in each one): a rank whose
    share is one batch short repeats the last batch and counts it with weight 0.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss * n, correct, n
    count = batches.num_batches(0)
    rounds = math.ceil(count / world.world_size)
    for index in range(world.rank, rounds * world.world_size, world.world_size):
        with autocast():
            out = model(**to_device(batches.batch(0, min(index, count - 1)), world.device))
        n = out.n_targets.double() * (index < count)
        sums[0] += out.loss.double() * n
        sums[1] += (out.accuracy.double() * n) if out.accuracy is not None else 0.0
        sums[2] += n
    all_reduce_sum(sums, world)
    model.train(was_training)
    loss_sum, correct, n = sums.tolist()
    if n == 0:
        raise ValueError("the validation batches hold no targets: check the validation corpus")
    loss = loss_sum / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / n}


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
