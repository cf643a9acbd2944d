"""Hostile tokenizer files: every one is a ValueError that names the file and the problem, never a crash, a hang,
an unbounded error message or a silently wrong tokenizer. (Well-formed files and the common corruptions are in
test_tokenizer.py; tests/fuzz/fuzz_tokenizer_files.py fuzzes `Tokenizer.load` further.)"""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm import Tokenizer

SPECIALS = ["<pad>", "<s>"]
NUM_BASE = len(SPECIALS) + 256


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def record_of(level: str = "byte", merged: list[bytes] = (), merges: list[list[int]] = (),
              alphabet: list[str] = ()) -> dict:
    """A file's record: the specials, the 256 bytes, the alphabet (char level), then `merged` (one per merge)."""
    tokens = [s.encode() for s in SPECIALS] + [bytes([b]) for b in range(256)]
    tokens += [letter.encode() for letter in alphabet] + list(merged)
    return {"format": "fastlm-tokenizer", "version": 1, "level": level, "normalization": "nfc",
            "special_tokens": SPECIALS, "vocab_size": len(tokens), "tokens": [b64(t) for t in tokens],
            "merges": [list(pair) for pair in merges]}


A, B = len(SPECIALS) + ord("a"), len(SPECIALS) + ord("b")
GOOD = record_of(merged=[b"ab", b"aba"], merges=[[A, B], [NUM_BASE, A]])


def write(tmp_path: Path, content: dict | str | bytes) -> Path:
    path = tmp_path / "hostile.json"
    if isinstance(content, dict):
        content = json.dumps(content)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def load_error(tmp_path: Path, content: dict | str | bytes) -> str:
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as error:
        Tokenizer.load(path)
    message = str(error.value)
    assert str(path) in message
    assert len(message) < 2000, "an error message must stay readable whatever the file holds"
    return message


def test_the_well_formed_file_used_below_loads(tmp_path):
    tokenizer = Tokenizer.load(write(tmp_path, GOOD))
    assert tokenizer.encode("aba") == [NUM_BASE + 1] and tokenizer.encode("abab") == [NUM_BASE, NUM_BASE]


@pytest.mark.parametrize("name, merges, expected", [
    ("huge id", [[A, 2**40], [NUM_BASE, A]], "below vocab_size"),
    ("beyond JSON's int digits limit", None, "hostile.json"),
    ("negative id", [[-1, B], [NUM_BASE, A]], "below vocab_size"),
    ("float id", [[float(A), B], [NUM_BASE, A]], "below vocab_size"),
    ("a special token", [[0, B], [NUM_BASE, A]], "uses id 0"),
    ("a token not defined yet (a cycle)", [[A, NUM_BASE + 1], [NUM_BASE, A]], "defined before it"),
    ("the token it creates (a cycle)", [[A, B], [NUM_BASE + 1, A]], "defined before it"),
    ("a wrong result", [[B, A], [NUM_BASE, A]], "should create b'ba'"),
    ("the same merge twice", [[A, B], [A, B]], "repeats merges[0]"),
    ("a triple", [[A, B, A], [NUM_BASE, A]], "pairs"),
    ("not a list", "ab", "pairs"),
])
def test_bad_merges(tmp_path, name, merges, expected):
    if merges is None:  # an integer JSON cannot even turn into a Python int (over 4300 digits)
        text = json.dumps(GOOD).replace(f"[[{A}, {B}]", f"[[{'9' * 5000}, {B}]")
        assert load_error(tmp_path, text)
        return
    merged = [b"ab", b"ab"] if name == "the same merge twice" else [b"ab", b"aba"]
    assert expected in load_error(tmp_path, {**record_of(merged=merged), "merges": merges})


@pytest.mark.parametrize("name, change, expected", [
    ("a duplicate special token", {"special_tokens": ["<pad>", "<pad>"]}, "unique"),
    ("specials that are not the first tokens", {"special_tokens": ["<s>", "<pad>"]}, "start with the special"),
    ("a byte token out of place", {"tokens": GOOD["tokens"][:2] + [b64(b"x")] + GOOD["tokens"][3:]},
     "start with the special"),
    ("vocab_size not the token count", {"vocab_size": 10**9}, "vocab_size"),
    ("negative vocab_size", {"vocab_size": -1}, "vocab_size"),
    ("tokens not base64", {"tokens": GOOD["tokens"][:-1] + ["***"]}, "base64"),
    ("tokens not strings", {"tokens": GOOD["tokens"][:-1] + [7]}, "base64"),
    ("tokens a dict", {"tokens": {"a": 1}}, "tokens"),
    ("a wrong format version", {"version": 2}, '"version" must be 1'),
    ("the version a string", {"version": "1"}, '"version" must be 1'),
    ("a foreign format", {"format": "huggingface"}, '"format"'),
    ("an unknown level", {"level": "word"}, "level"),
    ("the level a number", {"level": 3}, "level"),
    ("an unknown normalization", {"normalization": "nfd"}, "normalization"),
    ("special tokens not strings", {"special_tokens": [1, 2]}, "special_tokens"),
])
def test_bad_fields(tmp_path, name, change, expected):
    assert expected in load_error(tmp_path, {**GOOD, **change})


def test_duplicate_alphabet_tokens(tmp_path):
    record = record_of(level="char", alphabet=["가", "나", "가"])
    assert "repeats" in load_error(tmp_path, record)


def test_a_duplicate_merged_token_is_allowed_and_the_lower_id_wins(tmp_path):
    # Training can reach the same bytes by two merges ("a"+"ab" and "aa"+"b"): a file may hold both.
    record = record_of(merged=[b"ab", b"aa", b"aab", b"aab"],
                       merges=[[A, B], [A, A], [A, NUM_BASE], [NUM_BASE + 1, B]])
    tokenizer = Tokenizer.load(write(tmp_path, record))
    assert tokenizer.encode("aab") == [NUM_BASE + 2]


@pytest.mark.parametrize("name, content", [
    ("empty", b""),
    ("truncated", json.dumps(GOOD)[:-40]),
    ("not JSON", "format: fastlm-tokenizer"),
    ("binary", bytes(range(256))),
    ("not UTF-8", json.dumps(GOOD).encode().replace(b'"nfc"', b'"\xff\xfe"')),
    ("a JSON list", json.dumps([GOOD])),
    ("a JSON string", json.dumps("fastlm-tokenizer")),
    ("nested too deep for the parser", "[" * 100_000 + "]" * 100_000),
    ("NaN vocab_size", json.dumps(GOOD).replace('"vocab_size": 260', '"vocab_size": NaN')),
])
def test_files_that_are_not_tokenizer_json(tmp_path, name, content):
    load_error(tmp_path, content)


@pytest.mark.parametrize("field", ["level", "normalization", "version", "format"])
def test_giant_strings_give_short_messages(tmp_path, field):
    load_error(tmp_path, {**GOOD, field: "x" * 10_000_000})


def test_a_giant_wrong_token_gives_a_short_message(tmp_path):
    giant = b"ab" + b"x" * 5_000_000
    message = load_error(tmp_path, {**GOOD, "tokens": GOOD["tokens"][:-2] + [b64(giant), GOOD["tokens"][-1]]})
    assert "should create" in message and "5000002 bytes" in message


def test_giant_special_tokens_give_short_messages(tmp_path):
    giant = "<" + "s" * 1_000_000 + ">"
    assert "special" in load_error(tmp_path, {**GOOD, "special_tokens": [giant, giant]})
    assert "special" in load_error(tmp_path, {**GOOD, "special_tokens": ["<pad>", giant]})


def test_megabyte_tokens_load_and_encode_in_linear_time(tmp_path):
    """Tokens of 2^k 'a's up to 4 MiB (what training on one long run of 'a' gives): loading built the pair
    table in O(length^2) per token, hours at this size. Run in a subprocess with a generous limit instead of
    timing: the linear build takes about a second; the quadratic one never finishes."""
    level_merges, merged, previous = [], [], len(SPECIALS) + ord("a")
    for k in range(1, 23):
        merged.append(b"a" * 2**k)
        level_merges.append([previous, previous])
        previous = NUM_BASE + k - 1
    path = write(tmp_path, record_of(merged=merged, merges=level_merges))
    script = (f"from fastlm import Tokenizer; t = Tokenizer.load({str(path)!r}); "
              f"ids = t.encode('a' * (2**22 + 2**20 + 1)); "
              f"assert ids == [{NUM_BASE + 21}, {NUM_BASE + 19}, {len(SPECIALS) + ord('a')}], ids; print('ok')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "ok", done.stderr
