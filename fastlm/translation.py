"""Translating text with a Seq2SeqLM: each source encoded as in training (<s> sentence </s>), searched in batches of
sources of similar length, and given back in input order as soon as every source before it is done."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from fastlm.generation import GENERATION_DEFAULTS, generate
from fastlm.models import Seq2SeqLM
from fastlm.tokenizer import Tokenizer

# Sources are sorted by length within windows of this many batches: sorted batches pad little and end together
# (beam search runs until the longest translation of a batch ends), while a window is all that a stream waits for
# and all that Ctrl-C can lose.
SORTED_BATCHES = 8


@dataclass(frozen=True)
class DecodingSettings:
    """How translations are searched, by `fastlm translate` and by the BLEU of finetune and eval. Names as in
    transformers' GenerationConfig where it has the setting, as in fairseq for the length limit."""

    num_beams: int = GENERATION_DEFAULTS.num_beams                        # beam width (1: greedy)
    length_penalty: float = GENERATION_DEFAULTS.length_penalty            # see GenerationDefaults
    no_repeat_ngram_size: int = GENERATION_DEFAULTS.no_repeat_ngram_size  # see GenerationDefaults
    max_len_a: float = 2.0  # a translation stops after max_len_a * source tokens (<s> and </s> included)
    max_len_b: int = 10     # + max_len_b tokens: 99.97% of ko-en's training pairs fit 2 x + 10 (fairseq's usual
                            # 1.2 x + 10 would cut 8% of them), and a looping output stops there. transformers has no
                            # such setting, so an exported model stops at max_new_tokens instead


def translations(model: Seq2SeqLM, tokenizer: Tokenizer, texts: list[str],
                 decoding: DecodingSettings = DecodingSettings(), *, max_new_tokens: int = GENERATION_DEFAULTS.max_new_tokens,
                 batch_size: int = 32) -> Iterator[str]:
    """The translation of each text, in input order, each given as soon as it and every text before it are done.

    A blank text (whitespace only) translates to "" without the model. A source longer than the encoder's positions
    is cut to fit them (one warning says how many were). Each translation stops at eos, after max_len_a * its source
    tokens + max_len_b tokens, or after max_new_tokens, whichever comes first."""
    limit = model.encoder_config.max_seq_len - 2                    # room for <s> and </s>
    blank = [not text.strip() for text in texts]
    encoded = iter(tokenizer.encode_batch([text for text, empty in zip(texts, blank) if not empty]))
    sources = [None if empty else next(encoded) for empty in blank]
    cut = sum(len(ids) > limit for ids in sources if ids is not None)
    if cut:
        warnings.warn(f"{cut} of {len(texts)} sources are longer than the encoder's max_seq_len = "
                      f"{model.encoder_config.max_seq_len} tokens (with <s> and </s>): they were cut to fit",
                      stacklevel=2)
    sources = [None if ids is None else [tokenizer.bos_id, *ids[:limit], tokenizer.eos_id] for ids in sources]
    return _in_input_order(_translated_by_index(model, tokenizer, sources, decoding, max_new_tokens, batch_size))


def translate_texts(model: Seq2SeqLM, tokenizer: Tokenizer, texts: list[str],
                    decoding: DecodingSettings = DecodingSettings(), *, max_new_tokens: int = GENERATION_DEFAULTS.max_new_tokens,
                    batch_size: int = 32) -> list[str]:
    """All of `translations(...)` at once."""
    return list(translations(model, tokenizer, texts, decoding, max_new_tokens=max_new_tokens,
                             batch_size=batch_size))


def _translated_by_index(model, tokenizer, sources, decoding, max_new_tokens, batch_size) -> Iterator[tuple[int, str]]:
    """(index, translation) of every source, a window of SORTED_BATCHES batches at a time, shortest first within it;
    a blank source (None) as soon as its window starts."""
    window = batch_size * SORTED_BATCHES
    for start in range(0, len(sources), window):
        indices = range(start, min(start + window, len(sources)))
        yield from ((index, "") for index in indices if sources[index] is None)
        pending = sorted((index for index in indices if sources[index] is not None),
                         key=lambda index: len(sources[index]))
        for first in range(0, len(pending), batch_size):
            batch = pending[first:first + batch_size]
            yield from zip(batch, _translate_batch(model, tokenizer, [sources[index] for index in batch], decoding,
                                                   max_new_tokens))


def _in_input_order(translated: Iterator[tuple[int, str]]) -> Iterator[str]:
    """Translations that come by index in any order, given in index order as soon as those before them came."""
    waiting: dict[int, str] = {}
    next_index = 0
    for index, translation in translated:
        waiting[index] = translation
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1


def _translate_batch(model: Seq2SeqLM, tokenizer: Tokenizer, sources: list[list[int]], decoding: DecodingSettings,
                     max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids in sources])
    src_ids = torch.full((len(sources), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)
    for row, ids in enumerate(sources):
        src_ids[row, :len(ids)] = torch.tensor(ids)
    generated = generate(model, src_ids=src_ids.to(device), src_lengths=lengths.to(device), strategy="beam",
                         num_beams=decoding.num_beams, length_penalty=decoding.length_penalty,
                         no_repeat_ngram_size=decoding.no_repeat_ngram_size, max_len_a=decoding.max_len_a,
                         max_len_b=decoding.max_len_b, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(_until_eos(row, tokenizer)) for row in generated.tolist()]


def _until_eos(ids: list[int], tokenizer: Tokenizer) -> list[int]:
    """Generated ids up to the first </s>, without <s> or padding."""
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return [i for i in ids if i not in (tokenizer.bos_id, tokenizer.pad_id)]
