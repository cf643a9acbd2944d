"""Readers on good and broken files: plain text, parallel files, TSV, AI-hub xlsx/csv."""

from __future__ import annotations

import re

import openpyxl
import pytest
from data_helpers import write_lines
from hypothesis import given
from hypothesis import strategies as st

from fastlm.data import AihubPairs, CorpusFormatError, ParallelLines, TextLines, TsvPairs, open_reader
from fastlm.data.readers import check_utf8


def error_at(path, line: int, *fragments: str):
    """pytest.raises for a CorpusFormatError starting with path:line and containing the fragments."""
    pattern = re.escape(f"{path}:{line}: ") + "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    return pytest.raises(CorpusFormatError, match=pattern)


# ---- plain text -------------------------------------------------------------------------------------------------
def test_text_lines_strip_skip_blank_and_handle_bom_and_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff첫 문장입니다.\r\n\r\n  second line  \r\n   \nlast".encode("utf-8"))
    reader = TextLines(path)
    assert list(reader) == ["첫 문장입니다.", "second line", "last"]
    assert reader.skipped == 2
    assert list(reader) == ["첫 문장입니다.", "second line", "last"], "a reader is re-iterable"


def test_text_lines_read_several_files_in_order(tmp_path):
    first, second = write_lines(tmp_path / "1.txt", ["a", "b"]), write_lines(tmp_path / "2.txt", ["c"])
    assert list(TextLines(first, second)) == ["a", "b", "c"]


lines_strategy = st.lists(st.text(st.characters(exclude_characters="\n\r\ufeff")), max_size=20)


@given(lines=lines_strategy.filter(lambda lines: any(line.strip() for line in lines)))
def test_text_lines_give_back_every_non_blank_line(tmp_path_factory, lines):
    path = write_lines(tmp_path_factory.mktemp("text") / "x.txt", lines)
    reader = TextLines(path)
    assert list(reader) == [line.strip() for line in lines if line.strip()]
    assert reader.skipped == sum(1 for line in lines if not line.strip())


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.ko"
    path.write_bytes("좋은 줄\n또 좋은 줄\n".encode("utf-8") + "나쁜 줄".encode("cp949") + b"\n")
    with error_at(path, 3, "invalid UTF-8", "cp949"):
        list(TextLines(path))


def test_check_utf8_names_the_line_of_a_binary_or_mis_encoded_file(tmp_path):
    # 4 MiB blocks: a 3-byte character split by the first block boundary is valid, a bad byte in the second block
    # is reported at its own line.
    head = b"x" * ((1 << 22) - 1) + b"\n"  # line 1 ends one byte before the boundary
    good = tmp_path / "good.txt"
    good.write_bytes(head[:-2] + "\n가\n".encode("utf-8") * 3)  # the first 가 straddles the boundary
    check_utf8(good)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(head + "줄\n".encode("utf-8") * 2 + "나쁜 줄".encode("cp949") + b"\n")
    with error_at(bad, 4, "invalid UTF-8", "cp949"):
        check_utf8(bad)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes("a\n가".encode("utf-8")[:-1])
    with error_at(truncated, 2, "ends inside a character"):
        check_utf8(truncated)


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"], ids=["empty", "only-blank"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with error_at(path, 1, "empty file"):
        list(TextLines(path))


# ---- parallel files and TSV -------------------------------------------------------------------------------------
def test_parallel_lines_pair_lines_and_skip_half_empty_pairs(tmp_path):
    ko = write_lines(tmp_path / "x.ko", ["안녕하세요.", "", "고마워요.", ""])
    en = write_lines(tmp_path / "x.en", ["Hello.", "Orphan.", "Thanks.", ""])
    reader = ParallelLines(ko, en)
    assert list(reader) == [("안녕하세요.", "Hello."), ("고마워요.", "Thanks.")]
    assert reader.skipped == 2


@pytest.mark.parametrize("ko_lines, en_lines", [(3, 5), (5, 3)])
def test_parallel_files_of_different_lengths_name_both_files_and_counts(tmp_path, ko_lines, en_lines):
    ko = write_lines(tmp_path / "x.ko", [f"문장 {i}" for i in range(ko_lines)])
    en = write_lines(tmp_path / "x.en", [f"sentence {i}" for i in range(en_lines)])
    shorter = ko if ko_lines < en_lines else en
    with error_at(shorter, min(ko_lines, en_lines) + 1, f"{ko} has {ko_lines}", f"{en} has {en_lines}"):
        list(ParallelLines(ko, en))


def test_tsv_pairs_and_wrong_column_count(tmp_path):
    good = write_lines(tmp_path / "good.tsv", ["하나\tone", "", "둘\ttwo"])
    assert list(TsvPairs(good)) == [("하나", "one"), ("둘", "two")]
    bad = write_lines(tmp_path / "bad.tsv", ["하나\tone", "둘\ttwo\textra", "셋"])
    with error_at(bad, 2, "expected 2 tab-separated columns", "found 3"):
        list(TsvPairs(bad))


# ---- AI-hub -----------------------------------------------------------------------------------------------------
def write_xlsx(path, rows):
    workbook = openpyxl.Workbook()
    for row in rows:
        workbook.active.append(row)
    workbook.save(path)
    return path


def test_aihub_xlsx_reads_the_named_columns(tmp_path):
    path = write_xlsx(tmp_path / "aihub.xlsx", [
        ("SID", "원문", "번역문"),
        (1, "나는 학교에 간다.", "I go to school."),
        (2, "빈 번역", None),
        (3, 2024, "2024"),
        (None, None, None),
        (4, "  끝.  ", "The end."),
    ])
    reader = AihubPairs(path)
    assert list(reader) == [("나는 학교에 간다.", "I go to school."), ("2024", "2024"), ("끝.", "The end.")]
    assert reader.skipped == 2


def test_aihub_xlsx_missing_column_and_broken_file(tmp_path):
    path = write_xlsx(tmp_path / "wrong.xlsx", [("SID", "원문", "영문"), (1, "가", "a")])
    with error_at(path, 1, "missing column(s) ['번역문']", "'영문'"):
        list(AihubPairs(path))
    not_xlsx = tmp_path / "fake.xlsx"
    not_xlsx.write_bytes(b"this is not a zip file")
    with error_at(not_xlsx, 1, "not a readable .xlsx"):
        list(AihubPairs(not_xlsx))
    empty = write_xlsx(tmp_path / "empty.xlsx", [])
    with error_at(empty, 1, "empty file"):
        list(AihubPairs(empty))


def test_aihub_csv_with_bom_quotes_and_multiline_fields(tmp_path):
    path = tmp_path / "aihub.csv"
    text = '원문,번역문,분야\r\n"안녕, 세상",\"Hello, world\",일상\r\n"두 줄\n문장","two-line\nsentence",일상\r\n'
    path.write_bytes("\ufeff".encode("utf-8") + text.encode("utf-8"))
    assert list(AihubPairs(path)) == [("안녕, 세상", "Hello, world"), ("두 줄\n문장", "two-line\nsentence")]


def test_aihub_csv_errors_name_the_line(tmp_path):
    short_row = write_lines(tmp_path / "short.csv", ["번호,원문,번역문", "1,가,a", "2,나"])
    with error_at(short_row, 3, "expected at least 3 columns", "found 2"):
        list(AihubPairs(short_row))
    bad_encoding = tmp_path / "cp949.csv"
    bad_encoding.write_bytes("원문,번역문\n".encode("utf-8") + "가,a\n".encode("utf-8") + "나,b\n".encode("cp949"))
    with error_at(bad_encoding, 3, "invalid UTF-8"):
        list(AihubPairs(bad_encoding))
    no_header = tmp_path / "empty.csv"
    no_header.write_bytes(b"")
    with error_at(no_header, 1, "empty file"):
        list(AihubPairs(no_header))


def test_open_reader_picks_the_format(tmp_path):
    assert isinstance(open_reader(tmp_path / "a.ko", tmp_path / "a.en"), ParallelLines)
    assert isinstance(open_reader(tmp_path / "a.xlsx"), AihubPairs)
    assert isinstance(open_reader(tmp_path / "a.CSV"), AihubPairs)
    assert isinstance(open_reader(tmp_path / "a.tsv"), TsvPairs)
    assert isinstance(open_reader(tmp_path / "a.txt"), TextLines)
    with pytest.raises(ValueError, match="expected one file or two parallel files"):
        open_reader(tmp_path / "a", tmp_path / "b", tmp_path / "c")
    with pytest.raises(ValueError, match=r"expected a \.xlsx or \.csv file"):
        AihubPairs(tmp_path / "a.tsv")


@pytest.mark.parametrize("reader", [TextLines, AihubPairs, open_reader])
def test_a_directory_is_not_a_corpus_file(tmp_path, reader):
    with pytest.raises(ValueError, match="a directory; expected a corpus file"):
        reader(tmp_path)


@pytest.mark.parametrize("reader, content, line", [
    (TextLines, b"first\rsecond\rthird\r", 1),
    (TextLines, b"ok\r\nhalf\rway\n", 2),
    (TsvPairs, b"a\tb\rc\td\r", 1),
], ids=["mac-text", "stray-cr", "mac-tsv"])
def test_a_lone_carriage_return_is_an_error_not_a_merged_sentence(tmp_path, reader, content, line):
    path = tmp_path / "mac.tsv"
    path.write_bytes(content)
    with error_at(path, line, "carriage return inside the line"):
        list(reader(path))
