"""EncoderLM: a bidirectional transformer trained by masked-language modelling (BERT)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LanguageModel, ModelOutput, ignore_padding, lm_output, run_checks, token_checks
from .blocks import TransformerStack
from .config import ModelConfig


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
    ) -> ModelOutput:
        """input_ids (B, T); lengths (B,) real tokens per row; labels (B, T): the original id at masked positions,
        -100 elsewhere (positions at or beyond lengths are ignored too)."""
        run_checks(token_checks(self.config, input_ids, lengths, labels))
        hidden = self.body(input_ids, lengths)                              # (B, T, D)
        targets = ignore_padding(labels, lengths) if labels is not None else None
        return lm_output(self.head.transform(hidden), self.head.output, targets, return_logits)
