"""DecoderLM: a causal transformer trained to predict the next token (GPT)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import IGNORE_INDEX, LanguageModel, ModelOutput, ignore_padding, lm_output, run_checks, token_checks
from .blocks import TransformerStack
from .config import ModelConfig
from .kv_cache import KVCache


def output_projection(config: ModelConfig, stack: TransformerStack) -> nn.Linear:
    """The (vocab_size, D) projection to next-token logits, tied to the stack's input embedding when configured."""
    projection = nn.Linear(config.d_model, config.vocab_size, bias=False)
    if config.tie_embeddings:
        # Tied by plain assignment: one Parameter is both the input embedding and the output projection, and it
        # receives the gradient of both uses.
        projection.weight = stack.embeddings.token.weight
    else:
        nn.init.normal_(projection.weight, std=config.init_std)
    return projection


def last_token_states(hidden: Tensor, lengths: Tensor, stepping: bool) -> Tensor:
    """(B, D) hidden state of each row's last real token: the only one when stepping with a filled cache."""
    if stepping:
        return hidden[:, -1]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


class DecoderLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.body = TransformerStack(config, causal=True)
        self.lm_head = output_projection(config, self.body)

    def forward(
        self,
        input_ids: Tensor,
        lengths: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool = False,
        label_smoothing: float = 0.0,
    ) -> ModelOutput:
        """input_ids (B, T); lengths (B,); labels (B, T) aligned with input_ids (pass the ids themselves): position
        t is scored against labels[t + 1], and positions whose target lies at or beyond the row's length are not.
        label_smoothing: as in F.cross_entropy (see EncoderLM.forward)."""
        run_checks(token_checks(self.config, input_ids, lengths, labels))
        hidden = self.body(input_ids, lengths)                              # (B, T, D)
        targets = None
        if labels is not None:
            no_target = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
            targets = torch.cat([labels[:, 1:], no_target], dim=1)
            targets = ignore_padding(targets, lengths - 1 if lengths is not None else None)
        return lm_output(hidden, self.lm_head, targets, return_logits, label_smoothing)

    @torch.no_grad()
    def next_token_logits(self, input_ids: Tensor, lengths: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, vocab_size) logits after each row's last real token (used by generation; inputs are not checked).

        Without a cache, or with an empty one (filled by this call), input_ids (B, T) hold whole rows; with a filled
        cache they are (B, 1), the token at position lengths - 1."""
        stepping = cache is not None and cache.filled
        hidden = self.body(input_ids, lengths, cache=cache)
        return self.lm_head(last_token_states(hidden, lengths, stepping))
