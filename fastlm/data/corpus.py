"""Prepared (tokenised) corpora on disk, opened as memory maps.

Layout of a prepared corpus directory (written by `fastlm.data.prepare`):
- `shard-00000.ids`: the token ids of the shard's sentences back to back, raw little-endian `uint16` when the
  vocabulary fits (vocab_size <= 65536), else `uint32`;
- `shard-00000.offsets`: raw int64, one more than the shard's sentences: sentence j is ids[offsets[j]:offsets[j+1]];
- `shard-00000.json`: the shard's record {"name", "num_sentences", "num_tokens", "input_sha256"}, written once its
  files are complete (what a resumed `prepare` relies on);
- `meta.json`, written last, so its presence means the corpus is complete: {"format": "fastlm-corpus", "version",
  "tokenizer_sha256", "vocab_size", "dtype", "num_sentences", "num_tokens", "shards": [shard records], "source",
  "skipped", "add_bos_eos", "shard_size", "special_token_ids": {"pad_id", "bos_id", "eos_id", "mask_id"}};
- `prepare.json`: the settings `prepare` was run with.
A parallel corpus is two such directories, `src/` and `tgt/`, with the same number of sentences, under one directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "fastlm-corpus"
VERSION = 1
META_FILE = "meta.json"
SOURCE_DIR, TARGET_DIR = "src", "tgt"
SPECIAL_ID_NAMES = ("pad_id", "bos_id", "eos_id", "mask_id")  # the tokenizer's, recorded by prepare


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id below vocab_size: half the disk and page cache of uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}: expected a positive vocabulary size")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_sha256(tokenizer) -> str:
    """The SHA-256 of the tokenizer's saved file: what a prepared corpus records to be matched with its tokenizer."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "tokenizer.json"
        tokenizer.save(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus_fingerprint(path: str | os.PathLike | None) -> str | None:
    """What identifies the prepared corpus (plain or parallel) at `path` wherever it lies, None for no corpus: a hash
    of its shard records, which hold their counts and the SHA-256 of their input sentences. A run records it, so
    that a resume tells data that moved (allowed) from other data (refused)."""
    if path is None:
        return None
    path = Path(path)
    metas = [path / META_FILE] if (path / META_FILE).is_file() else [path / side / META_FILE
                                                                       for side in (SOURCE_DIR, TARGET_DIR)]
    digest = hashlib.sha256()
    for meta in metas:
        digest.update(json.dumps(_read_meta(meta.parent)["shards"], sort_keys=True).encode())
    return digest.hexdigest()[:16]  # 64 bits tell corpora apart and keep a refusal readable


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_files(directory: Path, name: str) -> tuple[Path, Path]:
    """(ids file, offsets file) of a shard."""
    return directory / f"{name}.ids", directory / f"{name}.offsets"


def read_shard_offsets(directory: Path, name: str, dtype: np.dtype) -> np.ndarray:
    """The shard's offsets, checked against its ids file (the size a crash or truncation would break)."""
    ids_path, offsets_path = shard_files(directory, name)
    for path in (ids_path, offsets_path):
        if not path.is_file():
            raise ValueError(f"{path}: shard file missing")
    if offsets_path.stat().st_size % 8 or offsets_path.stat().st_size < 8:
        raise ValueError(f"{offsets_path}: size {offsets_path.stat().st_size} is not a positive multiple of 8 bytes")
    offsets = np.fromfile(offsets_path, dtype="<i8")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        decreasing = np.flatnonzero(np.diff(offsets) < 0)
        where = f"offsets[0] = {offsets[0]}" if offsets[0] != 0 else (
            f"offsets[{decreasing[0] + 1}] = {offsets[decreasing[0] + 1]} < offsets[{decreasing[0]}] = "
            f"{offsets[decreasing[0]]}")
        raise ValueError(f"{offsets_path}: offsets must start at 0 and never decrease ({where})")
    expected = int(offsets[-1]) * dtype.itemsize
    if ids_path.stat().st_size != expected:
        raise ValueError(
            f"{ids_path}: size {ids_path.stat().st_size} bytes, expected {expected} "
            f"({offsets[-1]} {dtype.name} ids per {offsets_path.name})"
        )
    return offsets


def check_ids_below(ids: np.ndarray, vocab_size: int, path: Path) -> None:
    """Raises ValueError if an id of `ids` (a shard's memory map) is >= vocab_size: one vectorised pass over the
    file (a few GB/s from the page cache), skipped when the dtype cannot hold such an id."""
    if len(ids) and vocab_size <= np.iinfo(ids.dtype).max:
        largest = int(ids.max())
        if largest >= vocab_size:
            position = int(np.argmax(ids >= vocab_size))
            raise ValueError(f"{path}: id {largest} (first bad id at token {position}) is >= vocab_size={vocab_size} "
                             f"of {META_FILE}: the shard does not belong to this corpus's tokenizer")


class TokenizedCorpus:
    """A prepared corpus: `len(corpus)` sentences, `corpus[i]` the ids of sentence i (a zero-copy view of the
    memory map), `lengths` and `offsets` over the whole corpus.

    Opening checks what a damaged or hand-edited corpus could get wrong, so that training never reads outside a
    shard or feeds the model an id outside its embedding table: meta.json's keys, types and values (dtype fits the
    vocab, special ids inside it, shard names as `prepare` writes them); each shard's offsets (start at 0, never
    decrease, end at the ids file's size); the counts of meta.json against the files; and every id < vocab_size
    (`check_ids_below`, one vectorised pass over the ids)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokenizer_sha256: str = self.meta["tokenizer_sha256"]
        self.add_bos_eos: bool = self.meta["add_bos_eos"]  # stored sentences already wrapped as <s> ... </s>
        # The tokenizer's ids (None where it has no such token), so batch sources need no tokenizer.
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (
            self.meta["special_token_ids"].get(name) for name in SPECIAL_ID_NAMES
        )

        self._shard_ids: list[np.ndarray] = []
        offsets = [np.zeros(1, dtype=np.int64)]
        for shard in self.meta["shards"]:
            shard_offsets = read_shard_offsets(self.path, shard["name"], self.dtype)
            if len(shard_offsets) - 1 != shard["num_sentences"] or shard_offsets[-1] != shard["num_tokens"]:
                raise ValueError(
                    f"{self.path / META_FILE}: shard {shard['name']} should hold {shard['num_sentences']} sentences "
                    f"and {shard['num_tokens']} tokens, its files hold {len(shard_offsets) - 1} and {shard_offsets[-1]}"
                )
            ids_path = shard_files(self.path, shard["name"])[0]
            # np.memmap refuses empty files; an empty shard is simply an empty array.
            ids = np.memmap(ids_path, dtype=self.dtype, mode="r") if shard["num_tokens"] else np.empty(0, self.dtype)
            check_ids_below(ids, self.vocab_size, ids_path)
            self._shard_ids.append(ids)
            offsets.append(shard_offsets[1:] + offsets[-1][-1])
        self.offsets = np.concatenate(offsets)  # (num_sentences + 1,) into the concatenation of all shards
        self.lengths = np.diff(self.offsets)
        shard_first_sentence = np.cumsum([0] + [shard["num_sentences"] for shard in self.meta["shards"][:-1]])
        self._shard_first_token = self.offsets[shard_first_sentence]
        if len(self) != self.meta["num_sentences"] or self.offsets[-1] != self.meta["num_tokens"]:
            raise ValueError(
                f"{self.path / META_FILE}: num_sentences={self.meta['num_sentences']}, "
                f"num_tokens={self.meta['num_tokens']}, but the shards hold {len(self)} and {self.offsets[-1]}"
            )

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sentence index={index} out of range for a corpus of {len(self)} sentences")
        index %= len(self)
        return self.tokens(int(self.offsets[index]), int(self.offsets[index + 1]))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Ids [start, stop) of the concatenation of all sentences: a view within one shard, a copy across shards."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}]")
        first = int(np.searchsorted(self._shard_first_token, start, side="right")) - 1
        pieces = []
        while start < stop or not pieces:
            shard_start = int(self._shard_first_token[first])
            shard = self._shard_ids[first]
            piece = shard[start - shard_start:min(stop - shard_start, len(shard))]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def check_tokenizer(self, tokenizer) -> None:
        """Raises ValueError unless this corpus was prepared with exactly this tokenizer."""
        actual = tokenizer_sha256(tokenizer)
        # The vocab sizes as well: a meta.json edited to a larger vocab_size would let larger ids through.
        if actual != self.tokenizer_sha256 or tokenizer.vocab_size != self.vocab_size:
            raise ValueError(
                f"{self.path}: prepared with tokenizer sha256={self.tokenizer_sha256[:12]}... (vocab_size="
                f"{self.vocab_size}), but the tokenizer given has sha256={actual[:12]}... (vocab_size="
                f"{tokenizer.vocab_size}): prepare the corpus again with this tokenizer"
            )

    def __reduce__(self):
        # Pickling (e.g. into DataLoader workers) re-opens the memory maps instead of copying them.
        return type(self), (self.path,)

    def __repr__(self) -> str:
        return f"TokenizedCorpus({str(self.path)!r}, sentences={len(self)}, tokens={self.num_tokens})"


class ParallelCorpus:
    """A prepared parallel corpus: `src` and `tgt` TokenizedCorpus with the same number of sentences."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.src = TokenizedCorpus(self.path / SOURCE_DIR)
        self.tgt = TokenizedCorpus(self.path / TARGET_DIR)
        if len(self.src) != len(self.tgt):
            raise ValueError(
                f"{self.path}: {SOURCE_DIR}/ has {len(self.src)} sentences, {TARGET_DIR}/ has {len(self.tgt)}"
            )

    def __len__(self) -> int:
        return len(self.src)

    def __repr__(self) -> str:
        return f"ParallelCorpus({str(self.path)!r}, pairs={len(self)})"


_META_KEYS = {
    "format": str, "version": int, "tokenizer_sha256": str, "vocab_size": int, "dtype": str, "num_sentences": int,
    "num_tokens": int, "shards": list, "add_bos_eos": bool, "special_token_ids": dict,
}


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing: {directory} is not a prepared corpus (or `prepare` did not finish)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format={meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: version={meta.get('version')!r}, expected {VERSION}")
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: {key}={meta.get(key)!r}, expected a {kind.__name__}")
    if meta["vocab_size"] < 1 or meta["dtype"] != dtype_for_vocab(meta["vocab_size"]).name:
        raise ValueError(f"{path}: dtype={meta['dtype']!r} with vocab_size={meta['vocab_size']}, expected a positive "
                         f"vocab_size and the dtype prepare picks for it")
    for name, value in meta["special_token_ids"].items():
        if value is not None and (not isinstance(value, int) or not 0 <= value < meta["vocab_size"]):
            raise ValueError(f"{path}: special_token_ids[{name!r}]={value!r}, expected an id in "
                             f"[0, {meta['vocab_size']}) or null")
    for index, shard in enumerate(meta["shards"]):
        # The name becomes a file path: only the names prepare writes, so that meta.json cannot point elsewhere.
        if not isinstance(shard, dict) or shard.get("name") != shard_name(index) or any(
                not isinstance(shard.get(key), int) or isinstance(shard.get(key), bool) or shard[key] < 0
                for key in ("num_sentences", "num_tokens")):
            raise ValueError(f"{path}: shards[{index}]={shard!r}, expected {{'name': {shard_name(index)!r}, "
                             "'num_sentences': int >= 0, 'num_tokens': int >= 0, ...}")
    return meta
