"""translations(): input order whatever the batching and sorting, blank texts never reach the model, a stream that
gives each window of batches as soon as it is done, one warning for the sources cut to the encoder's positions.

generate is replaced by a "model" that copies its source, so each text's expected translation is the text itself."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastlm.translation
from fastlm import Tokenizer
from fastlm.models import ModelConfig, Seq2SeqLM
from fastlm.translation import translate_texts, translations

MAX_SEQ_LEN = 16  # so that a sentence of a few words is cut


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(iter(["a small corpus", "작은 말뭉치"]), vocab_size=260)  # bytes and specials


@pytest.fixture(scope="module")
def model(tokenizer) -> Seq2SeqLM:
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                max_seq_len=MAX_SEQ_LEN)
    return Seq2SeqLM(config, config)


class CopyingGenerate:
    """Stands in for generate: each row's "translation" is its source without <s>, then </s>. Records the batches."""

    def __init__(self, eos_id: int, pad_id: int):
        self.eos_id, self.pad_id = eos_id, pad_id
        self.batches: list[list[list[int]]] = []

    def __call__(self, model, *, src_ids, src_lengths, **options):
        sources = [row[:length] for row, length in zip(src_ids.tolist(), src_lengths.tolist())]
        self.batches.append(sources)
        rows = [source[1:-1] + [self.eos_id] for source in sources]
        width = max(map(len, rows))
        return torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows])


def expected_translation(tokenizer: Tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text)[:MAX_SEQ_LEN - 2]) if text.strip() else ""


@given(texts=st.lists(st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\t \u3000"])), max_size=40),
       batch_size=st.integers(1, 5))
def test_translations_come_in_input_order_and_blank_texts_skip_the_model(model, tokenizer, texts, batch_size):
    copying = CopyingGenerate(tokenizer.eos_id, tokenizer.pad_id)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cut sources: test_sources_cut_to_fit_warn_once
        patch.setattr(fastlm.translation, "generate", copying)
        assert translate_texts(model, tokenizer, texts, batch_size=batch_size) == [
            expected_translation(tokenizer, text) for text in texts]
    assert sum(map(len, copying.batches)) == sum(1 for text in texts if text.strip())
    for batch in copying.batches:
        assert len(batch) <= batch_size
        assert [len(source) for source in batch] == sorted(len(source) for source in batch)  # sorted by length


def test_a_window_of_batches_is_given_before_the_next_one_runs(model, tokenizer, monkeypatch):
    copying = CopyingGenerate(tokenizer.eos_id, tokenizer.pad_id)
    monkeypatch.setattr(fastlm.translation, "generate", copying)
    texts = [f"word {'x' * (i % 7)}" for i in range(40)]
    batches_run_when_given = [len(copying.batches) for _ in translations(model, tokenizer, texts, batch_size=2)]
    window = 2 * fastlm.translation.SORTED_BATCHES
    assert batches_run_when_given[0] <= fastlm.translation.SORTED_BATCHES < len(copying.batches) == 20
    assert all(run <= (index // window + 1) * fastlm.translation.SORTED_BATCHES
               for index, run in enumerate(batches_run_when_given))


def test_sources_cut_to_fit_warn_once(model, tokenizer, monkeypatch):
    copying = CopyingGenerate(tokenizer.eos_id, tokenizer.pad_id)
    monkeypatch.setattr(fastlm.translation, "generate", copying)
    texts = ["a small corpus of words", "short", "", "a small corpus of many more words"]
    with pytest.warns(UserWarning) as caught:
        translate_texts(model, tokenizer, texts)
    assert [str(warning.message) for warning in caught] == [
        f"2 of 4 sources are longer than the encoder's max_seq_len = {MAX_SEQ_LEN} tokens (with <s> and </s>): they "
        "were cut to fit"]
    assert sorted(map(len, copying.batches[0])) == [len(tokenizer.encode("short")) + 2, MAX_SEQ_LEN, MAX_SEQ_LEN]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        translate_texts(model, tokenizer, ["short", ""])  # nothing cut, nothing said
