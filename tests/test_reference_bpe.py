"""The pure-Python oracle on cases small enough to check by hand."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlm.reference_bpe import NUM_BYTES, ReferenceBPE, pretokenize


def byte_id(char: str) -> int:
    return ord(char)  # no special tokens in these tests: byte b has id b


def test_textbook_example_merges_aa_then_ab_then_aaab():
    # Wikipedia's "aaabdaaabac": aa -> Z, ab -> Y, ZY -> X (then the rarer pairs, as min_frequency is 1 here).
    model = ReferenceBPE.train(["aaabdaaabac"], NUM_BYTES + 3, special_tokens=(), min_frequency=1)
    assert model.merges == [(byte_id("a"), byte_id("a")), (byte_id("a"), byte_id("b")), (256, 257)]
    assert model.tokens[256:] == [b"aa", b"ab", b"aaab"]
    assert model.encode("aaabdaaabac") == [258, byte_id("d"), 258, byte_id("a"), byte_id("c")]


def test_ties_go_to_the_smaller_left_then_right_id():
    # Every pair occurs once: (a, c) < (b, a) < (b, c), whatever the order of the corpus.
    model = ReferenceBPE.train(["bc", "ba", "ac"], NUM_BYTES + 1, special_tokens=(), min_frequency=1)
    assert model.merges == [(byte_id("a"), byte_id("c"))]
    # "xy" (id 256) + "a" ties with "z" + "a": by id (z, a) comes first, though "xy" < "z" as bytes.
    model = ReferenceBPE.train(["xya", "za"], NUM_BYTES + 2, special_tokens=(), min_frequency=1)
    assert model.merges == [(byte_id("x"), byte_id("y")), (byte_id("z"), byte_id("a"))]


def test_min_frequency_stops_training():
    model = ReferenceBPE.train(["ab ab ab cd"], NUM_BYTES + 10, special_tokens=(), min_frequency=2)
    assert [model.tokens[256 + k] for k in range(len(model.merges))] == [b"ab", b" ab"]


def test_encoding_merges_the_lowest_rank_leftmost_first():
    model = ReferenceBPE.train(["aa"], NUM_BYTES + 1, special_tokens=(), min_frequency=1)
    assert model.encode("aaa") == [256, byte_id("a")]  # the leftmost "aa" wins the tie


def test_special_tokens_come_first_and_never_merge():
    model = ReferenceBPE.train(["<s><s>"], 4 + NUM_BYTES + 2, special_tokens=("<pad>", "<s>", "</s>", "<mask>"),
                               min_frequency=1)
    assert model.tokens[:4] == [b"<pad>", b"<s>", b"</s>", b"<mask>"]
    assert model.tokens[4:4 + NUM_BYTES] == [bytes([b]) for b in range(NUM_BYTES)]
    assert 1 not in model.encode("<s>")


def test_char_level_keeps_frequent_characters_and_falls_back_to_bytes():
    model = ReferenceBPE.train(["가가가가 나"], 4 + NUM_BYTES + 10, level="char", min_frequency=2,
                               character_coverage=0.8)
    alphabet = model.tokens[4 + NUM_BYTES:model.base_size]
    assert alphabet == ["가".encode(), "▁".encode()]  # 4/7 then 6/7 of the characters: 80% is reached
    space_id = 4 + NUM_BYTES + 1
    assert model.encode("나") == [space_id] + [4 + byte for byte in "나".encode()]


def test_char_level_never_merges_across_groups():
    assert pretokenize("서울에서2024년 Seoul에서  x", "char") == ["▁서울에서", "2024", "년", "▁Seoul", "에서", "▁", "▁x"]
    assert pretokenize("", "char") == []


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="level"):
        pretokenize("x", "word")


def test_vocab_size_below_the_alphabet_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        ReferenceBPE.train(["abc"], 100)


@given(st.lists(st.text(max_size=30), min_size=1, max_size=5).filter(any), st.text(max_size=40))
def test_byte_level_round_trips(corpus, text):
    model = ReferenceBPE.train(corpus, 4 + NUM_BYTES + 20, min_frequency=1)
    assert model.decode_bytes(model.encode(text)) == text.encode("utf-8")
