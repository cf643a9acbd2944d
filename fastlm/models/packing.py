"""Packed rows: several sentences in one row of a batch, each attending only within itself.

A packed batch (MaskedLMBatches with packed=True) carries, besides input_ids (B, T), `cu_seqlens` (n + 1,): the
offsets of its n sequences in the row-major (B * T) token stream, flash-attn's varlen convention. Every token lies
in exactly one sequence and no sequence crosses a row: a row's padding tail is a sequence of its own, which no
sentence attends to and which carries no label. The model derives what each attention path needs from the offsets
alone, on the device and without a host sync: positions restarting at 0 in every sequence (learned, sinusoidal and
rope positions alike), the offsets for fastlm's varlen kernel, and sequence ids for the block-diagonal mask SDPA
and eager attention take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import ValueCheck, check_index_tensor, value_checks_wanted


@dataclass(frozen=True)
class Packing:
    cu_seqlens: Tensor    # (n + 1,) offsets of the sequences in the flattened (B * T) stream
    max_seqlen: int       # a bound on any sequence's length: T, since none crosses a row
    positions: Tensor     # (B, T) int64: each token's position within its sequence
    sequence_ids: Tensor  # (B, T) int64: the sequence each token belongs to

    @classmethod
    def from_offsets(cls, cu_seqlens: Tensor, rows: int, width: int) -> Packing:
        tokens = torch.arange(rows * width, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        sequence_ids = torch.searchsorted(cu_seqlens, tokens, right=True) - 1
        positions = (tokens - cu_seqlens[sequence_ids]).long()
        return cls(cu_seqlens, width, positions.view(rows, width), sequence_ids.view(rows, width))

    def same_sequence(self) -> Tensor:
        """(B, 1, T, T) bool: True where query and key lie in one sequence."""
        return (self.sequence_ids[:, :, None] == self.sequence_ids[:, None, :])[:, None]


def packing_checks(cu_seqlens: Tensor, input_ids: Tensor) -> list[ValueCheck]:
    """Check cu_seqlens' type and shape now (ValueError) and return its value checks (none where
    value_checks_wanted says no): offsets from 0 to B * T, increasing, with every row start among them."""
    name = "cu_seqlens"
    check_index_tensor(name, cu_seqlens, "input_ids", input_ids)
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(f"{name} of shape {tuple(cu_seqlens.shape)}: expected (n + 1,) offsets of n >= 1 sequences")
    if not value_checks_wanted(cu_seqlens):
        return []
    rows, width = input_ids.shape
    row_starts = torch.arange(0, rows * width, width, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return [
        (cu_seqlens[0], lambda first: f"{name} starts at {first}: expected 0" if first != 0 else None),
        (cu_seqlens[-1], lambda last: f"{name} ends at {last}: expected {rows * width}, the tokens of input_ids "
         f"{tuple(input_ids.shape)}" if last != rows * width else None),
        ((cu_seqlens.diff() <= 0).sum(), lambda bad: f"{name} has {bad} steps that do not increase: expected "
         "sequences of at least one token" if bad else None),
        ((~torch.isin(row_starts, cu_seqlens)).sum(), lambda bad: f"{name}: {bad} rows of input_ids do not start a "
         f"sequence: expected every row start (multiples of {width}) among the offsets, no sequence crossing a "
         "row" if bad else None),
    ]
