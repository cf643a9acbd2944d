"""A pure-Python BPE, short and slow on purpose: the oracle the native core (fastlm._native) is tested against.

It follows the same contract (docs in the module `fastlm.tokenizer` and the native headers):

* ids 0..S-1 are the special tokens, S..S+255 the 256 single bytes (the base alphabet at byte level, the
  byte-fallback tokens at char level), then at char level the code points kept by character coverage, then one id
  per merge in rank order.
* Training counts pre-tokens ("words") once, then repeatedly merges the most frequent adjacent pair. Ties go to the
  pair with the smallest (left id, right id): this reproduces rustbpe's merges exactly (ordering ties by the
  pairs' bytes does not: it differs from rustbpe on the ko-en corpus within the first 50 merges).
* Encoding is tiktoken's rule: a pre-token that is itself a token is emitted whole; otherwise merge, again and
  again, the adjacent pair whose concatenated bytes have the lowest rank, leftmost on ties.

Recounting every pair after every merge keeps the code obviously right; it is fine for the small corpora of tests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import regex

# GPT-4's pre-split: contractions, letter runs (with one leading non-letter), numbers of 1-3 digits, punctuation
# runs, and the whitespace rules that keep a single space in front of the next word.
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
_CL100K = regex.compile(CL100K_PATTERN)

SPACE_MARK = "\u2581"  # '▁': how the char level writes a space inside a token, as sentencepiece does
# The char-level split as one regex (so the HF export can reuse it): an optional '▁' then a run of one group:
# Hangul letters, Han letters, other letters, numbers, or anything else but '▁'; a '▁' before a '▁' stands alone.
# Each letter takes the combining marks after it (\p{M}*), so Devanagari, Thai or NFD words stay whole; marks after
# anything but a letter are "anything else".
CHAR_SPLIT_PATTERN = (
    r"▁?(?:(?:(?=\p{L})\p{Hangul}\p{M}*)+|(?:(?=\p{L})\p{Han}\p{M}*)+|(?:(?!\p{Hangul}|\p{Han})\p{L}\p{M}*)+"
    r"|\p{N}+|[^\p{L}\p{N}▁]+)|▁"
)
_CHAR_SPLIT = regex.compile(CHAR_SPLIT_PATTERN)

LEVELS = ("byte", "char")
NUM_BYTES = 256


def pretokenize(text: str, level: str) -> list[str]:
    """Splits `text` into the pre-tokens that merges never cross; the native `pretokenize` must agree exactly."""
    if level == "byte":
        return _CL100K.findall(text)
    if level == "char":
        return _char_pretokenize(text)
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _char_pretokenize(text: str) -> list[str]:
    """Sentencepiece-style split: spaces become '▁' and one '▁' is prepended (the "dummy prefix"; an empty text
    stays empty), then CHAR_SPLIT_PATTERN, so merges never join two words nor cross a script or number boundary."""
    if not text:
        return []
    return _CHAR_SPLIT.findall(SPACE_MARK + text.replace(" ", SPACE_MARK))


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replaces every occurrence of `pair` in `ids`, scanning left to right without overlaps."""
    merged: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


@dataclass
class ReferenceBPE:
    """A BPE vocabulary with the id layout above; `train` learns one, `encode` applies it."""

    level: str
    tokens: list[bytes]                 # id -> the bytes it decodes to
    merges: list[tuple[int, int]]       # merges[k] creates id base_size + k
    num_special: int

    @property
    def base_size(self) -> int:
        return len(self.tokens) - len(self.merges)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        level: str = "byte",
        special_tokens: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<mask>"),
        min_frequency: int = 2,
        character_coverage: float = 0.9995,
    ) -> "ReferenceBPE":
        word_counts = Counter(piece for text in texts for piece in pretokenize(text, level))
        if not word_counts:
            raise ValueError("nothing to train on: the texts hold no text")
        num_special = len(special_tokens)
        tokens = [s.encode("utf-8") for s in special_tokens] + [bytes([b]) for b in range(NUM_BYTES)]
        alphabet = _alphabet(word_counts, character_coverage) if level == "char" else []
        tokens += [char.encode("utf-8") for char in alphabet]
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size must be at least {len(tokens)} (specials + 256 bytes + alphabet), "
                             f"got {vocab_size}")
        model = cls(level, tokens, [], num_special)
        char_ids = {char: num_special + NUM_BYTES + i for i, char in enumerate(alphabet)}
        words = [model._base_ids(word, char_ids) for word in word_counts]
        counts = list(word_counts.values())
        while len(tokens) < vocab_size:
            pair_counts: Counter[tuple[int, int]] = Counter()
            for ids, count in zip(words, counts):
                for pair in zip(ids, ids[1:]):
                    if model._mergeable(pair):
                        pair_counts[pair] += count
            if not pair_counts:
                break
            best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
            if pair_counts[best] < min_frequency:
                break
            new_id = len(tokens)
            tokens.append(tokens[best[0]] + tokens[best[1]])
            model.merges.append(best)
            words = [_merge_pair(ids, best, new_id) if len(ids) > 1 else ids for ids in words]
        return model

    @property
    def first_mergeable_id(self) -> int:
        """At char level byte-fallback tokens never merge: they stand for characters outside the alphabet."""
        return self.num_special if self.level == "byte" else self.num_special + NUM_BYTES

    def _mergeable(self, pair: tuple[int, int]) -> bool:
        return min(pair) >= self.first_mergeable_id

    def _base_ids(self, piece: str, char_ids: dict[str, int]) -> list[int]:
        """A pre-token as base-alphabet ids: its bytes, or (char level) its characters with byte fallback."""
        if self.level == "byte":
            return [self.num_special + b for b in piece.encode("utf-8")]
        ids: list[int] = []
        for char in piece:
            if char in char_ids:
                ids.append(char_ids[char])
            else:
                ids.extend(self.num_special + b for b in char.encode("utf-8"))
        return ids

    def _ranks(self) -> dict[bytes, int]:
        """bytes -> rank (the lowest id with those bytes), over every token that can take part in a merge."""
        ranks: dict[bytes, int] = {}
        for token_id in range(self.first_mergeable_id, len(self.tokens)):
            ranks.setdefault(self.tokens[token_id], token_id)
        return ranks

    def encode(self, text: str) -> list[int]:
        ranks = self._ranks()
        char_ids = {self.tokens[i].decode("utf-8"): i for i in range(self.num_special + NUM_BYTES, self.base_size)}
        ids: list[int] = []
        for piece in pretokenize(text, self.level):
            whole = ranks.get(piece.encode("utf-8"))
            ids += [whole] if whole is not None else self._merge_word(self._base_ids(piece, char_ids), ranks)
        return ids

    def _merge_word(self, word: list[int], ranks: dict[bytes, int]) -> list[int]:
        """Merges the adjacent pair whose joined bytes have the lowest rank, leftmost on ties, while one exists."""
        while True:
            ranked = [(ranks[joined], i) for i, (left, right) in enumerate(zip(word, word[1:]))
                      if self._mergeable((left, right)) and (joined := self.tokens[left] + self.tokens[right]) in ranks]
            if not ranked:
                return word
            rank, i = min(ranked)
            word[i:i + 2] = [rank]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The tokens' bytes back to back (at char level still with '▁' for spaces and the dummy prefix)."""
        return b"".join(self.tokens[i] for i in ids)


def _alphabet(word_counts: Counter[str], character_coverage: float) -> list[str]:
    """The most frequent characters (ties by code point) until their share of all occurrences reaches
    `character_coverage`; the rest go through byte fallback."""
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    total = sum(char_counts.values())
    alphabet: list[str] = []
    covered = 0
    for char, count in sorted(char_counts.items(), key=lambda item: (-item[1], ord(item[0]))):
        if covered >= character_coverage * total:
            break
        alphabet.append(char)
        covered += count
    return alphabet
