"""Hypothesis strategies for tokenizer tests: arbitrary Unicode plus alphabets aimed at the pre-split's corners."""

from hypothesis import strategies as st

KOREAN = st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)
ASCII = st.characters(max_codepoint=0x7F)
# Whitespace of every kind, contraction letters, digits of several scripts, combining marks (alone and after
# Devanagari, Thai and Tamil letters), emoji with modifiers and joiners, controls, the '▁' space mark, and the
# characters of the special tokens.
TRICKY = st.sampled_from(
    list(" \t\n\r\x0b\x0c\x85\u00a0\u2009\u3000'sSdDtTmMlLrReEvV0123456789\u0663\u2460\u00bd\u0301\u0308\u302e"
         "e\uff21\u6f22\u5b57\U0001f600\U0001f44d\U0001f3fd\u200d!?.,-_\"()#\x00\x1b\u2581<>/")
    + ["\r\n", "<s>", "</s>", "'ll", "'S", "\u0915\u093f", "\u094d", "\u0e01\u0e34", "\u0b9f\u0bcd"]
)
PIECES = st.one_of(KOREAN, TRICKY, ASCII)


def joined(max_pieces: int | None = None) -> st.SearchStrategy[str]:
    return st.lists(PIECES, max_size=max_pieces).map("".join)


texts = st.one_of(st.text(), joined())
# Text of code points assigned in Python's `unicodedata` (Unicode 14 on Python 3.11; hypothesis takes its categories
# from there): HF and tiktoken have older Unicode tables than `regex`, so only on these do their splits equal ours.
assigned_texts = st.one_of(st.text(st.characters(exclude_categories=("Cs", "Cn"))), joined())
short_texts = joined(max_pieces=20)
