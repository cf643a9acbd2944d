"""EncoderLM: a bidirectional transformer trained by masked-language modelling (BERT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (IGNORE_INDEX, LanguageModel, ModelOutput, ValueCheck, check_index_tensor, ignore_padding,
                   lm_output, run_checks, token_checks, value_checks_wanted)
from .blocks import TransformerStack
from .config import ModelConfig
from .packing import packing_checks


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then the vocabulary projection (with a bias)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size)
        nn.init.normal_(self.dense.weight, std=config.init_std)
        nn.init.zeros_(self.dense.bias)
        nn.init.normal_(self.output.weight, std=config.init_std)
        nn.init.zeros_(self.output.bias)

    def transform(self, hidden: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(hidden)))


class EncoderLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body = TransformerStack(config, causal=False)
        self.head = MaskedLMHead(config)
        if config.tie_embeddings:
            # Tied by plain assignment: one Parameter serves as input embedding and output projection, and receives
            # the gradient of both uses.
            self.head.output.weight = self.body.embeddings.token.weight

    def forward(
        self,
        input_ids: Tensor,
        lengths: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool = False,
        target_positions: Tensor | None = None,
        label_smoothing: float = 0.0,
        cu_seqlens: Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); lengths (B,) real tokens per row; labels (B, T): the original id at masked positions,
        -100 elsewhere (positions at or beyond lengths are ignored too).

        target_positions (N,): the flat indices (row * T + column), in increasing order, of every position that
        carries a target (MaskedLMBatches delivers them). With them the head runs on those N rows only (about 15%
        of the positions in MLM); without them it runs on every position. Loss, accuracy and gradients are the same
        either way. They come with the batch because finding them here (`nonzero`) would cost a host sync and give
        a shape torch.compile cannot know.

        label_smoothing: as in F.cross_entropy. It belongs to a loss being optimised; leave it 0 for a loss that
        compares models (validation, perplexity).

        cu_seqlens (n + 1,): packed rows, several sentences per row (MaskedLMBatches with packed=True), each
        attending within itself with positions from 0: the offsets of the sentences, and of each row's padding tail,
        in the flattened (B * T) tokens (see packing.py). lengths still count each row's real tokens."""
        checks = token_checks(self.config, input_ids, lengths, labels)
        if target_positions is not None:
            checks += target_position_checks(target_positions, labels, lengths, input_ids)
        if cu_seqlens is not None:
            checks += packing_checks(cu_seqlens, input_ids)
        run_checks(checks)
        hidden = self.body(input_ids, lengths, cu_seqlens=cu_seqlens)      # (B, T, D)
        output = ModelOutput()
        if labels is not None:
            targets = ignore_padding(labels, lengths).reshape(-1)          # (B*T,)
            rows = hidden.reshape(-1, hidden.shape[-1])                     # (B*T, D)
            if target_positions is not None:
                targets, rows = targets[target_positions], rows[target_positions]  # (N,), (N, D)
            output = lm_output(self.head.transform(rows), self.head.output, targets, return_logits=False,
                               label_smoothing=label_smoothing)
        if return_logits:
            output.logits = self.head.output(self.head.transform(hidden))  # (B, T, V)
        return output


def target_position_checks(target_positions: Tensor, labels: Tensor | None, lengths: Tensor | None,
                           input_ids: Tensor) -> list[ValueCheck]:
    """Check target_positions' type and shape now (ValueError) and return its value checks (none where
    value_checks_wanted says no): in range, strictly increasing, and exactly the positions whose label (after
    padding) is not -100."""
    name = "target_positions"
    if labels is None:
        raise ValueError(f"{name} given without labels: expected labels, whose targets they index")
    check_index_tensor(name, target_positions, "input_ids", input_ids)
    if target_positions.dim() != 1:
        raise ValueError(f"{name} of shape {tuple(target_positions.shape)}: expected (N,) flat indices")
    if not value_checks_wanted(target_positions):
        return []
    size = labels.numel()
    has_target = (ignore_padding(labels, lengths) != IGNORE_INDEX).reshape(-1)
    # Padded with one 0 so that an empty target_positions (a batch without targets) has a minimum and maximum.
    padded = torch.cat([target_positions, target_positions.new_zeros(1)])
    hits = has_target[padded[:-1].clamp(0, size - 1)]
    # Once the indices are in range and strictly increasing (no repeats), missed targets + non-targets indexed
    # is 0 exactly when they are the targets' positions.
    mismatches = has_target.sum() - hits.sum() + (~hits).sum()
    return [
        (padded.min(), lambda low: f"{name} contains {low}: expected flat indices >= 0" if low < 0 else None),
        (padded.max(), lambda high: f"{name} contains {high}: expected flat indices < {size} (row * T + column "
         "of labels)" if high >= size else None),
        ((target_positions.diff() <= 0).sum(), lambda bad: f"{name} has {bad} steps that do not increase: "
         "expected strictly increasing flat indices" if bad else None),
        (mismatches, lambda bad: f"{name} differs from labels at {bad} positions: expected exactly the positions "
         f"whose label is not {IGNORE_INDEX} (within lengths)" if bad else None),
    ]
