"""fastlm's tokenizer: the policy over the native BPE core (`fastlm._native`).

The native core keeps the hot loops (pre-split, counting, merging, encoding, decoding; the GIL released).
This module keeps the policy: levels, normalisation, special tokens, the file format, the HF and tiktoken exports.

Levels
    "byte": the 256 bytes are the base alphabet and text is pre-split with GPT-4's cl100k pattern; any string and
        any bytes round-trip (`decode_bytes(encode(b)) == b`).
    "char": the base alphabet is the code points kept by `character_coverage`; rarer ones are encoded as their UTF-8
        bytes with the 256 byte-fallback tokens <0x00>..<0xFF>. Spaces are written '▁' inside tokens and one '▁' is
        prepended (sentencepiece's "dummy prefix"), which `decode` removes again. Pre-tokens are an optional '▁'
        and a run of Hangul letters, Han letters, other letters, digits or anything else; a letter run keeps the
        combining marks that follow its letters, so Devanagari, Thai or NFD words stay whole (see
        csrc/bpe/pretokenize.h and `fastlm.reference_bpe.CHAR_SPLIT_PATTERN`).

Normalisation (char level only): `unicodedata.normalize(normalization, text)` (NFC by default, NFKC optional), then
'▁' (U+2581) becomes a space, since '▁' marks spaces. `decode(encode(s)) == normalize(s)`.
Both levels: lone surrogates (which UTF-8 cannot encode) become U+FFFD, as tiktoken does.
Invalid UTF-8: byte level takes any bytes; char-level training on files raises ValueError naming file:line.

Ids: 0..S-1 are the special tokens in the given order, S..S+255 the bytes, then (char level) the alphabet, then one
id per merge in rank order. Special-token strings inside text are plain text unless named in `allowed_special`;
special ids decode to their strings (at char level the text between them decodes run by run, each run with its own
dummy prefix, so that `decode(encode(s, allowed_special="all")) == s`).
Training ties: the highest pair count wins, then the pair with the smallest (left id, right id) (rustbpe's merges
exactly); `min_frequency` stops training once the best pair is rarer than that.

Unicode version: both pre-splits take their classes (\\p{L}, \\p{N}, \\p{M}, \\s, scripts) from the `regex` package's
Unicode tables (csrc/bpe/unicode_tables.h is generated from them). Peers with older tables split differently on code
points assigned in recent Unicode versions: U+A7CE is a letter for `regex` but unassigned for tiktoken 0.14 and HF
`tokenizers` 0.23, so "a" then U+A7CE is one pre-token for us and two for them (U+13717, new in Unicode 16, does the
same with peers on older tables). So ids equal theirs only on text whose code points their tables know (the tests
use code points assigned in Python's `unicodedata`). Normalisation uses Python's `unicodedata`.
"""

from __future__ import annotations

import base64
import itertools
import json
import numbers
import os
import re
import tempfile
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from fastlm import _native
from fastlm.files import respect_umask
from fastlm.progress import Progress
from fastlm.reference_bpe import CHAR_SPLIT_PATTERN, CL100K_PATTERN, LEVELS, NUM_BYTES, SPACE_MARK

DEFAULT_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
NORMALIZATIONS = ("nfc", "nfkc")
FILE_FORMAT = "fastlm-tokenizer"
FILE_VERSION = 1
TRAIN_BATCH_LINES = 4096  # lines handed to the native trainer per call: bounded memory, few GIL round trips
MAX_VOCAB_SIZE = 2**32  # native ids are uint32
MAX_MIN_FREQUENCY = 2**64 - 1  # native pair counts are uint64
MAX_THREADS = 1024  # far above any core count; more threads than this only fail to start
_FILE_CHECK_BYTES = 1 << 20  # how much of a file is decoded at a time to check that it needs no normalisation


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """`value` as an int, when it is an integer (numpy's included, bool not) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value!r}")
    return int(value)


def _check_iterable(value: object, argument: str, expected: str) -> None:
    """Rejects what is not an iterable, and a lone str or bytes (iterating it would give characters or ints)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{argument} must be {expected}, got {type(value).__name__}")


def _check_special_tokens(special_tokens: Iterable[str]) -> tuple[str, ...]:
    _check_iterable(special_tokens, "special_tokens", "an iterable of str")
    special_tokens = tuple(special_tokens)
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens must be non-empty strings, got {token!r}")
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"special_tokens must be valid Unicode (no lone surrogates), got {token!r}") from None
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must be unique, got {special_tokens!r}")
    return special_tokens


def _replace_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded: they become U+FFFD (surrogate pairs become their character)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_texts(texts: Sequence[object], argument: str, first_index: int = 0) -> None:
    for i, text in enumerate(texts, first_index):
        if not isinstance(text, str):
            raise TypeError(f"{argument}[{i}] must be str, got {type(text).__name__}")


def _normalizer(level: str, normalization: str) -> Callable[[str], str] | None:
    """The char level's normalisation (see the module docstring); the byte level takes text as it is (None)."""
    if level == "byte":
        return None
    form = normalization.upper()
    return lambda text: unicodedata.normalize(form, text).replace(SPACE_MARK, " ")


def _byte_to_unicode() -> dict[int, str]:
    """HF's (GPT-2's) byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(NUM_BYTES) if byte not in mapping)
    mapping.update({byte: chr(NUM_BYTES + k) for k, byte in enumerate(others)})
    return mapping


_BYTE_TO_UNICODE = _byte_to_unicode()


def _special_id_property(token: str, role: str) -> property:
    return property(lambda self: self._special_to_id.get(token), doc=f"The id of {token!r} ({role}), or None.")


class VocabSizeWarning(UserWarning):
    """Training stopped short of the vocab_size asked for: the corpus ran out of frequent enough pairs."""


class Tokenizer:
    """A trained BPE vocabulary at byte or char level; see the module docstring for the rules, including why ids
    can differ from tiktoken's and HF's on code points of recent Unicode versions (ours follow `regex`'s tables)."""

    def __init__(
        self,
        level: str,
        tokens: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
        normalization: str = "nfc",
    ):
        self.level = _check_choice("level", level, LEVELS)
        self.normalization = _check_choice("normalization", normalization, NORMALIZATIONS)
        self.special_tokens = _check_special_tokens(special_tokens)
        self._tokens = [bytes(token) for token in tokens]
        self._merges = [(int(left), int(right)) for left, right in merges]
        num_special = len(self.special_tokens)
        expected_prefix = [s.encode("utf-8") for s in self.special_tokens] + [bytes([b]) for b in range(NUM_BYTES)]
        if self._tokens[: len(expected_prefix)] != expected_prefix:
            raise ValueError(f"tokens must start with the special tokens {self.special_tokens!r} then the 256 single "
                             f"bytes, got {self._tokens[:num_special + 2]!r}...")
        self._native = _native.Model(level, self._tokens, self._merges, num_special)
        self._normalize = _normalizer(level, normalization)
        self._special_to_id = {token: i for i, token in enumerate(self.special_tokens)}
        self.special_ids = frozenset(self._special_to_id.values())

    # ---- training ---------------------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        files_or_iterable: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
        vocab_size: int = 32000,
        level: str = "byte",
        special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
        num_threads: int | None = None,
        character_coverage: float = 0.9995,
        normalization: str = "nfc",
        progress: bool = False,
    ) -> "Tokenizer":
        """Trains on a path, a list of paths (one sentence or document per line, read natively), or any iterable
        of str (streamed in batches, never held whole in Python). A list of str is a list of paths when an item is
        an existing file or every item looks like a file name (no whitespace; a '/' or an extension), so a mistyped
        path raises FileNotFoundError instead of becoming the training text; pass an iterator to train on such
        strings. A corpus with no text (empty files, empty strings) raises ValueError. `progress` reports the
        counting and the merges on stderr. Ctrl-C (KeyboardInterrupt) stops training within one merge."""
        _check_choice("level", level, LEVELS)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        special_tokens = _check_special_tokens(special_tokens)
        vocab_size = _check_int("vocab_size", vocab_size, 1, MAX_VOCAB_SIZE)
        min_frequency = _check_int("min_frequency", min_frequency, 1, MAX_MIN_FREQUENCY)
        if isinstance(character_coverage, bool) or not isinstance(character_coverage, numbers.Real):
            raise TypeError(f"character_coverage must be a float, got {type(character_coverage).__name__} "
                            f"{character_coverage!r}")
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage!r}")
        num_threads = _thread_count(num_threads)
        trainer = _native.Trainer(level, num_threads)
        paths = _as_paths(files_or_iterable)
        normalize = _normalizer(level, normalization)
        counting = Progress(f"tokenizer: counting {level}-level pre-tokens",
                            ("texts",) if paths is None else ("bytes",), enabled=progress)
        if paths is None:
            _add_texts(trainer, files_or_iterable, normalize, counting)
        elif not _add_files(trainer, paths, None if normalize is None else normalization, counting):
            # A file was not normalised yet (rare): count again, streaming such files through the normalisation.
            trainer = _native.Trainer(level, num_threads)
            for path in paths:
                if _needs_normalization(path, normalization):
                    _add_texts(trainer, _normalized_lines(path, normalize), None, None)
                else:
                    trainer.add_files([str(path)])
        counting.close()
        merging = Progress(f"tokenizer: merges toward vocab_size={vocab_size:,}", ("merges",), enabled=progress)
        tokens, merges = trainer.train(vocab_size, list(special_tokens), min_frequency, character_coverage,
                                       (lambda done: merging.reached(merges=done)) if progress else None)
        merging.close()
        if len(tokens) < vocab_size:
            warnings.warn(f"vocab_size={vocab_size} asked for, {len(tokens)} reached: no pair of tokens occurs "
                          f"min_frequency={min_frequency} times any more (train on more text or lower min_frequency)",
                          VocabSizeWarning, stacklevel=2)
        return cls(level, tokens, merges, special_tokens, normalization)

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode(self, text: str | bytes, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Token ids of `text`. Special-token strings are plain text unless named in `allowed_special` (an
        iterable of them, or "all"). At byte level `text` may also be bytes (any bytes, never special)."""
        if isinstance(text, str):
            if not allowed_special:  # the hot path: one native call
                return self._encode_plain(text)
            return self._encode_with_specials(text, self._allowed_special(allowed_special))
        if isinstance(text, (bytes, bytearray, memoryview)):
            if self.level != "byte":
                raise TypeError("text may be bytes only at byte level; char level needs str")
            return self._native.encode_bytes(bytes(text))
        raise TypeError(f"text must be str, got {type(text).__name__}")

    def _encode_with_specials(self, text: str, specials: re.Pattern) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(specials.split(text)):
            if i % 2:  # split() puts the matched specials at odd indices
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        try:
            return self._native.encode(text)
        except UnicodeEncodeError:
            return self._native.encode(_replace_surrogates(text))

    def _allowed_special(self, allowed_special: Iterable[str] | str) -> re.Pattern:
        """A pattern splitting text on the allowed special tokens (longest first); `allowed_special` not empty."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif isinstance(allowed_special, str):
            raise ValueError(f'allowed_special must be an iterable of special tokens or "all", got {allowed_special!r}')
        else:
            _check_iterable(allowed_special, "allowed_special", 'an iterable of special tokens or "all"')
            allowed = list(allowed_special)
            unknown = [token for token in allowed if not isinstance(token, str) or token not in self._special_to_id]
            if unknown:
                raise ValueError(f"allowed_special names {unknown!r}, which are not special tokens "
                                 f"(these are: {self.special_tokens!r})")
        if not allowed:  # an empty iterator: nothing to split on ("()" would match everywhere)
            return re.compile("(?!)")
        alternatives = "|".join(re.escape(token) for token in sorted(set(allowed), key=len, reverse=True))
        return re.compile(f"({alternatives})")

    def encode_batch(
        self,
        texts: Sequence[str],
        num_threads: int | None = None,
        allowed_special: Iterable[str] | str = (),
        return_numpy: bool = False,
    ) -> list[list[int]] | tuple[np.ndarray, np.ndarray]:
        """Encodes many texts on native threads. With `return_numpy`, returns (ids uint32, offsets int64) with
        ids[offsets[i]:offsets[i + 1]] the ids of texts[i]."""
        _check_iterable(texts, "texts", "an iterable of str")
        texts = list(texts)
        if allowed_special:
            _check_texts(texts, "texts")
            specials = self._allowed_special(allowed_special)
            batch = [self._encode_with_specials(text, specials) for text in texts]
            if not return_numpy:
                return batch
            offsets = np.zeros(len(batch) + 1, dtype=np.int64)
            np.cumsum([len(ids) for ids in batch], out=offsets[1:])
            return np.fromiter(itertools.chain.from_iterable(batch), dtype=np.uint32, count=offsets[-1]), offsets
        num_threads = _thread_count(num_threads)
        encode = self._native.encode_batch_flat if return_numpy else self._native.encode_batch
        try:
            if self._normalize is not None:
                texts = [self._normalize(text) for text in texts]
            return encode(texts, num_threads)
        except UnicodeEncodeError:
            return encode([_replace_surrogates(text) for text in texts], num_threads)
        except TypeError:
            _check_texts(texts, "texts")  # names the first item that is not a str
            raise

    # ---- decoding ---------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """The exact bytes of `ids` (byte level: any bytes that were encoded). Ids out of range raise ValueError."""
        return self._native.decode_bytes(ids)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (only possible for hand-made ids) become U+FFFD."""
        return self._native.decode(ids)

    def decode_batch(self, batch: Iterable[Sequence[int] | np.ndarray], num_threads: int | None = None) -> list[str]:
        """`[decode(ids) for ids in batch]`, decoded on native threads (None: all cores)."""
        _check_iterable(batch, "batch", "an iterable of id sequences")
        return self._native.decode_batch(batch, _thread_count(num_threads))

    # ---- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    pad_id = _special_id_property("<pad>", "padding")
    bos_id = _special_id_property("<s>", "start of sequence")
    eos_id = _special_id_property("</s>", "end of sequence")
    mask_id = _special_id_property("<mask>", "masked-token objective")

    def _token_string(self, token_id: int) -> str:
        """A token as HF `tokenizers` writes it: byte level in GPT-2's byte alphabet ('Ġ' for a space); char
        level with '▁' for a space and byte-fallback tokens as <0xAB>."""
        if token_id < len(self.special_tokens):
            return self.special_tokens[token_id]
        token = self._tokens[token_id]
        if self.level == "byte":
            return "".join(_BYTE_TO_UNICODE[byte] for byte in token)
        if token_id < len(self.special_tokens) + NUM_BYTES:
            return f"<0x{token[0]:02X}>"
        return token.decode("utf-8")

    @cached_property
    def _token_strings(self) -> list[str]:
        """Every token's string, made on first use: training and encoding never need them."""
        return [self._token_string(i) for i in range(self.vocab_size)]

    @cached_property
    def _string_to_id(self) -> dict[str, int]:
        return {string: i for i, string in reversed(list(enumerate(self._token_strings)))}

    def id_to_token(self, token_id: int) -> str:
        """The token's string, as HF `tokenizers` names it (see `_token_string`)."""
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
            raise TypeError(f"token_id must be an int, got {type(token_id).__name__} {token_id!r}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id {token_id!r} is out of range for vocab_size {self.vocab_size}")
        return self._token_strings[token_id]

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string as `id_to_token` writes it, or None if there is no such token."""
        if not isinstance(token, str):
            raise TypeError(f"token must be str, got {type(token).__name__}")
        return self._string_to_id.get(token)

    def __reduce__(self):
        """Pickles by value (the native model is rebuilt), e.g. for DataLoader worker processes."""
        return type(self), (self.level, self._tokens, self._merges, self.special_tokens, self.normalization)

    def __repr__(self) -> str:
        return (f"Tokenizer(level={self.level!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens!r}, normalization={self.normalization!r})")

    # ---- files ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes one JSON file atomically (a temporary file renamed over `path`): {"format": "fastlm-tokenizer",
        "version": 1, "level", "normalization", "special_tokens", "vocab_size", "tokens": the base64 of each id's
        bytes, "merges": [[left_id, right_id], ...] (merge k creates id vocab_size - len(merges) + k)}."""
        record = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "level": self.level,
            "normalization": self.normalization,
            "special_tokens": list(self.special_tokens),
            "vocab_size": self.vocab_size,
            "tokens": [base64.b64encode(token).decode("ascii") for token in self._tokens],
            "merges": [list(pair) for pair in self._merges],
        }
        _write_atomically(Path(path), json.dumps(record, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Reads a file written by `save`; a corrupt, truncated or foreign file raises ValueError naming it."""
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert; RecursionError deep nesting.
        except (ValueError, RecursionError) as error:
            raise ValueError(f"{path}: not a fastlm tokenizer file (truncated or corrupt JSON: "
                             f"{_shortened(str(error))})") from None
        try:
            return cls(**_parse_record(record))
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise ValueError(f"{path}: invalid fastlm tokenizer file: {_shortened(str(error))}") from None

    # ---- exports ----------------------------------------------------------------------------------------------
    def save_huggingface(self, path: str | os.PathLike) -> None:
        """Writes a tokenizer.json that HF `tokenizers.Tokenizer.from_file` loads and that encodes like us.

        Both levels give identical ids (tested on the held-out split and on arbitrary text). Byte level: the cl100k
        Split, then ByteLevel. Char level: our normalisation (NFC/NFKC, prepend '▁', spaces to '▁'), our split
        (the same regex), byte fallback. `ignore_merges` is tiktoken's whole-pre-token-first rule. Differences
        remain possible where HF's Unicode tables (normalisation, Oniguruma's classes) are of another Unicode
        version than Python's `unicodedata` and `regex`; HF also always matches special tokens in the text."""
        added_tokens = [
            {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, token in enumerate(self.special_tokens)
        ]
        model = {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": self.level == "char",
            "ignore_merges": True,
            # The specials are in the vocab too, or HF would give them new ids after it; no merge reaches them.
            "vocab": {string: i for i, string in enumerate(self._token_strings)},
            "merges": [[self._token_strings[left], self._token_strings[right]] for left, right in self._merges],
        }
        if self.level == "byte":
            normalizer = None
            pre_tokenizer = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]}
            decoder = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        else:
            # Our normalisation, then the native marking: the dummy-prefix '▁', and '▁' for every space.
            normalizer = {"type": "Sequence", "normalizers": [
                {"type": self.normalization.upper()},
                {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "},
                {"type": "Prepend", "prepend": SPACE_MARK},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK},
            ]}
            pre_tokenizer = {"type": "Split", "pattern": {"Regex": CHAR_SPLIT_PATTERN}, "behavior": "Isolated",
                             "invert": False}
            # The native decode: '▁' to spaces, byte-fallback tokens to bytes, and the dummy prefix's space dropped.
            decoder = {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]}
        document = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": decoder, "model": model,
        }
        _write_atomically(Path(path), json.dumps(document, ensure_ascii=False))

    def to_tiktoken(self):
        """A `tiktoken.Encoding` with our ids as its ranks (byte level only): it encodes to the same ids."""
        import tiktoken

        if self.level != "byte":
            raise ValueError(f"to_tiktoken needs a byte-level tokenizer, this one is level={self.level!r}")
        num_special = len(self.special_tokens)
        return tiktoken.Encoding(
            name=f"fastlm-byte-{self.vocab_size}",
            pat_str=CL100K_PATTERN,
            mergeable_ranks={self._tokens[i]: i for i in range(num_special, self.vocab_size)},
            special_tokens=dict(self._special_to_id),
        )


_RECORD_FIELDS = ("level", "normalization", "special_tokens", "vocab_size", "tokens", "merges")


def _parse_record(record: object) -> dict:
    """Checks a saved record's shape; the native Model then checks that the merges fit the tokens."""
    if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
        raise ValueError(f'"format" must be {FILE_FORMAT!r}')
    if record.get("version") != FILE_VERSION:
        raise ValueError(f'"version" must be {FILE_VERSION}, got {record.get("version")!r}')
    missing = [field for field in _RECORD_FIELDS if field not in record]
    if missing:
        raise ValueError(f"missing fields {missing}")
    tokens = record["tokens"]
    merges = record["merges"]
    if not isinstance(tokens, list) or len(tokens) != record["vocab_size"]:
        raise ValueError(f'"tokens" must list vocab_size={record["vocab_size"]!r} tokens')
    if not isinstance(merges, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(type(i) is int and 0 <= i < len(tokens) for i in pair)
        for pair in merges
    ):
        raise ValueError('"merges" must be a list of [left_id, right_id] pairs of ids below vocab_size')
    try:
        token_bytes = [base64.b64decode(token, validate=True) for token in tokens]
    except (TypeError, ValueError):
        raise ValueError('"tokens" must be base64 strings') from None
    return {
        "level": record["level"],
        "tokens": token_bytes,
        "merges": [tuple(pair) for pair in merges],
        "special_tokens": record["special_tokens"],
        "normalization": record["normalization"],
    }


def _shortened(message: str, limit: int = 500) -> str:
    """An error message cut to `limit` characters: a hostile file's giant strings must not flood the terminal."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message)} characters in all)"


def _write_atomically(path: Path, text: str) -> None:
    """A crash mid-write leaves the old file (or none), never a truncated one."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path to write")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        respect_umask(descriptor)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _thread_count(num_threads: int | None) -> int:
    """None means all cores (0 to the native side)."""
    if num_threads is None:
        return 0
    return _check_int("num_threads", num_threads, 1, MAX_THREADS)


def _as_paths(files_or_iterable: object) -> list[Path] | None:
    """The files to train on, or None when the argument is an iterable of texts. A str or PathLike is a path; so
    is a list or tuple of them when any item is a PathLike or an existing file, or when every item looks like a
    file name (then all must be files: a mistyped path must not silently become the training text)."""
    if isinstance(files_or_iterable, (str, os.PathLike)):
        candidates = [files_or_iterable]
    elif isinstance(files_or_iterable, (list, tuple)) and (
        any(isinstance(item, os.PathLike) or (isinstance(item, str) and os.path.isfile(item))
            for item in files_or_iterable)
        or (files_or_iterable and all(_looks_like_a_file_name(item) for item in files_or_iterable))
    ):
        candidates = list(files_or_iterable)
    else:
        return None
    for candidate in candidates:
        if not isinstance(candidate, (str, os.PathLike)) or not os.path.isfile(candidate):
            raise FileNotFoundError(f"files_or_iterable names {candidate!r}, which is not a file")
    return [Path(candidate) for candidate in candidates]


def _looks_like_a_file_name(item: object) -> bool:
    """A str without whitespace that holds a path separator or ends in a file extension, unlike a sentence."""
    return (isinstance(item, str) and not any(char.isspace() for char in item)
            and ("/" in item or os.sep in item or Path(item).suffix[1:].isalpha()))


def _line_aligned_blocks(file) -> Iterable[bytes]:
    """A binary file in blocks of whole lines, so that no character or combining sequence is cut in two."""
    carry = b""
    while block := file.read(_FILE_CHECK_BYTES):
        block = carry + block
        cut = block.rfind(b"\n") + 1
        yield block[:cut]
        carry = block[cut:]
    yield carry


def _needs_normalization(path: Path, normalization: str) -> bool:
    """Whether a file must pass through Python's normalisation before char-level counting; files that are
    already normalised (the usual case) go to the fast native reader. Invalid UTF-8 also goes native, which
    raises ValueError naming file:line."""
    form = normalization.upper()
    with open(path, "rb") as file:
        for block in _line_aligned_blocks(file):
            if block.isascii():  # ASCII is normalised in every form and has no '▁'
                continue
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError:
                return False
            if SPACE_MARK in text or not unicodedata.is_normalized(form, text):
                return True
    return False


def _add_files(trainer, paths: list[Path], normalization: str | None, progress: Progress) -> bool:
    """Counts files natively. At char level (`normalization` given) it checks meanwhile, on another core, that
    they need no normalisation, and returns False if one does: the raw text was counted and must be counted again."""
    names = [str(path) for path in paths]
    if normalization is None:
        trainer.add_files(names, lambda done: progress.reached(bytes=done))
        return True
    stop = threading.Event()  # set when the main thread is interrupted: the counting thread stops at its next block

    def report(done: int) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        progress.reached(bytes=done)

    with ThreadPoolExecutor(max_workers=1) as pool:
        counting = pool.submit(trainer.add_files, names, report)
        try:
            normalized = not any(_needs_normalization(path, normalization) for path in paths)
            counting.result()
        except BaseException:
            stop.set()
            raise
    return normalized


def _normalized_lines(path: Path, normalize: Callable[[str], str]) -> Iterable[str]:
    """The lines of a file (without "\n" or "\r\n", as the native reader), normalised."""
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid UTF-8 at byte {error.start + 1} of the line "
                                 "(char-level training needs UTF-8)") from None
            yield normalize(text.removesuffix("\n").removesuffix("\r"))


def _add_texts(trainer, texts: Iterable[str], normalize: Callable[[str], str] | None,
               progress: Progress | None) -> None:
    """Streams texts to the native trainer in batches, checking types and replacing lone surrogates."""
    _check_iterable(texts, "files_or_iterable", "a path, a list of paths or an iterable of str")
    iterator = iter(texts)
    start = 0
    while batch := list(itertools.islice(iterator, TRAIN_BATCH_LINES)):
        _check_texts(batch, "files_or_iterable", start)
        if normalize is not None:
            batch = [normalize(text) for text in batch]
        try:
            trainer.add_texts(batch)
        except UnicodeEncodeError:
            trainer.add_texts([_replace_surrogates(text) for text in batch])
        start += len(batch)
        if progress is not None:
            progress.update(texts=len(batch))


def demo() -> None:
    """Trains both levels on the bilingual sample shipped with fastlm and shows what they do."""
    sample = Path(__file__).resolve().parent / "demo_data"
    files = {language: sample / f"sample.{language}" for language in ("ko", "en")}
    sentences = ("오늘 저녁에 친구와 함께 영화를 봤어요.", "We met at 7:30 and walked to the station.")
    for level in LEVELS:
        tokenizer = Tokenizer.train(list(files.values()), vocab_size=1000, level=level)
        num_special, num_merges = len(tokenizer.special_tokens), len(tokenizer._merges)
        print(f"{level} level: vocab_size={tokenizer.vocab_size} = {num_special} special + "
              f"{tokenizer.vocab_size - num_special - num_merges} base + {num_merges} merges")
        for language, path in files.items():
            lines = path.read_text(encoding="utf-8").splitlines()
            ids, _ = tokenizer.encode_batch(lines, return_numpy=True)
            fallback = int(((ids >= num_special) & (ids < num_special + NUM_BYTES)).sum()) if level == "char" else 0
            print(f"  sample.{language}: {len(ids) / len(lines):.1f} tokens per sentence"
                  + (f", {fallback} byte-fallback tokens" if level == "char" else ""))
        for sentence in sentences:
            ids = tokenizer.encode(sentence)
            pieces = [tokenizer.id_to_token(i) for i in ids]
            print(f"  {sentence!r}\n    -> {len(ids)} ids {ids}\n    -> {pieces}\n    -> {tokenizer.decode(ids)!r}")
