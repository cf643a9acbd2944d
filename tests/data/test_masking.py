"""MLM masking: selection rate and 80/10/10 split, specials and padding never selected, reproducibility."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastlm.data import IGNORE_INDEX, MaskingPolicy
from fastlm.data.rng import torch_generator

VOCAB_SIZE, PAD, BOS, EOS, MASK = 1000, 0, 1, 2, 3
SPECIALS = frozenset({PAD, BOS, EOS, MASK})


def random_batch(generator: torch.Generator, batch_size: int, max_len: int):
    """<s> random ordinary ids (with stray special ids inside) </s>, padded: (input_ids, lengths)."""
    lengths = torch.randint(2, max_len + 1, (batch_size,), generator=generator)
    input_ids = torch.randint(len(SPECIALS), VOCAB_SIZE, (batch_size, max_len), generator=generator)
    strays = torch.rand(batch_size, max_len, generator=generator) < 0.05
    input_ids[strays] = torch.randint(0, len(SPECIALS), (int(strays.sum()),), generator=generator)
    input_ids[:, 0] = BOS
    input_ids[torch.arange(batch_size), lengths - 1] = EOS
    input_ids[torch.arange(max_len)[None, :] >= lengths[:, None]] = PAD
    return input_ids, lengths


def policy(**overrides) -> MaskingPolicy:
    return MaskingPolicy(mask_id=MASK, vocab_size=VOCAB_SIZE, special_ids=SPECIALS, **overrides)


def maskable_positions(input_ids, lengths):
    inside = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    return inside & ~torch.isin(input_ids, torch.tensor(sorted(SPECIALS)))


def test_selection_rate_and_80_10_10_split_on_a_large_batch():
    input_ids, lengths = random_batch(torch_generator(1), 128, 256)
    masked, labels = policy().apply(input_ids, lengths, torch_generator(2))
    selected = labels != IGNORE_INDEX
    maskable = maskable_positions(input_ids, lengths)
    assert maskable.sum() > 15_000
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.01
    as_mask = (masked[selected] == MASK).float().mean()
    unchanged = (masked[selected] == input_ids[selected]).float().mean()
    randomised = 1 - as_mask - unchanged
    # ~2,400 selected tokens: standard errors ~0.8% (mask) and ~0.6% (random, unchanged).
    assert abs(as_mask - 0.8) < 0.03 and abs(randomised - 0.1) < 0.025 and abs(unchanged - 0.1) < 0.025
    assert not torch.isin(masked[selected & (masked != input_ids) & (masked != MASK)],
                          torch.tensor(sorted(SPECIALS))).any(), "random replacements are never special ids"


@given(seed=st.integers(0, 2**32), mask_prob=st.floats(0.05, 1.0), replace_mask=st.floats(0, 1),
       batch_size=st.integers(1, 6), max_len=st.integers(2, 40))
def test_specials_and_padding_are_never_selected_and_labels_are_the_originals(
        seed, mask_prob, replace_mask, batch_size, max_len):
    input_ids, lengths = random_batch(torch_generator(seed), batch_size, max_len)
    masked, labels = policy(mask_prob=mask_prob, replace_mask=replace_mask,
                            replace_random=(1 - replace_mask) / 2).apply(input_ids, lengths, torch_generator(seed, 1))
    selected = labels != IGNORE_INDEX
    maskable = maskable_positions(input_ids, lengths)
    assert not (selected & ~maskable).any()
    assert torch.equal(labels[selected], input_ids[selected])
    assert torch.equal(masked[~selected], input_ids[~selected])
    if maskable.any():
        assert selected.any(), "a batch with a maskable token always has a target"


def test_same_generator_seed_same_masks_other_seed_other_masks():
    input_ids, lengths = random_batch(torch_generator(0), 8, 64)
    first = policy().apply(input_ids, lengths, torch_generator(5, 0, 3))
    again = policy().apply(input_ids, lengths, torch_generator(5, 0, 3))
    other_epoch = policy().apply(input_ids, lengths, torch_generator(5, 1, 3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other_epoch[1])


@pytest.mark.parametrize("overrides, message", [
    ({"mask_prob": 0.0}, "mask_prob=0.0"),
    ({"replace_mask": 0.8, "replace_random": 0.3}, "summing to at most 1"),
    ({"replace_mask": float("nan")}, "replace_mask=nan"),
    ({"mask_prob": 1.5}, "mask_prob=1.5"),
    ({"mask_id": 7}, "mask_id=7: expected one of special_ids"),
    ({"special_ids": frozenset({3, 1000})}, "expected ids in"),
])
def test_bad_settings_are_rejected(overrides, message):
    settings = {"mask_id": MASK, "vocab_size": VOCAB_SIZE, "special_ids": SPECIALS, **overrides}
    with pytest.raises(ValueError, match=message):
        MaskingPolicy(**settings)
