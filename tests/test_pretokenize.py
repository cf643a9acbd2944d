"""The native pre-splits against their Python definitions: the cl100k regex and the char-level rule."""

import unicodedata

import pytest
import regex
from hypothesis import given
from tokenizer_strategies import texts

from fastlm import _native
from fastlm.reference_bpe import CL100K_PATTERN, pretokenize


@given(texts)
def test_byte_level_split_is_the_cl100k_regex(text):
    assert _native.pretokenize(text, "byte") == regex.findall(CL100K_PATTERN, text)


@given(texts)
def test_char_level_split_is_the_reference_rule(text):
    assert _native.pretokenize(text, "char") == pretokenize(text, "char")


def test_byte_level_split_on_known_cases():
    cases = {
        "Hello world": ["Hello", " world"],
        "I'LL go  now\n\n": ["I", "'LL", " go", " ", " now", "\n\n"],
        "12345 가나다!!": ["123", "45", " 가나다", "!!"],
        "": [],
    }
    for text, pieces in cases.items():
        assert _native.pretokenize(text, "byte") == pieces


def test_char_level_split_on_known_cases():
    assert _native.pretokenize("서울에서2024년 Seoul에서", "char") == ["▁서울에서", "2024", "년", "▁Seoul", "에서"]
    assert _native.pretokenize("", "char") == []


@pytest.mark.parametrize("word", ["हिन्दी", "ภาษาไทย", "தமிழ்", unicodedata.normalize("NFD", "café"), "한\u302e"])
def test_char_level_letter_runs_keep_their_combining_marks(word):
    assert _native.pretokenize(word, "char") == pretokenize(word, "char") == ["▁" + word]


def test_char_level_marks_after_a_non_letter_are_other():
    text = "\u0301a 1\u0301"
    assert _native.pretokenize(text, "char") == pretokenize(text, "char") == ["▁\u0301", "a", "▁1", "\u0301"]


def test_byte_level_split_follows_the_unicode_tables_of_regex():
    # U+A7CE is a letter for `regex`, unassigned for tiktoken 0.14 and HF 0.23: they split "a", "\ua7ce".
    assert _native.pretokenize("a\ua7ce", "byte") == ["a\ua7ce"]
