"""fastlm.Tokenizer: round trips, the native core against the reference BPE, special tokens, files, bad input."""

import itertools
import json
import os
import pickle
import signal
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_strategies import short_texts, texts

import fastlm
import fastlm.tokenizer
from fastlm import Tokenizer
from fastlm.reference_bpe import NUM_BYTES, ReferenceBPE
from fastlm.tokenizer import DEFAULT_SPECIAL_TOKENS, demo


@pytest.fixture(scope="module")
def demo_files():
    """The bilingual sample shipped in the package."""
    sample = Path(fastlm.__file__).resolve().parent / "demo_data"
    return [sample / "sample.ko", sample / "sample.en"]


@pytest.fixture(scope="module")
def byte_tokenizer(demo_files):
    return Tokenizer.train(demo_files, vocab_size=700, level="byte")


@pytest.fixture(scope="module")
def char_tokenizer(demo_files):
    return Tokenizer.train(demo_files, vocab_size=1200, level="char")


@pytest.fixture(params=["byte", "char"])
def tokenizer(request, byte_tokenizer, char_tokenizer):
    return byte_tokenizer if request.param == "byte" else char_tokenizer


def char_normalize(text: str) -> str:
    """The documented char-level normalisation (NFC by default), then '▁' as a space."""
    return unicodedata.normalize("NFC", text).replace("\u2581", " ")


# ---- round trips ---------------------------------------------------------------------------------------------
@given(texts)
def test_byte_level_round_trips_any_text(byte_tokenizer, text):
    assert byte_tokenizer.decode(byte_tokenizer.encode(text)) == text


@given(st.binary())
def test_byte_level_round_trips_any_bytes(byte_tokenizer, data):
    assert byte_tokenizer.decode_bytes(byte_tokenizer.encode(data)) == data


@given(texts)
def test_char_level_round_trips_after_normalisation(char_tokenizer, text):
    assert char_tokenizer.decode(char_tokenizer.encode(text)) == char_normalize(text)


HARD_CASES = [
    "",
    " ",
    "  leading and trailing  ",
    "오늘 저녁에 친구와 함께 영화를 봤어요.",
    "Korean 한국어 and English mixed: 서울2024년!",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇰🇷",
    "combining e\u0301 a\u0308 \u1100\u1161\u11a8 (jamo)",
    "controls \x00\x01\x1b\x7f\t\r\n\x0b\x0c end",
    "a" * 100_000,
    "가" * 30_000,
    "▁space▁mark",
]


@pytest.mark.parametrize("text", HARD_CASES, ids=range(len(HARD_CASES)))
def test_round_trips_on_hard_cases(tokenizer, text):
    expected = text if tokenizer.level == "byte" else char_normalize(text)
    assert tokenizer.decode(tokenizer.encode(text)) == expected


def test_char_level_merges_join_letters_and_their_combining_marks():
    words = ["हिन्दी", "ภาษาไทย", "தமிழ்"]
    tokenizer = Tokenizer.train([" ".join(words)] * 3, vocab_size=1000, level="char", min_frequency=1)
    assert [len(tokenizer.encode(word)) for word in words] == [1, 1, 1]


def test_nfkc_normalisation_is_applied(demo_files):
    tokenizer = Tokenizer.train(demo_files, vocab_size=1200, level="char", normalization="nfkc")
    assert tokenizer.normalization == "nfkc"
    assert tokenizer.decode(tokenizer.encode("Ａ①ﬁ")) == "A1fi"


@pytest.mark.parametrize("level", ["byte", "char"])
def test_lone_surrogates_become_replacement_characters(level, byte_tokenizer, char_tokenizer):
    tokenizer = byte_tokenizer if level == "byte" else char_tokenizer
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "a\ufffdb"
    assert tokenizer.decode_batch(tokenizer.encode_batch(["x\udfffy", "ok"])) == ["x\ufffdy", "ok"]
    trained = Tokenizer.train(["a\ud800b"] * 5, vocab_size=600, level=level, min_frequency=1)
    assert trained.decode(trained.encode("a\ud800b")) == "a\ufffdb"


def test_invalid_utf8_bytes_decode_with_replacement(byte_tokenizer):
    ids = byte_tokenizer.encode(b"ok\xff")
    assert byte_tokenizer.decode(ids) == "ok\ufffd"


# ---- batches -------------------------------------------------------------------------------------------------
@given(st.lists(short_texts, max_size=8))
def test_encode_batch_equals_one_by_one(byte_tokenizer, char_tokenizer, batch):
    for tokenizer in (byte_tokenizer, char_tokenizer):
        one_by_one = [tokenizer.encode(text) for text in batch]
        assert tokenizer.encode_batch(batch, num_threads=2) == one_by_one
        ids, offsets = tokenizer.encode_batch(batch, return_numpy=True)
        assert ids.dtype == np.uint32 and offsets.dtype == np.int64 and len(offsets) == len(batch) + 1
        assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(batch))] == one_by_one
        assert tokenizer.decode_batch(one_by_one) == [tokenizer.decode(ids) for ids in one_by_one]


def documented_decode_bytes(tokenizer: Tokenizer, ids: list[int]) -> bytes:
    """The decoding rule, spelt out slowly: special ids give their strings; at char level the tokens' bytes between
    them are joined run by run, '▁' (also one spelt by byte-fallback tokens) becomes a space, and each run loses
    the one leading space of its dummy prefix."""
    num_special = len(tokenizer.special_tokens)
    pieces = []
    for is_special, run in itertools.groupby(ids, key=lambda token_id: token_id < num_special):
        data = b"".join(tokenizer._tokens[token_id] for token_id in run)
        if tokenizer.level == "char" and not is_special:
            data = data.replace("\u2581".encode(), b" ").removeprefix(b" ")
        pieces.append(data)
    return b"".join(pieces)


def decodable_ids(tokenizer: Tokenizer) -> st.SearchStrategy[list[int]]:
    """Any ids, with the corners weighted up: special ids, the byte-fallback ids of ' ' and of '▁''s bytes (alone
    and as the whole '▁'), and the '▁' token."""
    fallback = [len(tokenizer.special_tokens) + byte for byte in b" \xe2\x96\x81"]
    corners = [[token_id] for token_id in [*tokenizer.special_ids, *fallback]] + [fallback[1:]]
    if tokenizer.token_to_id("\u2581") is not None:
        corners.append([tokenizer.token_to_id("\u2581")])
    pieces = st.one_of(st.integers(0, tokenizer.vocab_size - 1).map(lambda token_id: [token_id]),
                       st.sampled_from(corners))
    return st.lists(pieces, max_size=8).map(lambda ids: list(itertools.chain.from_iterable(ids)))


@given(st.data())
def test_decode_follows_the_documented_rule_and_batches_agree(byte_tokenizer, char_tokenizer, data):
    for tokenizer in (byte_tokenizer, char_tokenizer):
        batch = data.draw(st.lists(decodable_ids(tokenizer), max_size=6))
        expected = [documented_decode_bytes(tokenizer, ids) for ids in batch]
        assert [tokenizer.decode_bytes(ids) for ids in batch] == expected
        texts = [data.decode("utf-8", errors="replace") for data in expected]
        assert [tokenizer.decode(ids) for ids in batch] == texts
        assert tokenizer.decode_batch(batch, num_threads=2) == texts
        assert tokenizer.decode_batch(iter([np.array(ids, dtype=np.int64) for ids in batch])) == texts


def test_decode_accepts_numpy_arrays(tokenizer):
    ids = tokenizer.encode("숫자 123 and words")
    assert tokenizer.decode(np.array(ids, dtype=np.uint32)) == tokenizer.decode(ids)


# ---- the native core against the reference ------------------------------------------------------------------
@settings(max_examples=100)
@given(
    corpus=st.lists(short_texts, min_size=1, max_size=6).filter(any),  # an empty corpus raises (tested below)
    level=st.sampled_from(["byte", "char"]),
    num_merges=st.integers(0, 40),
    min_frequency=st.sampled_from([1, 2, 3]),
    character_coverage=st.sampled_from([1.0, 0.9995, 0.9, 0.6]),
    probes=st.lists(short_texts, max_size=4),
)
def test_native_training_and_encoding_equal_the_reference(
    corpus, level, num_merges, min_frequency, character_coverage, probes
):
    corpus = [char_normalize(text) for text in corpus] if level == "char" else corpus
    alphabet_bound = len(set("".join(corpus))) + 1 if level == "char" else 0  # +1: the '▁' space mark
    vocab_size = len(DEFAULT_SPECIAL_TOKENS) + NUM_BYTES + alphabet_bound + num_merges
    reference = ReferenceBPE.train(corpus, vocab_size, level, DEFAULT_SPECIAL_TOKENS, min_frequency,
                                   character_coverage)
    native = Tokenizer.train(corpus, vocab_size, level, min_frequency=min_frequency,
                             character_coverage=character_coverage)
    assert native._tokens == reference.tokens
    assert native._merges == reference.merges
    for text in corpus + [char_normalize(text) for text in probes]:
        assert native.encode(text) == reference.encode(text)


# Words of more than 256 symbols (the native trainer's kLongWord) are merged where their pairs occur, not rescanned.
long_words = st.builds(lambda letters, length, seed: "".join(letters[(seed * i * i + i) % len(letters)]
                                                             for i in range(length)),
                       st.lists(st.sampled_from("ab가나é"), min_size=1, max_size=4, unique=True),
                       st.integers(257, 1200), st.integers(0, 10**6))


@settings(max_examples=40, deadline=None)
@given(corpus=st.lists(st.one_of(long_words, short_texts), min_size=1, max_size=4).filter(any),
       level=st.sampled_from(["byte", "char"]), num_merges=st.integers(1, 80))
def test_long_words_train_as_the_reference_does(corpus, level, num_merges):
    corpus = [char_normalize(text) for text in corpus] if level == "char" else corpus
    alphabet_bound = len(set("".join(corpus))) + 1 if level == "char" else 0
    vocab_size = len(DEFAULT_SPECIAL_TOKENS) + NUM_BYTES + alphabet_bound + num_merges
    reference = ReferenceBPE.train(corpus, vocab_size, level, min_frequency=1, character_coverage=1.0)
    native = Tokenizer.train(corpus, vocab_size, level, min_frequency=1, character_coverage=1.0)
    assert native._merges == reference.merges


@pytest.mark.parametrize("level", ["byte", "char"])
def test_native_equals_the_reference_on_corpus_lines(level, ko_en_dir):
    lines = [line for language in ("ko", "en")
             for line in (ko_en_dir / f"train.{language}").read_text(encoding="utf-8").splitlines()[:60]]
    base_size = Tokenizer.train(lines, vocab_size=10**6, level=level, min_frequency=10**9).vocab_size
    vocab_size = base_size + 150
    native = Tokenizer.train(lines, vocab_size, level)
    reference = ReferenceBPE.train(lines, vocab_size, level)
    assert native._tokens == reference.tokens and native._merges == reference.merges
    held_out = (ko_en_dir / "valid.ko").read_text(encoding="utf-8").splitlines()[:30]
    assert [native.encode(line) for line in held_out] == [reference.encode(line) for line in held_out]


def test_training_is_deterministic_across_thread_counts(demo_files):
    for level in ("byte", "char"):
        one = Tokenizer.train(demo_files, vocab_size=900, level=level, num_threads=1)
        two = Tokenizer.train(demo_files, vocab_size=900, level=level, num_threads=2)
        assert one._tokens == two._tokens and one._merges == two._merges


def test_a_vocab_size_the_corpus_cannot_reach_warns_with_the_size_reached():
    lines = ["the cat sat", "the cat ran", "a dog sat"]
    with pytest.warns(fastlm.tokenizer.VocabSizeWarning, match=r"vocab_size=5000 asked for, (\d+) reached: no pair "
                      r"of tokens occurs min_frequency=2 times") as caught:
        tokenizer = Tokenizer.train(lines, vocab_size=5000)
    assert f", {tokenizer.vocab_size} reached" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer.train(lines, vocab_size=tokenizer.vocab_size).vocab_size == tokenizer.vocab_size


def test_files_the_tokenizer_writes_follow_the_umask(tmp_path, byte_tokenizer):
    previous = os.umask(0o027)
    try:
        byte_tokenizer.save(tmp_path / "tok.json")
        byte_tokenizer.save_huggingface(tmp_path / "tokenizer.json")
    finally:
        os.umask(previous)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.iterdir()} == {
        "tok.json": "0o640", "tokenizer.json": "0o640"}


def test_training_on_files_equals_training_on_lines(demo_files):
    lines = [line for path in demo_files for line in path.read_text(encoding="utf-8").splitlines()]
    for level in ("byte", "char"):
        from_files = Tokenizer.train(demo_files, vocab_size=900, level=level)
        from_lines = Tokenizer.train(iter(lines), vocab_size=900, level=level)
        assert from_files._merges == from_lines._merges


def test_char_level_training_normalises_files(tmp_path):
    lines = ["한국어 café ▁mark", "둘째 줄 e\u0301"] * 20
    decomposed = tmp_path / "decomposed.txt"  # NFD, with Windows line ends
    decomposed.write_bytes("".join(unicodedata.normalize("NFD", line) + "\r\n" for line in lines).encode())
    from_file = Tokenizer.train([decomposed], vocab_size=350, level="char", min_frequency=1)
    from_lines = Tokenizer.train([char_normalize(line) for line in lines], vocab_size=350, level="char",
                                 min_frequency=1)
    assert from_file._tokens == from_lines._tokens and from_file._merges == from_lines._merges


@pytest.mark.parametrize("first_line", ["좋아요", unicodedata.normalize("NFD", "좋아요")])
def test_char_level_training_rejects_invalid_utf8_naming_file_and_line(tmp_path, first_line):
    path = tmp_path / "broken.txt"
    path.write_bytes(f"{first_line}\nfine\n".encode() + b"bad \xff byte\n")
    with pytest.raises(ValueError, match=r"broken\.txt:3"):
        Tokenizer.train([path], vocab_size=600, level="char")


def test_invalid_utf8_after_an_unnormalised_block_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fastlm.tokenizer, "_FILE_CHECK_BYTES", 16)  # the NFD line is seen before the bad byte
    path = tmp_path / "broken.txt"
    path.write_bytes((unicodedata.normalize("NFD", "좋아요") + "\nfine\n").encode() + b"bad \xff byte\n")
    with pytest.raises(ValueError, match=r"broken\.txt:3"):
        Tokenizer.train([path], vocab_size=600, level="char")


def test_byte_level_training_accepts_any_bytes_in_files(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"ab\xffab\xff\n" * 10)
    tokenizer = Tokenizer.train([path], vocab_size=270, level="byte", special_tokens=())
    assert tokenizer.decode_bytes(tokenizer.encode(b"ab\xffab\xff")) == b"ab\xffab\xff"


# ---- special tokens ------------------------------------------------------------------------------------------
def test_special_token_ids_and_properties(tokenizer):
    assert tokenizer.special_tokens == DEFAULT_SPECIAL_TOKENS
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id) == (0, 1, 2, 3)
    assert tokenizer.special_ids == frozenset({0, 1, 2, 3})


def test_missing_special_tokens_give_none(demo_files):
    tokenizer = Tokenizer.train(demo_files, vocab_size=400, special_tokens=("<s>",))
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.mask_id) == (0, None, None, None)


def test_special_strings_in_text_are_plain_text(tokenizer):
    text = "<s>안녕</s><mask> <pad>"
    ids = tokenizer.encode(text)
    assert not set(ids) & tokenizer.special_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, allowed_special=iter([])) == ids  # an empty iterator allows nothing


def test_allowed_special_encodes_the_named_specials(tokenizer):
    text = "<s>안녕 world</s><mask>"
    ids = tokenizer.encode(text, allowed_special={"<s>", "</s>"})
    assert ids[0] == tokenizer.bos_id and tokenizer.eos_id in ids and tokenizer.mask_id not in ids
    assert tokenizer.decode(ids) == text
    all_ids = tokenizer.encode(text, allowed_special="all")
    assert all_ids[-1] == tokenizer.mask_id and tokenizer.decode(all_ids) == text
    assert tokenizer.encode_batch([text, "x"], allowed_special="all") == [all_ids, tokenizer.encode("x")]
    ids, offsets = tokenizer.encode_batch([text, "x"], allowed_special="all", return_numpy=True)
    assert ids.dtype == np.uint32 and ids[offsets[0]:offsets[1]].tolist() == all_ids
    assert offsets.tolist() == [0, len(all_ids), len(all_ids) + len(tokenizer.encode("x"))]


def test_allowed_special_prefers_the_longest_match(demo_files):
    tokenizer = Tokenizer.train(demo_files, vocab_size=400, special_tokens=("<a>", "<a><b>"))
    assert tokenizer.encode("<a><b><a>", allowed_special="all") == [1, 0]


@pytest.mark.parametrize("level", ["byte", "char"])
def test_special_tokens_may_contain_each_other(level, demo_files):
    tokenizer = Tokenizer.train(demo_files, vocab_size=1200, level=level, special_tokens=("<a>", "x<a>y"))
    text = "x<a>y<a> x<a>"
    ids = tokenizer.encode(text, allowed_special="all")
    assert ids[:2] == [1, 0] and ids[-1] == 0 and tokenizer.decode(ids) == text


def test_allowed_special_must_name_special_tokens(tokenizer):
    with pytest.raises(ValueError, match="<unk>"):
        tokenizer.encode("x", allowed_special={"<unk>"})


# ---- vocabulary ----------------------------------------------------------------------------------------------
def test_token_to_id_inverts_id_to_token(tokenizer):
    for token_id in range(tokenizer.vocab_size):
        assert tokenizer.token_to_id(tokenizer.id_to_token(token_id)) == token_id
    assert tokenizer.token_to_id("no such token at all") is None


# ---- files ---------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert (loaded.level, loaded.special_tokens, loaded.normalization) == (
        tokenizer.level, tokenizer.special_tokens, tokenizer.normalization)
    for text in HARD_CASES[:8]:
        assert loaded.encode(text) == tokenizer.encode(text)


def corrupt_versions(record: dict) -> dict[str, str]:
    """Names of ways to break a saved file -> the file's text."""
    text = json.dumps(record)
    broken = {"truncated": text[: len(text) // 2], "not json": "hello", "empty": ""}
    for key, value in [("format", "other"), ("version", 2), ("level", "word"), ("merges", [[0, 1]]),
                       ("tokens", record["tokens"][:-1]), ("special_tokens", ["<x>"]), ("normalization", "nfd")]:
        broken[f"{key}={str(value)[:20]}"] = json.dumps({**record, key: value})
    broken["merge out of range"] = json.dumps({**record, "merges": [[10**6, 5]] + record["merges"][1:]})
    broken["token bytes not base64"] = json.dumps({**record, "tokens": ["%%%"] + record["tokens"][1:]})
    for name, merge in [("negative merge id", [-1, 300]), ("bool merge id", [True, 300]), ("huge id", [2**70, 1])]:
        broken[name] = json.dumps({**record, "merges": [merge] + record["merges"][1:]})
    broken["special_tokens a str"] = json.dumps({**record, "special_tokens": "".join(record["special_tokens"])})
    broken["a JSON list"] = json.dumps([record])
    broken["null"] = "null"
    missing = dict(record)
    del missing["merges"]
    broken["no merges"] = json.dumps(missing)
    return broken


def test_load_rejects_corrupt_files_naming_the_path(byte_tokenizer, tmp_path):
    good = tmp_path / "good.json"
    byte_tokenizer.save(good)
    record = json.loads(good.read_text())
    for name, text in corrupt_versions(record).items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(ValueError, match="bad.json") as error:
            Tokenizer.load(path)
        assert "bad.json" in str(error.value), name


def test_load_and_save_reject_directories_and_binary_files(byte_tokenizer, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.bin"):
        Tokenizer.load(garbage)
    for method in (Tokenizer.load, byte_tokenizer.save, byte_tokenizer.save_huggingface):
        with pytest.raises(IsADirectoryError, match=tmp_path.name):
            method(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["garbage.bin"]


def test_pickle_round_trip(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode(HARD_CASES[4]) == tokenizer.encode(HARD_CASES[4]) and copy.level == tokenizer.level


def test_save_leaves_no_temporary_files(byte_tokenizer, tmp_path):
    byte_tokenizer.save(tmp_path / "a.json")
    byte_tokenizer.save(tmp_path / "a.json")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---- bad input -----------------------------------------------------------------------------------------------
def test_decode_out_of_range_raises(tokenizer):
    for bad in ([tokenizer.vocab_size], [-1], [0, 10**9]):
        with pytest.raises(ValueError, match="out of range"):
            tokenizer.decode(bad)
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode(np.array([tokenizer.vocab_size]))
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode_batch([[1], [tokenizer.vocab_size + 5]])


BAD_IDS = [  # ids -> the error and what its message must say
    ([1, 300, 10**9], ValueError, r"id 1000000000 \(at position 2\)"),  # a special id first: char level's own path
    (np.array([2**63], dtype=np.uint64), ValueError, "id 9223372036854775808 "),
    ([2**64], ValueError, "position 0 does not fit in 64 bits"),
    (["a"], TypeError, "integers, got str at position 0"),
    ([5, 1.5], TypeError, "integers, got float at position 1"),
    ([1, [2]], TypeError, "integers, got list at position 1"),
    ([np.float64(300)], TypeError, "integers, got numpy.float64 at position 0"),
    (np.array([1.0, 300.0]), TypeError, "integer array, got dtype float64"),
    (np.array([[300, 301]]), ValueError, "1-D"),
    (None, TypeError, "sequence of int"),
]


@pytest.mark.parametrize("ids, error, message", BAD_IDS, ids=[repr(ids)[:30] for ids, _, _ in BAD_IDS])
def test_decode_rejects_bad_ids_naming_them(tokenizer, ids, error, message):
    with pytest.raises(error, match=message):
        tokenizer.decode(ids)
    with pytest.raises(error, match=message):
        tokenizer.decode_batch([[5], ids])


@pytest.mark.parametrize("level", ["byte", "char"])
def test_vocab_size_below_the_alphabet_raises(level, demo_files):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(demo_files, vocab_size=100, level=level)


def test_bad_arguments_raise_clear_errors(byte_tokenizer, char_tokenizer, demo_files):
    with pytest.raises(ValueError, match="level"):
        Tokenizer.train(demo_files, vocab_size=1000, level="word")
    with pytest.raises(ValueError, match="normalization"):
        Tokenizer.train(demo_files, vocab_size=1000, level="char", normalization="nfd")
    with pytest.raises(TypeError, match="text must be str"):
        byte_tokenizer.encode(42)
    with pytest.raises(TypeError, match="bytes only at byte level"):
        char_tokenizer.encode(b"abc")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        byte_tokenizer.encode_batch(["ok", None])
    with pytest.raises(TypeError, match=r"files_or_iterable\[2\]"):
        Tokenizer.train(["a", "b", 3], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Tokenizer.train("missing.txt", vocab_size=300)


BAD_TRAINING_ARGUMENTS = [  # one keyword argument -> the error, whose message must name the argument
    ("vocab_size", 700.0, TypeError), ("vocab_size", "700", TypeError), ("vocab_size", True, TypeError),
    ("vocab_size", -5, ValueError), ("vocab_size", 2**64, ValueError),
    ("min_frequency", 0, ValueError), ("min_frequency", 1.5, TypeError),
    ("character_coverage", 0.0, ValueError), ("character_coverage", 1.5, ValueError),
    ("character_coverage", float("nan"), ValueError), ("character_coverage", "0.9", TypeError),
    ("num_threads", 0, ValueError), ("num_threads", -1, ValueError), ("num_threads", 10**6, ValueError),
    ("num_threads", 2.0, TypeError),
    ("special_tokens", ("",), ValueError), ("special_tokens", ("<s>", "<s>"), ValueError),
    ("special_tokens", ("<s>", 5), ValueError), ("special_tokens", ("\ud800",), ValueError),
    ("special_tokens", "<s>", TypeError), ("special_tokens", None, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_TRAINING_ARGUMENTS,
                         ids=[f"{name}={value!r}" for name, value, _ in BAD_TRAINING_ARGUMENTS])
def test_bad_training_arguments_raise_naming_the_argument(demo_files, name, value, error):
    with pytest.raises(error, match=name):
        Tokenizer.train(demo_files, **{"vocab_size": 1200, "level": "char", name: value})


def test_numpy_integers_are_accepted_as_sizes(demo_files):
    tokenizer = Tokenizer.train(demo_files, vocab_size=np.int64(600), min_frequency=np.int32(2),
                                num_threads=np.int64(1))
    assert tokenizer.vocab_size == 600 and tokenizer.id_to_token(np.int64(300)) == tokenizer.id_to_token(300)


BAD_CALLS = {  # a call on a tokenizer -> the error and what its message must say
    "encode(None)": (lambda t: t.encode(None), TypeError, "text must be str, got NoneType"),
    "allowed_special=5": (lambda t: t.encode("x", allowed_special=5), TypeError, "allowed_special must be"),
    "allowed_special=[5]": (lambda t: t.encode("x", allowed_special=[5]), ValueError, r"allowed_special names \[5\]"),
    "encode_batch(str)": (lambda t: t.encode_batch("abc"), TypeError, "texts must be an iterable of str, got str"),
    "encode_batch(None)": (lambda t: t.encode_batch(None), TypeError, "texts must be an iterable of str"),
    "encode_batch int item": (lambda t: t.encode_batch(["ok", 5], return_numpy=True), TypeError, r"texts\[1\]"),
    "encode_batch threads": (lambda t: t.encode_batch(["x"], num_threads=-1), ValueError, "num_threads"),
    "decode_batch threads": (lambda t: t.decode_batch([[5]], num_threads=True), TypeError, "num_threads"),
    "decode_batch(None)": (lambda t: t.decode_batch(None), TypeError, "batch must be an iterable"),
    "id_to_token(1.0)": (lambda t: t.id_to_token(1.0), TypeError, "token_id must be an int"),
    "token_to_id(None)": (lambda t: t.token_to_id(None), TypeError, "token must be str"),
}


@pytest.mark.parametrize("call, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_call_arguments_raise_clear_errors(tokenizer, call, error, message):
    with pytest.raises(error, match=message):
        call(tokenizer)


BAD_CORPORA = {  # files_or_iterable (built from the temporary folder and the demo files) -> the error and message
    "empty list": (lambda tmp, demo: [], ValueError, "nothing to train on"),
    "empty iterator": (lambda tmp, demo: iter([]), ValueError, "nothing to train on"),
    "empty strings": (lambda tmp, demo: ["", ""], ValueError, "nothing to train on"),
    "empty file": (lambda tmp, demo: [tmp / "empty.txt"], ValueError, "nothing to train on"),
    "blank lines": (lambda tmp, demo: str(tmp / "blank.txt"), ValueError, "nothing to train on"),
    "missing Path": (lambda tmp, demo: [tmp / "nope.txt"], FileNotFoundError, "nope.txt"),
    "missing among files": (lambda tmp, demo: [str(demo[0]), "nope.ko"], FileNotFoundError, "nope.ko"),
    "only file names": (lambda tmp, demo: ["train.ko", "data/valid.en"], FileNotFoundError, "train.ko"),
    "directory": (lambda tmp, demo: tmp, FileNotFoundError, "not a file"),
    "None": (lambda tmp, demo: None, TypeError, "files_or_iterable must be"),
    "an int": (lambda tmp, demo: 5, TypeError, "files_or_iterable must be"),
}


@pytest.mark.parametrize("level", ["byte", "char"])
@pytest.mark.parametrize("corpus, error, message", BAD_CORPORA.values(), ids=BAD_CORPORA.keys())
def test_bad_corpora_raise_clear_errors(tmp_path, demo_files, level, corpus, error, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\r\n\n")
    with pytest.raises(error, match=message):
        Tokenizer.train(corpus(tmp_path, demo_files), vocab_size=1200, level=level)


def test_strings_that_are_not_file_names_are_texts():
    tokenizer = Tokenizer.train(["hello", "3.14", "e.g.", "hello world.txt"] * 3, vocab_size=300, min_frequency=1)
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello" and tokenizer.vocab_size > 260


def test_demo_sample_is_line_aligned_and_small(demo_files):
    korean, english = (path.read_text(encoding="utf-8").splitlines() for path in demo_files)
    assert len(korean) == len(english) >= 300 and all(korean) and all(english)
    assert sum(path.stat().st_size for path in demo_files) < 1 << 20


def test_demo_trains_both_levels_and_round_trips(capsys):
    demo()
    output = capsys.readouterr().out
    assert "byte level" in output and "char level" in output
    assert output.count("'오늘 저녁에 친구와 함께 영화를 봤어요.'") == 4  # shown then decoded, at both levels


def test_ctrl_c_stops_training_within_a_merge_and_the_progress_counts_merges(demo_files, monkeypatch, capsys):
    reports = []

    def reached(progress, **totals):
        reports.append(totals)
        if totals.get("merges") == 5:
            signal.raise_signal(signal.SIGINT)  # Python's handler: KeyboardInterrupt, raised in the native loop

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # another test may have left its own
    try:
        with monkeypatch.context() as patch:
            patch.setattr(fastlm.tokenizer.Progress, "reached", reached)
            with pytest.raises(KeyboardInterrupt):
                Tokenizer.train(demo_files, vocab_size=900, level="byte", progress=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    merges = [report["merges"] for report in reports if "merges" in report]
    assert merges[:6] == [1, 2, 3, 4, 5, 6][:len(merges)] and len(merges) <= 6
    assert any("bytes" in report for report in reports)  # the counting reported too
    trained = Tokenizer.train(demo_files, vocab_size=900, level="byte", progress=True)  # nothing left half-done
    assert trained.vocab_size == 900
    assert f"merges toward vocab_size=900: {len(trained._merges)} merges" in capsys.readouterr().err
