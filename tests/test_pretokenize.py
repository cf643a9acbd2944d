"""The native pre-splits against their Python definitions: the cl100k regex and the char-level rule."""

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
