"""Streaming readers for the text corpora fastlm accepts.

A reader is a re-iterable object (each pass re-opens its files and streams them: no whole file is ever loaded)
that yields sentences (`str`) or sentence pairs (`(source, target)`):

- `TextLines(*paths)`: one sentence per line, the files read one after another.
- `ParallelLines(source_path, target_path)`: two line-aligned files (e.g. `train.ko` / `train.en`).
- `TsvPairs(path)`: two tab-separated columns per line, no quoting.
- `AihubPairs(path)`: the AI-hub Korean-English corpus, `.xlsx` or `.csv`, with columns `원문` (Korean source) and
  `번역문` (English translation); other columns are ignored.

Policy, the same for every reader:
- Files must be UTF-8 (a leading byte-order mark is dropped). Sentences are stripped of surrounding whitespace.
- Blank lines are skipped; so is a pair with a blank side (an empty cell in a spreadsheet is common and must not
  shift or stop a corpus). Skipped lines and pairs are counted in `reader.skipped` (for the last pass).
- Lines end in `\n` or `\r\n`; a carriage return anywhere else (a file with classic-Mac `\r` endings) is an error.
- Every error is a `CorpusFormatError` (a ValueError) that starts with `file:line`: invalid UTF-8, a wrong column
  count, a missing column, an empty file (or one with only blank lines), parallel files of different lengths, a
  stray carriage return. A directory given as a path is a ValueError when the reader is made.
"""

from __future__ import annotations

import codecs
import csv
import os
import zipfile
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

AIHUB_SOURCE_COLUMN = "원문"
AIHUB_TARGET_COLUMN = "번역문"


class CorpusFormatError(ValueError):
    """A problem in an input corpus file; the message starts with `file:line`."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")


class Reader:
    """A re-iterable stream of sentences (`parallel = False`) or of (source, target) pairs (`parallel = True`)
    read from `paths`."""

    parallel: bool = False

    def __init__(self, *paths: str | os.PathLike):
        if not paths:
            raise ValueError(f"{type(self).__name__} needs at least one path, got none")
        self.paths = [Path(path) for path in paths]
        for path in self.paths:
            if path.is_dir():
                raise ValueError(f"{type(self).__name__} path={str(path)!r}: a directory; expected a corpus file")
        self.skipped = 0  # blank lines or half-blank pairs dropped by the last pass

    def __iter__(self) -> Iterator:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(str(path) for path in self.paths)})"

    def _kept_pairs(self, pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        """The pairs with both sides non-blank, stripped; counts the others; an error if none is left."""
        self.skipped = 0
        kept = 0
        for source, target in pairs:
            source, target = source.strip(), target.strip()
            if source and target:
                kept += 1
                yield source, target
            else:
                self.skipped += 1
        if kept == 0:
            raise CorpusFormatError(self.paths[0], 1, "empty file: no pair with both sides non-blank")


_NOT_UTF8 = "the file must be UTF-8 (convert it, e.g. `iconv -f cp949 -t utf-8` for a Korean Windows file)"


def check_utf8(path: str | os.PathLike) -> None:
    """Raise CorpusFormatError naming the line of the first invalid UTF-8 in `path` (a binary file, say), for inputs
    read natively rather than by a reader; in blocks, at the speed of Python's decoder."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            held = len(decoder.getstate()[0])  # the start of a character that the last block split
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:  # error.start counts the held bytes too
                bad = max(0, error.start - held)
                raise CorpusFormatError(path, line + block.count(b"\n", 0, bad),
                                        f"invalid UTF-8: {_NOT_UTF8}") from None
            line += block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusFormatError(path, line, f"invalid UTF-8 (the file ends inside a character): {_NOT_UTF8}") from None


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its line ending) per line; invalid UTF-8 raises naming the line."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusFormatError(path, number,
                                        f"invalid UTF-8 at byte {error.start} of the line: {_NOT_UTF8}") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.removesuffix("\n").removesuffix("\r")
            if "\r" in text:
                # Lines ended by a lone CR (classic Mac) would otherwise be read as one huge sentence.
                raise CorpusFormatError(path, number, "carriage return inside the line: expected lines ending in "
                                        "\\n or \\r\\n (convert the file, e.g. with `mac2unix`)")
            yield number, text


class TextLines(Reader):
    """Sentences, one per line, from one or more files read in the order given."""

    def __iter__(self) -> Iterator[str]:
        self.skipped = 0
        for path in self.paths:
            kept = 0
            for _, line in _decoded_lines(path):
                sentence = line.strip()
                if sentence:
                    kept += 1
                    yield sentence
                else:
                    self.skipped += 1
            if kept == 0:
                raise CorpusFormatError(path, 1, "empty file: no non-blank line")


class ParallelLines(Reader):
    """(source, target) pairs from two line-aligned files; their line counts must match."""

    parallel = True

    def __init__(self, source_path: str | os.PathLike, target_path: str | os.PathLike):
        super().__init__(source_path, target_path)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._kept_pairs(self._aligned_lines())

    def _aligned_lines(self) -> Iterator[tuple[str, str]]:
        source_path, target_path = self.paths
        lines = zip_longest(_decoded_lines(source_path), _decoded_lines(target_path))
        for number, (source, target) in enumerate(lines, start=1):
            if source is None or target is None:
                # Finish counting the longer file so the error can give both lengths.
                longer = number + sum(1 for _ in lines)
                source_count, target_count = (number - 1, longer) if source is None else (longer, number - 1)
                raise CorpusFormatError(
                    source_path if source is None else target_path, number,
                    f"parallel files must have the same number of lines: {source_path} has {source_count}, "
                    f"{target_path} has {target_count}",
                )
            yield source[1], target[1]


class TsvPairs(Reader):
    """(source, target) pairs from a file with two tab-separated columns per line (no quoting, no header)."""

    parallel = True

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._kept_pairs(self._rows())

    def _rows(self) -> Iterator[tuple[str, str]]:
        path = self.paths[0]
        for number, line in _decoded_lines(path):
            if not line.strip():
                self.skipped += 1
                continue
            columns = line.split("\t")
            if len(columns) != 2:
                raise CorpusFormatError(
                    path, number, f"expected 2 tab-separated columns (source, target), found {len(columns)}"
                )
            yield columns[0], columns[1]


class AihubPairs(Reader):
    """(원문, 번역문) pairs from an AI-hub Korean-English `.xlsx` (first sheet) or `.csv`; the header is row 1."""

    parallel = True

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.path = self.paths[0]
        if self.path.suffix.lower() not in (".xlsx", ".csv"):
            raise ValueError(f"AihubPairs path={str(self.path)!r}: expected a .xlsx or .csv file")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        rows = self._xlsx_rows() if self.path.suffix.lower() == ".xlsx" else self._csv_rows()
        return self._kept_pairs(self._pairs(rows))

    def _pairs(self, numbered_rows: Iterator[tuple[int, tuple]]) -> Iterator[tuple[str, str]]:
        header = next(numbered_rows, None)
        if header is None:
            raise CorpusFormatError(self.path, 1, "empty file: expected a header row")
        names = [str(cell).strip() if cell is not None else "" for cell in header[1]]
        missing = [name for name in (AIHUB_SOURCE_COLUMN, AIHUB_TARGET_COLUMN) if name not in names]
        if missing:
            raise CorpusFormatError(self.path, header[0], f"missing column(s) {missing}; the header has {names}")
        source_column, target_column = names.index(AIHUB_SOURCE_COLUMN), names.index(AIHUB_TARGET_COLUMN)
        for number, cells in numbered_rows:
            if all(cell is None or str(cell).strip() == "" for cell in cells):
                self.skipped += 1
                continue
            if len(cells) <= max(source_column, target_column):
                raise CorpusFormatError(
                    self.path, number, f"expected at least {max(source_column, target_column) + 1} columns "
                    f"(up to {AIHUB_SOURCE_COLUMN!r} and {AIHUB_TARGET_COLUMN!r}), found {len(cells)}"
                )
            yield _cell_text(cells[source_column]), _cell_text(cells[target_column])

    def _csv_rows(self) -> Iterator[tuple[int, tuple]]:
        # csv gets the decoded lines with their endings restored, so quoted fields may span lines and
        # `reader.line_num` stays the physical line number.
        lines = (line + "\n" for _, line in _decoded_lines(self.path))
        reader = csv.reader(lines)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise CorpusFormatError(self.path, reader.line_num, f"malformed CSV: {error}") from None
            yield reader.line_num, tuple(row)

    def _xlsx_rows(self) -> Iterator[tuple[int, tuple]]:
        import openpyxl  # the only reader that needs it

        try:
            workbook = openpyxl.load_workbook(self.path, read_only=True, data_only=True)
        except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
            raise CorpusFormatError(self.path, 1, f"not a readable .xlsx workbook ({error})") from None
        try:
            for number, row in enumerate(workbook.worksheets[0].iter_rows(values_only=True), start=1):
                yield number, row
        finally:
            workbook.close()


def _cell_text(cell) -> str:
    """A spreadsheet cell as text: numbers (a sentence like "2024") come back from openpyxl as int or float."""
    return "" if cell is None else str(cell)


def open_reader(*paths: str | os.PathLike) -> Reader:
    """The reader for the given files: two paths are line-aligned parallel files; one `.xlsx`/`.csv` is AI-hub,
    one `.tsv` is TSV pairs, anything else is plain text (one sentence per line)."""
    if len(paths) == 2:
        return ParallelLines(*paths)
    if len(paths) != 1:
        raise ValueError(f"open_reader paths={[str(p) for p in paths]}: expected one file or two parallel files")
    suffix = Path(paths[0]).suffix.lower()
    if suffix in (".xlsx", ".csv"):
        return AihubPairs(paths[0])
    if suffix == ".tsv":
        return TsvPairs(paths[0])
    return TextLines(paths[0])
