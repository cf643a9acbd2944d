"""BERT-style token masking for masked-LM training.

Each maskable token (not a special token, not padding) is selected independently with probability `mask_prob`;
a selected token becomes the target (its label is its id), and its input is replaced by `<mask>` with probability
`replace_mask`, by a random non-special id with probability `replace_random`, and kept otherwise. Every draw comes
from the generator passed in, so a batch's masks are a pure function of its (seed, epoch, index).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # the label of a position without a target (torch's cross-entropy default)


@dataclass(frozen=True)
class MaskingPolicy:
    mask_id: int
    vocab_size: int
    special_ids: frozenset[int]     # never selected, never drawn as a random replacement
    mask_prob: float = 0.15         # BERT's rate: enough signal per sequence, enough context left to predict from
    replace_mask: float = 0.8       # selected -> <mask>
    replace_random: float = 0.1     # selected -> a random non-special id; the rest stays unchanged, so the model
                                    # cannot assume that an unmasked token is always right
    _special_tensor: torch.Tensor = field(init=False, repr=False, compare=False)
    _ordinary_ids: torch.Tensor = field(init=False, repr=False, compare=False)  # random replacements come from here

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_ids", frozenset(int(i) for i in self.special_ids))
        if any(not 0 <= i < self.vocab_size for i in self.special_ids):
            raise ValueError(f"special_ids={sorted(self.special_ids)}: expected ids in [0, {self.vocab_size})")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob={self.mask_prob}: expected a probability in (0, 1]")
        # Written as "not (valid)" so that NaN, which fails every comparison, is rejected too.
        if not (self.replace_mask >= 0 and self.replace_random >= 0 and self.replace_mask + self.replace_random <= 1):
            raise ValueError(f"replace_mask={self.replace_mask}, replace_random={self.replace_random}: "
                             "expected non-negative probabilities summing to at most 1")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id}: expected an id in [0, vocab_size={self.vocab_size})")
        if self.mask_id not in self.special_ids:
            raise ValueError(f"mask_id={self.mask_id}: expected one of special_ids={sorted(self.special_ids)}")
        if len(self.special_ids) >= self.vocab_size:
            raise ValueError(f"special_ids: all {self.vocab_size} ids are special, no id left to predict")
        special = torch.tensor(sorted(self.special_ids), dtype=torch.int64)
        is_ordinary = torch.ones(self.vocab_size, dtype=torch.bool)
        is_ordinary[special] = False
        object.__setattr__(self, "_special_tensor", special)
        object.__setattr__(self, "_ordinary_ids", is_ordinary.nonzero().squeeze(1))

    def apply(self, input_ids: torch.Tensor, lengths: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels) for int64 input_ids (B, T) padded beyond `lengths` (B,)."""
        batch_size, max_len = input_ids.shape
        inside = torch.arange(max_len).expand(batch_size, max_len) < lengths[:, None]
        maskable = inside & ~torch.isin(input_ids, self._special_tensor)
        scores = torch.rand(input_ids.shape, generator=generator)
        selected = maskable & (scores < self.mask_prob)
        if not selected.any() and maskable.any():
            # A batch without any target would give a 0/0 loss; take the maskable token with the lowest score.
            selected.view(-1)[torch.where(maskable.view(-1), scores.view(-1), 2.0).argmin()] = True
        labels = torch.where(selected, input_ids, IGNORE_INDEX)

        action = torch.rand(input_ids.shape, generator=generator)
        to_mask = selected & (action < self.replace_mask)
        to_random = selected & ~to_mask & (action < self.replace_mask + self.replace_random)
        drawn = torch.randint(len(self._ordinary_ids), input_ids.shape, generator=generator)
        replacements = self._ordinary_ids[drawn]
        masked = torch.where(to_mask, self.mask_id, input_ids)
        masked = torch.where(to_random, replacements, masked)
        return masked, labels


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices (row * T + column), increasing, of the positions of labels (B, T) that carry a target: the
    rows an MLM head needs. Found here, on the CPU batch, they cost the model no host sync (EncoderLM's forward)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
