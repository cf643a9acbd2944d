"""`prepare`: tokenise a text corpus into a prepared corpus directory (layout: fastlm.data.corpus).

- All cores: chunks of sentences go to the native `Tokenizer.encode_batch(..., return_numpy=True)`, which splits
  them over its threads and releases the GIL, so the next chunk is read while one is encoded.
- Deterministic: shard k holds input sentences [k * shard_size, (k + 1) * shard_size); bytes do not depend on the
  number of threads.
- Resumable: each shard file is written under a temporary name and renamed when complete, then the shard's record
  `shard-00000.json` (its counts and the SHA-256 of its input sentences) marks it finished; a re-run re-reads the
  input, checks each finished shard's input against its record and tokenises only the unfinished shards.
  `meta.json` is written last.
- Never silently stale: `prepare.json` records what the corpus is made from, the input files (absolute path, size,
  SHA-256) and the settings (tokenizer hash, options). A re-run with the same record resumes an unfinished corpus
  and leaves a finished one as it is (sentences from an iterable rather than files are read again and compared
  with the shards' input hashes); anything else is an error, unless `overwrite=True` (`--overwrite`), which
  removes the corpus's own files, and only those, before preparing anew. A run that finished no shard protects
  nothing: the next run replaces what it left, whatever its inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import count, islice
from pathlib import Path

import numpy as np

from fastlm.data.corpus import (
    FORMAT, META_FILE, SOURCE_DIR, SPECIAL_ID_NAMES, TARGET_DIR, VERSION, ParallelCorpus, TokenizedCorpus,
    dtype_for_vocab, read_shard_offsets, shard_files, shard_name, tokenizer_sha256,
)
from fastlm.progress import Progress
from fastlm.data.readers import Reader, TextLines

# ~1M sentences a shard: ~25M tokens (~50 MB as uint16) on sentence-level corpora; few files, cheap to redo.
DEFAULT_SHARD_SIZE = 1 << 20
# Sentences per encode_batch call: enough work for every core, little memory held in Python strings.
ENCODE_CHUNK = 16384
SETTINGS_FILE = "prepare.json"
# Every file a prepared corpus consists of, finished or in progress: what overwrite=True removes, and nothing else.
CORPUS_FILE = re.compile(r"^(shard-\d{5,}\.(ids|offsets|json)|meta\.json|prepare\.json)(\.tmp)?$")
# What a run leaves once it has finished something: a shard's record, or the corpus's meta.json.
_FINISHED = re.compile(r"^(shard-\d{5,}\.json|meta\.json)$")


def prepare_corpus(
    inputs: str | os.PathLike | list | tuple | Iterable[str], tokenizer, out_dir: str | os.PathLike, *,
    shard_size: int = DEFAULT_SHARD_SIZE, num_threads: int | None = None, add_bos_eos: bool = False,
    progress: bool = True, overwrite: bool = False,
) -> TokenizedCorpus:
    """Tokenises sentences into the prepared corpus `out_dir` and returns it opened.

    `inputs`: a path or a list/tuple of paths (plain text, one sentence per line; see `TextLines`), or any other
    iterable of sentences (a `Reader`, a generator, `iter(list_of_sentences)`). `add_bos_eos` stores every sentence
    as <s> ... </s>; the batch sources add those markers themselves, so the default stores bare sentences.
    `overwrite=True` replaces a corpus that `out_dir` holds from other inputs or settings (an error otherwise).
    """
    paths = _input_paths(inputs)
    reader = TextLines(*paths) if paths is not None else inputs
    if getattr(reader, "parallel", False):
        raise ValueError(f"prepare_corpus inputs={reader!r}: yields sentence pairs; use prepare_parallel_corpus")
    _prepare(((sentence,) for sentence in reader), reader, tokenizer, Path(out_dir), [Path(out_dir)],
             shard_size=shard_size, num_threads=num_threads, add_bos_eos=add_bos_eos, progress=progress,
             overwrite=overwrite)
    return TokenizedCorpus(out_dir)


def prepare_parallel_corpus(
    pairs: Iterable[tuple[str, str]], tokenizer, out_dir: str | os.PathLike, *,
    shard_size: int = DEFAULT_SHARD_SIZE, num_threads: int | None = None, add_bos_eos: bool = False,
    progress: bool = True, overwrite: bool = False,
) -> ParallelCorpus:
    """Tokenises (source, target) pairs (e.g. a `ParallelLines`, `TsvPairs` or `AihubPairs` reader) into
    `out_dir/src` and `out_dir/tgt`, one shared tokenizer, and returns the opened `ParallelCorpus`."""
    out_dir = Path(out_dir)
    _prepare(pairs, pairs, tokenizer, out_dir, [out_dir / SOURCE_DIR, out_dir / TARGET_DIR], shard_size=shard_size,
             num_threads=num_threads, add_bos_eos=add_bos_eos, progress=progress, overwrite=overwrite)
    return ParallelCorpus(out_dir)


def _input_paths(inputs) -> list | None:
    """The paths in `inputs` (a path, or a list/tuple of paths), or None for any other iterable of sentences."""
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(item, (str, os.PathLike)) for item in inputs):
        return list(inputs)
    return None


def _prepare(rows: Iterable[tuple[str, ...]], source, tokenizer, out_dir: Path, out_dirs: list[Path], *,
             shard_size: int, num_threads: int | None, add_bos_eos: bool, progress: bool, overwrite: bool) -> None:
    """Writes column c of every row to the corpus out_dirs[c] (out_dir or its src/ and tgt/), shard by shard."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: expected a positive number of sentences per shard")
    special_token_ids = {name: getattr(tokenizer, name) for name in SPECIAL_ID_NAMES}
    bos_id, eos_id = special_token_ids["bos_id"], special_token_ids["eos_id"]
    if add_bos_eos and (bos_id is None or eos_id is None):
        raise ValueError("add_bos_eos=True needs a tokenizer with <s> and </s> special tokens")
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    settings = {"tokenizer_sha256": tokenizer_sha256(tokenizer), "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name, "shard_size": shard_size, "add_bos_eos": add_bos_eos,
                "special_token_ids": special_token_ids, "inputs": _input_files(source)}
    if overwrite:
        for directory in (out_dir, out_dir / SOURCE_DIR, out_dir / TARGET_DIR):
            _remove_corpus_files(directory)
    for directory in out_dirs:
        directory.mkdir(parents=True, exist_ok=True)
        _keep_settings(directory, settings)
    if all((directory / META_FILE).is_file() for directory in out_dirs):
        if settings["inputs"] is None:  # no files to identify the sentences by: compare them with the shards
            _check_same_sentences(iter(rows), out_dirs[0], shard_size)
        return

    encode = partial(_encode_columns, tokenizer, num_threads=num_threads, num_columns=len(out_dirs),
                     markers=(bos_id, eos_id) if add_bos_eos else None)
    bar = Progress(f"prepare {out_dirs[0].parent if len(out_dirs) > 1 else out_dirs[0]}", ("sentences", "tokens"),
                   enabled=progress)
    shards = _write_shards(iter(rows), encode, out_dirs, shard_size=shard_size, dtype=dtype,
                           vocab_size=tokenizer.vocab_size, progress=bar)
    bar.close()
    if not shards[0]:
        raise ValueError(f"prepare inputs={source!r}: no sentences to prepare")
    description = repr(source) if isinstance(source, Reader) else type(source).__name__
    skipped = source.skipped if isinstance(source, Reader) else 0
    for directory, shard_list in zip(out_dirs, shards):
        meta = {"format": FORMAT, "version": VERSION, **settings,
                "num_sentences": sum(shard["num_sentences"] for shard in shard_list),
                "num_tokens": sum(shard["num_tokens"] for shard in shard_list),
                "shards": shard_list, "source": description, "skipped": skipped}
        _write_json_atomically(directory / META_FILE, meta)


def _encode_columns(tokenizer, chunk: list[tuple[str, ...]], *, num_threads: int | None, num_columns: int,
                    markers: tuple[int, int] | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(flat ids, offsets) per column of the chunk's rows, each sentence wrapped in `markers` (bos, eos) if given."""
    if len(chunk[0]) != num_columns:
        raise ValueError(f"prepare: expected rows of {num_columns} sentence(s), got {chunk[0]!r}")
    encoded = []
    for column in zip(*chunk, strict=True):
        ids, offsets = tokenizer.encode_batch(list(column), num_threads=num_threads, return_numpy=True)
        encoded.append(_with_markers(ids, offsets, *markers) if markers else (ids, offsets))
    return encoded


def _write_shards(rows: Iterator[tuple[str, ...]], encode: Callable, out_dirs: list[Path], *, shard_size: int,
                  dtype: np.dtype, vocab_size: int, progress: Progress) -> list[list[dict]]:
    """Writes (or, when an earlier run finished it, skips) shard after shard; the meta.json entries per out_dir."""
    shards: list[list[dict]] = [[] for _ in out_dirs]
    with ThreadPoolExecutor(max_workers=1) as pool:
        for index in count():
            name = shard_name(index)
            digest = hashlib.sha256()
            shard_rows = _hashed(islice(rows, shard_size), digest)
            records = [_finished_record(directory, name, dtype) for directory in out_dirs]
            if all(records):
                num_sentences = sum(1 for _ in shard_rows)
                if (num_sentences, digest.hexdigest()) != (records[0]["num_sentences"], records[0]["input_sha256"]):
                    raise _changed_corpus(out_dirs[0], f"from other sentences (they differ in {name})")
            else:
                encoded = _encoded_in_background(_chunks(shard_rows, ENCODE_CHUNK), encode, pool)
                try:
                    counts = _write_shard(encoded, out_dirs, name, dtype, vocab_size)
                    if counts[0][0] == 0:
                        break
                    records = [{"name": name, "num_sentences": num_sentences, "num_tokens": num_tokens,
                                "input_sha256": digest.hexdigest()} for num_sentences, num_tokens in counts]
                    for directory, record in zip(out_dirs, records):
                        _write_json_atomically(_record_path(directory, name), record)
                except OSError as error:  # a full disk, most likely: say what is kept and how to go on
                    raise OSError(error.errno, f"prepare: writing {out_dirs[0] / name} failed ({error.strerror}); "
                                  f"the {index} shard(s) finished before it are kept and meta.json is not written: "
                                  "free some space and run the same prepare again to finish") from error
            for shard_list, record in zip(shards, records):
                shard_list.append(record)
            progress.update(sentences=records[0]["num_sentences"],
                            tokens=sum(record["num_tokens"] for record in records))
            if records[0]["num_sentences"] < shard_size:
                break
    return shards


def _hashed(rows: Iterator[tuple[str, ...]], digest) -> Iterator[tuple[str, ...]]:
    """The rows, fed to `digest` on the way: a resumed run checks that a finished shard's input is unchanged."""
    for row in rows:
        for text in row:
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        yield row


def _record_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.json"


def _finished_record(directory: Path, name: str, dtype: np.dtype) -> dict | None:
    """The record of a shard that an earlier run finished (written after its files), or None."""
    try:
        record = json.loads(_record_path(directory, name).read_text(encoding="utf-8"))
        offsets = read_shard_offsets(directory, name, dtype)
    except (OSError, ValueError):
        return None
    if (len(offsets) - 1, int(offsets[-1])) != (record.get("num_sentences"), record.get("num_tokens")):
        return None
    return record


def _input_files(source) -> list[dict] | None:
    """What the corpus is made from when it is read from files: each file's absolute path, size and SHA-256; None
    for sentences from any other iterable (the shards' input hashes identify those)."""
    if not isinstance(source, Reader):
        return None
    return [{"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": _file_sha256(path)}
            for path in source.paths]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _described(key: str, value) -> str:
    """A recorded value as the error shows it: input files by path, size and hash prefix."""
    if key == "inputs" and value:
        return "[" + ", ".join(f"{item['path']} ({item['bytes']} bytes, sha256 {item['sha256'][:12]})"
                               for item in value) + "]"
    return repr(value)


def _changed_corpus(directory: Path, what: str) -> ValueError:
    return ValueError(f"{directory} holds a corpus prepared {what}; replace it with --overwrite, or prepare into "
                      "another directory")


def _keep_settings(directory: Path, settings: dict) -> None:
    """Records the inputs and settings of a first run; a re-run (resume, or a no-op) must have the same ones, unless
    the first run finished no shard (it failed early, on a wrong input say): then there is nothing to keep, and the
    re-run starts afresh instead of being refused for the inputs it corrects."""
    path = directory / SETTINGS_FILE
    if path.is_file() and not any(_FINISHED.match(item.name) for item in directory.iterdir()):
        _remove_corpus_files(directory)
    if not path.is_file():
        _write_json_atomically(path, settings)
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    changed = {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}
    if changed:
        details = ", ".join(f"{key}: was {_described(key, old)}, now {_described(key, new)}"
                            for key, (old, new) in changed.items())
        raise _changed_corpus(directory, f"from other inputs or settings ({details})")


def _check_same_sentences(rows: Iterator[tuple[str, ...]], directory: Path, shard_size: int) -> None:
    """Raise unless `rows` are the sentences the finished corpus in `directory` was prepared from (no tokenising:
    each shard's input hash is compared with its record)."""
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    for record in meta["shards"]:
        digest = hashlib.sha256()
        num_sentences = sum(1 for _ in _hashed(islice(rows, shard_size), digest))
        if (num_sentences, digest.hexdigest()) != (record["num_sentences"], record["input_sha256"]):
            raise _changed_corpus(directory, f"from other sentences (they differ in {record['name']})")
    if next(rows, None) is not None:
        raise _changed_corpus(directory, f"from other sentences (the first {meta['num_sentences']} only)")


def _remove_corpus_files(directory: Path) -> None:
    """Deletes the files of a prepared corpus in `directory` (see CORPUS_FILE), leaving any other file alone."""
    if directory.is_dir():
        for path in directory.iterdir():
            if path.is_file() and CORPUS_FILE.match(path.name):
                path.unlink()


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _encoded_in_background(chunks: Iterator[list], encode: Callable, pool: ThreadPoolExecutor) -> Iterator:
    """encode(chunk) for each chunk in order; chunk k is encoded on the pool while chunk k + 1 is read."""
    pending = None
    for chunk in chunks:
        submitted = pool.submit(encode, chunk)
        if pending is not None:
            yield pending.result()
        pending = submitted
    if pending is not None:
        yield pending.result()


def _write_shard(encoded_chunks: Iterator, out_dirs: list[Path], name: str, dtype: np.dtype,
                 vocab_size: int) -> list[tuple[int, int]]:
    """Writes one shard per out_dir; returns (sentences, tokens) per out_dir; writes nothing for no rows."""
    temporary = [tuple(path.with_name(path.name + ".tmp") for path in shard_files(d, name)) for d in out_dirs]
    files = None
    lengths: list[list[np.ndarray]] = [[] for _ in out_dirs]
    try:
        for columns in encoded_chunks:
            if files is None:
                files = [open(ids_path, "wb") for ids_path, _ in temporary]
            for file, column_lengths, (ids, offsets) in zip(files, lengths, columns):
                if len(ids) and int(ids.max()) >= vocab_size:
                    raise ValueError(f"token id {int(ids.max())} from the tokenizer is >= vocab_size={vocab_size}")
                file.write(ids.astype(dtype.newbyteorder("<"), copy=False).tobytes())
                column_lengths.append(np.diff(offsets))
        if files is None:
            return [(0, 0) for _ in out_dirs]
        counts = []
        for file, column_lengths, (ids_tmp, offsets_tmp), directory in zip(files, lengths, temporary, out_dirs):
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(column_lengths))]).astype("<i8")
            _sync_and_close(file)
            with open(offsets_tmp, "wb") as offsets_file:
                offsets_file.write(offsets.tobytes())
                _sync_and_close(offsets_file)
            ids_path, offsets_path = shard_files(directory, name)
            os.replace(ids_tmp, ids_path)
            os.replace(offsets_tmp, offsets_path)
            counts.append((len(offsets) - 1, int(offsets[-1])))
        return counts
    except BaseException:
        # A failed shard (full disk, bad id, interrupt) leaves no partial file: its record is not written either, so
        # a re-run tokenises it again.
        for file in files or ():
            file.close()
        for path in (path for pair in temporary for path in pair):
            path.unlink(missing_ok=True)
        raise


def _with_markers(ids: np.ndarray, offsets: np.ndarray, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids/offsets with every sentence wrapped as <s> ... </s>."""
    num_sentences = len(offsets) - 1
    wrapped_offsets = offsets + 2 * np.arange(num_sentences + 1)
    wrapped = np.empty(len(ids) + 2 * num_sentences, dtype=ids.dtype)
    wrapped[wrapped_offsets[:-1]] = bos_id
    wrapped[wrapped_offsets[1:] - 1] = eos_id
    # Token j of sentence i moves right by 2 * i + 1 (the markers of the sentences before it and its own <s>).
    sentence_of_token = np.repeat(np.arange(num_sentences), np.diff(offsets))
    wrapped[np.arange(len(ids)) + 2 * sentence_of_token + 1] = ids
    return wrapped, wrapped_offsets


def _sync_and_close(file) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


def _write_json_atomically(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=1, ensure_ascii=False)
            file.write("\n")
            _sync_and_close(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
