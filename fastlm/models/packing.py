"""Packed rows: several sentences in one row of a batch, each attending only within itself.

A packed batch (MaskedLMBatches with packed=True) carries, besides input_ids (B, T), `cu_seqlens` (n + 1,): the
offsets of its n sequences in the row-major (B * T) token stream, flash-attn's varlen convention. Every token lies
in exactly one sequence and no sequence crosses a row: a row's padding tail is a sequence of its own, which no
sentence attends to and which carries no label. The model derives what each attention path needs from the offsets
alone, on the device and without a host sync: positions restarting at 0 in every sequence (learned, sinusoidal and
rope positions alike), the offsets for fastlm's varlen kernel, and sequence ids for the block-diagonal mask SDPA
and eager attention take.

Packed translation pairs (TranslationBatches with packed=True) come as two such packings, of the source rows
(B, S) and of the target rows (B, T), that pair up: sequence i of the targets is the translation of sequence i of
the sources, and every row holds as many sequences on both sides (its padding tails pair with each other), so
cross-attention keeps target sequence i on source sequence i by the sequence index alone.
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

    def same_sequence(self, keys: Packing | None = None) -> Tensor:
        """(B, 1, T, Tk) bool: True where query and key lie in one sequence; the keys are these rows, or the rows
        of `keys` (cross-attention over paired packings: query sequence i with key sequence i)."""
        keys = self if keys is None else keys
        return (self.sequence_ids[:, :, None] == keys.sequence_ids[:, None, :])[:, None]


def packing_checks(cu_seqlens: Tensor, input_ids: Tensor, *,
                   names: tuple[str, str] = ("cu_seqlens", "input_ids")) -> list[ValueCheck]:
    """Check cu_seqlens' type and shape now (ValueError) and return its value checks (none where
    value_checks_wanted says no): offsets from 0 to B * T, increasing, with every row start among them. `names`:
    what the offsets and the ids they cut are called in the caller's arguments."""
    name, ids_name = names
    check_index_tensor(name, cu_seqlens, ids_name, input_ids)
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(f"{name} of shape {tuple(cu_seqlens.shape)}: expected (n + 1,) offsets of n >= 1 sequences")
    if not value_checks_wanted(cu_seqlens):
        return []
    rows, width = input_ids.shape
    row_starts = _row_starts(cu_seqlens, input_ids)
    return [
        (cu_seqlens[0], lambda first: f"{name} starts at {first}: expected 0" if first != 0 else None),
        (cu_seqlens[-1], lambda last: f"{name} ends at {last}: expected {rows * width}, the tokens of {ids_name} "
         f"{tuple(input_ids.shape)}" if last != rows * width else None),
        ((cu_seqlens.diff() <= 0).sum(), lambda bad: f"{name} has {bad} steps that do not increase: expected "
         "sequences of at least one token" if bad else None),
        ((~torch.isin(row_starts, cu_seqlens)).sum(), lambda bad: f"{name}: {bad} rows of {ids_name} do not start "
         f"a sequence: expected every row start (multiples of {width}) among the offsets, no sequence crossing a "
         "row" if bad else None),
    ]


def paired_packing_checks(src_cu_seqlens: Tensor | None, src_ids: Tensor, tgt_cu_seqlens: Tensor | None,
                          tgt_ids: Tensor) -> list[ValueCheck]:
    """packing_checks for both sides of packed pairs, whose rows (as many on both sides) must pair up: both offsets
    given, as many sequences on both sides (checked now, ValueError), and as value checks every row starting the
    same sequence on both sides, so that each row holds as many sequences on both sides."""
    if src_cu_seqlens is None or tgt_cu_seqlens is None:
        given = "src_cu_seqlens" if src_cu_seqlens is not None else "tgt_cu_seqlens"
        raise ValueError(f"{given} alone: packed pairs need the offsets of both sides, src_cu_seqlens and "
                         "tgt_cu_seqlens")
    checks = (packing_checks(src_cu_seqlens, src_ids, names=("src_cu_seqlens", "src_ids"))
              + packing_checks(tgt_cu_seqlens, tgt_ids, names=("tgt_cu_seqlens", "tgt_ids")))
    sources, targets = len(src_cu_seqlens) - 1, len(tgt_cu_seqlens) - 1
    if sources != targets:
        raise ValueError(f"src_cu_seqlens holds {sources} sequences, tgt_cu_seqlens {targets}: expected one target "
                         "sequence per source sequence, as many in each row on both sides")
    if not value_checks_wanted(src_cu_seqlens):
        return checks
    # The sequence index each row starts with: equal on both sides in every row exactly when the rows pair up.
    first_source = torch.searchsorted(src_cu_seqlens, _row_starts(src_cu_seqlens, src_ids))
    first_target = torch.searchsorted(tgt_cu_seqlens, _row_starts(tgt_cu_seqlens, tgt_ids))
    unpaired = (first_source != first_target).sum()
    return checks + [(unpaired, lambda bad: f"src_cu_seqlens and tgt_cu_seqlens: {bad} rows start another sequence "
                      "on the source side than on the target side: expected as many sequences in each row on both "
                      "sides (target sequence i translates source sequence i)" if bad else None)]


def _row_starts(cu_seqlens: Tensor, input_ids: Tensor) -> Tensor:
    """The offset of each row of input_ids in its flattened tokens, in the dtype of cu_seqlens."""
    rows, width = input_ids.shape
    return torch.arange(0, rows * width, width, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
