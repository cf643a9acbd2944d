"""Each model memorises 16 sentence pairs of the Korean-English corpus: the loss falls to near zero in seconds."""

import collections
import math

import pytest
import torch
from model_helpers import corpus_pairs, tiny_config

from fastlm import Tokenizer
from fastlm.models import DecoderLM, EncoderLM, Seq2SeqLM

STEPS, NEAR_ZERO = 300, 0.03


@pytest.fixture(scope="module")
def tokenized_pairs(ko_en_dir):
    """16 pairs as (Korean ids, English ids) from a BPE trained on them; the English ends with </s>."""
    pairs = corpus_pairs(ko_en_dir, count=16, max_bytes=70)
    tokenizer = Tokenizer.train([text for pair in pairs for text in pair], vocab_size=600)
    korean = [tokenizer.encode(ko) for ko, _ in pairs]
    english = [tokenizer.encode(en) + [tokenizer.eos_id] for _, en in pairs]
    return tokenizer, korean, english


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
    return ids, lengths


def _memorisation_floor(rows: list[list[int]]) -> float:
    """The mean next-token loss of a perfect memoriser of `rows`: where sentences share a prefix (say "The"), the
    next token is uncertain even to it, so a causal LM's loss cannot go below this."""
    prefixes, continuations = collections.Counter(), collections.Counter()
    for row in rows:
        for end in range(1, len(row)):
            prefixes[tuple(row[:end])] += 1
            continuations[tuple(row[: end + 1])] += 1
    losses = [-math.log(continuations[tuple(row[: end + 1])] / prefixes[tuple(row[:end])])
              for row in rows for end in range(1, len(row))]
    return sum(losses) / len(losses)


def _train(model, batch: dict, lr: float, floor: float = 0.0) -> float:
    """Full-batch AdamW until the loss is within NEAR_ZERO of `floor` (or STEPS run out); how far above it ends."""
    optimizer = model.configure_optimizers(weight_decay=0.0, lr=lr)
    model.train()
    for _ in range(STEPS):
        loss = model(**batch).loss
        if loss.item() < floor + NEAR_ZERO:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item() - floor


def _config(tokenizer):
    # Two layers instead of four: the same memorisation at half the CPU time.
    return tiny_config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, n_layers=2)


def test_decoder_overfits(tokenized_pairs):
    tokenizer, _, english = tokenized_pairs
    torch.manual_seed(0)
    rows = [[tokenizer.bos_id] + row for row in english]
    ids, lengths = _padded(rows, tokenizer.pad_id)
    batch = dict(input_ids=ids, lengths=lengths, labels=ids)
    assert _train(DecoderLM(_config(tokenizer)), batch, lr=3e-3, floor=_memorisation_floor(rows)) < NEAR_ZERO


def test_encoder_overfits(tokenized_pairs):
    tokenizer, korean, _ = tokenized_pairs
    torch.manual_seed(0)
    ids, lengths = _padded(korean, tokenizer.pad_id)
    # A fixed 15% of the tokens masked (a fresh mask every step would be a task, not memorisation).
    masked = (torch.rand(ids.shape) < 0.15) & (torch.arange(ids.shape[1])[None] < lengths[:, None])
    masked[:, 0] = True
    labels = ids.masked_fill(~masked, -100)
    inputs = ids.masked_fill(masked, tokenizer.special_tokens.index("<mask>"))
    batch = dict(input_ids=inputs, lengths=lengths, labels=labels)
    assert _train(EncoderLM(_config(tokenizer)), batch, lr=3e-3) < NEAR_ZERO


def test_seq2seq_overfits(tokenized_pairs):
    tokenizer, korean, english = tokenized_pairs
    torch.manual_seed(0)
    src, src_lengths = _padded(korean, tokenizer.pad_id)
    tgt, tgt_lengths = _padded(english, tokenizer.pad_id)
    config = _config(tokenizer)
    batch = dict(src_ids=src, tgt_ids=tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths, labels=tgt)
    assert _train(Seq2SeqLM(config, config), batch, lr=6e-3) < NEAR_ZERO
