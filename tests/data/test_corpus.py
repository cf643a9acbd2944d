"""`prepare` and TokenizedCorpus: contents, dtype choice, determinism, resume, validation on reopen."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle

import numpy as np
import pytest
from data_helpers import ByteTokenizer, write_lines
from hypothesis import given
from hypothesis import strategies as st

from fastlm.data import (
    ParallelLines, TextLines, TokenizedCorpus, prepare_corpus, prepare_parallel_corpus, tokenizer_sha256,
)

SENTENCES = [f"문장 {i}: {'가나다' * (i % 5)} sentence {i}" for i in range(23)]


def directory_bytes(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.fixture
def text_file(tmp_path):
    return write_lines(tmp_path / "train.txt", SENTENCES)


def test_prepared_corpus_holds_every_sentence(tmp_path, text_file):
    tokenizer = ByteTokenizer()
    corpus = prepare_corpus(text_file, tokenizer, tmp_path / "out", shard_size=5, progress=False)
    assert len(corpus) == len(SENTENCES) and corpus.dtype == np.uint16
    assert [tokenizer.decode(corpus[i]) for i in range(len(corpus))] == SENTENCES
    assert tokenizer.decode(corpus[-1]) == SENTENCES[-1]
    assert corpus.lengths.tolist() == [len(tokenizer.encode(s)) for s in SENTENCES]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [shard["num_sentences"] for shard in meta["shards"]] == [5, 5, 5, 5, 3]
    assert meta["num_tokens"] == corpus.num_tokens == sum(corpus.lengths)
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tokenizer) and meta["source"] == f"TextLines({text_file})"
    # A token range across shards equals the concatenated sentences.
    flat = np.concatenate([tokenizer.encode(s) for s in SENTENCES])
    assert np.array_equal(corpus.tokens(3, corpus.num_tokens - 2), flat[3:-2])
    assert isinstance(corpus[7], np.memmap), "sentences are zero-copy views of the memory map"
    with pytest.raises(IndexError, match="sentence index=23 out of range"):
        corpus[23]
    reopened = pickle.loads(pickle.dumps(corpus))
    assert np.array_equal(reopened[4], corpus[4])


@given(sentences=st.lists(st.text(max_size=12), min_size=1, max_size=30), shard_size=st.integers(1, 8),
       add_bos_eos=st.booleans())
def test_any_sentences_any_shard_size_round_trip(tmp_path_factory, sentences, shard_size, add_bos_eos):
    tokenizer = ByteTokenizer()
    corpus = prepare_corpus(iter(sentences), tokenizer, tmp_path_factory.mktemp("prepared"), shard_size=shard_size,
                            add_bos_eos=add_bos_eos, progress=False)
    markers = ([tokenizer.bos_id], [tokenizer.eos_id]) if add_bos_eos else ([], [])
    expected = [markers[0] + tokenizer.encode(sentence) + markers[1] for sentence in sentences]
    assert [corpus[i].tolist() for i in range(len(corpus))] == expected
    assert corpus.tokens(0, corpus.num_tokens).tolist() == [i for ids in expected for i in ids]


def test_vocab_above_65536_gives_uint32(tmp_path, text_file):
    tokenizer = ByteTokenizer(vocab_size=70_000, first_byte_id=65_500)
    corpus = prepare_corpus([text_file], tokenizer, tmp_path / "out", progress=False)
    assert corpus.dtype == np.uint32 and int(max(corpus[i].max() for i in range(len(corpus)))) > 65535
    assert tokenizer.decode(corpus[9]) == SENTENCES[9]


def test_add_bos_eos_wraps_each_sentence(tmp_path, text_file):
    tokenizer = ByteTokenizer()
    corpus = prepare_corpus(text_file, tokenizer, tmp_path / "out", shard_size=4, add_bos_eos=True, progress=False)
    for i, sentence in enumerate(SENTENCES):
        assert corpus[i].tolist() == [tokenizer.bos_id, *tokenizer.encode(sentence), tokenizer.eos_id]


def test_prepare_is_deterministic_and_resumes_after_a_failed_shard(tmp_path, text_file):
    settings = {"shard_size": 4, "progress": False}
    prepare_corpus(text_file, ByteTokenizer(), tmp_path / "whole", **settings)

    # One encode call per shard here (shards are smaller than an encode chunk): the 4th shard fails.
    failing = ByteTokenizer(fail_on_call=4)
    with pytest.raises(RuntimeError, match="fails on purpose"):
        prepare_corpus(text_file, failing, tmp_path / "resumed", **settings)
    assert not (tmp_path / "resumed" / "meta.json").exists()
    assert (tmp_path / "resumed" / "shard-00002.offsets").exists()

    # A crash after renaming a shard's files but before its record, and a shard damaged since: both are redone.
    (tmp_path / "resumed" / "shard-00001.json").unlink()
    damaged = tmp_path / "resumed" / "shard-00002.ids"
    damaged.write_bytes(damaged.read_bytes()[:-1])

    resuming = ByteTokenizer()
    prepare_corpus(TextLines(text_file), resuming, tmp_path / "resumed", **settings)
    assert resuming.calls == 5, "shards 1 to 5 (of 6) are tokenised again, shard 0 is kept"
    resumed = directory_bytes(tmp_path / "resumed")
    assert resumed == directory_bytes(tmp_path / "whole")

    finished = ByteTokenizer()
    prepare_corpus(text_file, finished, tmp_path / "resumed", **settings)
    assert finished.calls == 0, "a finished corpus is not prepared again"


def test_resuming_with_other_settings_or_changed_input_is_an_error(tmp_path, text_file):
    failing = ByteTokenizer(fail_on_call=3)
    with pytest.raises(RuntimeError):
        prepare_corpus(text_file, failing, tmp_path / "out", shard_size=4, progress=False)
    with pytest.raises(RuntimeError):
        prepare_corpus(iter(SENTENCES), ByteTokenizer(fail_on_call=3), tmp_path / "iterable", shard_size=4,
                       progress=False)
    with pytest.raises(ValueError, match="shard_size: was 4, now 5"):
        prepare_corpus(text_file, ByteTokenizer(), tmp_path / "out", shard_size=5, progress=False)
    with pytest.raises(ValueError, match="tokenizer_sha256: was"):
        prepare_corpus(text_file, ByteTokenizer(vocab_size=300), tmp_path / "out", shard_size=4, progress=False)
    for changed_lines in (SENTENCES[:6], SENTENCES[:5] + ["edited"] + SENTENCES[6:]):
        changed = write_lines(tmp_path / "changed.txt", changed_lines)
        with pytest.raises(ValueError, match=r"other inputs .*changed.txt.*--overwrite"):
            prepare_corpus(changed, ByteTokenizer(), tmp_path / "out", shard_size=4, progress=False)
        # The same sentences from an iterable rather than a file: each finished shard's input hash is checked.
        with pytest.raises(ValueError, match=r"other sentences \(they differ in shard-00001\).*--overwrite"):
            prepare_corpus(iter(changed_lines), ByteTokenizer(), tmp_path / "iterable", shard_size=4,
                           progress=False)


def test_a_run_that_finished_no_shard_does_not_bind_the_next_one(tmp_path, text_file):
    with pytest.raises(RuntimeError, match="fails on purpose"):  # say, the wrong input file was given
        prepare_corpus(text_file, ByteTokenizer(fail_on_call=1), tmp_path / "out", shard_size=4, progress=False)
    assert (tmp_path / "out" / "prepare.json").is_file()
    other = write_lines(tmp_path / "other.txt", SENTENCES[::-1])
    corpus = prepare_corpus(other, ByteTokenizer(), tmp_path / "out", shard_size=5, progress=False)
    assert [list(s) for s in corpus] == [ByteTokenizer().encode(s) for s in SENTENCES[::-1]]


def test_a_finished_corpus_is_reused_only_for_the_same_inputs_and_settings(tmp_path):
    a = write_lines(tmp_path / "a.txt", SENTENCES)
    b = write_lines(tmp_path / "b.txt", SENTENCES[::-1])
    out = tmp_path / "out"
    prepare_corpus(a, ByteTokenizer(), out, shard_size=4, progress=False)
    (out / "notes.txt").write_text("the user's own file")
    again = ByteTokenizer()
    assert [list(s) for s in prepare_corpus(a, again, out, shard_size=4, progress=False)] == \
        [ByteTokenizer().encode(s) for s in SENTENCES]
    assert again.calls == 0, "an identical re-run is a no-op"
    recorded = json.loads((out / "prepare.json").read_text())["inputs"]
    assert recorded == [{"path": str(a.resolve()), "bytes": a.stat().st_size,
                         "sha256": hashlib.sha256(a.read_bytes()).hexdigest()}]

    with pytest.raises(ValueError, match=r"other inputs or settings \(inputs: was \[.*a.txt .*now \[.*b.txt .*"
                                         r"--overwrite"):
        prepare_corpus(b, ByteTokenizer(), out, shard_size=4, progress=False)
    write_lines(a, SENTENCES[:-1] + ["edited in place"])
    with pytest.raises(ValueError, match=r"a.txt \(\d+ bytes, sha256 \w+\)\], now .*--overwrite"):
        prepare_corpus(a, ByteTokenizer(), out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match=r"add_bos_eos: was False, now True.*--overwrite"):
        prepare_corpus(b, ByteTokenizer(), out, shard_size=4, add_bos_eos=True, progress=False, overwrite=False)

    corpus = prepare_corpus(b, ByteTokenizer(), out, shard_size=4, progress=False, overwrite=True)
    assert [list(s) for s in corpus] == [ByteTokenizer().encode(s) for s in SENTENCES[::-1]]
    assert (out / "notes.txt").read_text() == "the user's own file", "overwrite removes only the corpus's files"


def test_a_finished_corpus_from_an_iterable_is_compared_sentence_by_sentence(tmp_path):
    out = tmp_path / "out"
    prepare_corpus(iter(SENTENCES), ByteTokenizer(), out, shard_size=4, progress=False)
    again = ByteTokenizer()
    prepare_corpus(iter(SENTENCES), again, out, shard_size=4, progress=False)
    assert again.calls == 0
    for other in (SENTENCES[:-1], SENTENCES + ["one more"], SENTENCES[:7] + ["edited"] + SENTENCES[8:]):
        with pytest.raises(ValueError, match=r"from other sentences.*--overwrite"):
            prepare_corpus(iter(other), ByteTokenizer(), out, shard_size=4, progress=False)
    parallel = tmp_path / "parallel"
    pairs = list(zip(SENTENCES, SENTENCES[::-1]))
    prepare_parallel_corpus(pairs, ByteTokenizer(), parallel, shard_size=4, progress=False)
    with pytest.raises(ValueError, match=r"parallel/src holds a corpus prepared from other sentences"):
        prepare_parallel_corpus(pairs[1:], ByteTokenizer(), parallel, shard_size=4, progress=False)
    replaced = prepare_parallel_corpus(pairs[1:], ByteTokenizer(), parallel, shard_size=4, progress=False,
                                       overwrite=True)
    assert len(replaced) == len(pairs) - 1


def test_parallel_corpus_keeps_pairs_aligned(tmp_path):
    ko = write_lines(tmp_path / "x.ko", [f"한국어 문장 {i}" if i % 7 else "" for i in range(30)])
    en = write_lines(tmp_path / "x.en", [f"English sentence {i}" for i in range(30)])
    tokenizer = ByteTokenizer()
    corpus = prepare_parallel_corpus(ParallelLines(ko, en), tokenizer, tmp_path / "out", shard_size=8,
                                     progress=False)
    kept = [i for i in range(30) if i % 7]
    assert len(corpus) == len(corpus.src) == len(corpus.tgt) == len(kept)
    assert [tokenizer.decode(corpus.src[j]) for j in range(len(kept))] == [f"한국어 문장 {i}" for i in kept]
    assert [tokenizer.decode(corpus.tgt[j]) for j in range(len(kept))] == [f"English sentence {i}" for i in kept]
    assert json.loads((tmp_path / "out" / "tgt" / "meta.json").read_text())["skipped"] == 5


def test_reopen_detects_damage(tmp_path, text_file):
    out = tmp_path / "out"
    prepare_corpus(text_file, ByteTokenizer(), out, shard_size=10, progress=False)
    ids_path = out / "shard-00001.ids"
    ids_path.write_bytes(ids_path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shard-00001\.ids: size .* expected"):
        TokenizedCorpus(out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version=99, expected 1"):
        TokenizedCorpus(out)
    with pytest.raises(ValueError, match="missing"):
        TokenizedCorpus(tmp_path)


def test_check_tokenizer_rejects_another_tokenizer(tmp_path, text_file):
    corpus = prepare_corpus(text_file, ByteTokenizer(), tmp_path / "out", progress=False)
    corpus.check_tokenizer(ByteTokenizer())
    with pytest.raises(ValueError, match="prepare the corpus again"):
        corpus.check_tokenizer(ByteTokenizer(vocab_size=300))


def test_prepare_with_the_real_tokenizer(tmp_path, ko_en_dir):
    pytest.importorskip("fastlm._native", reason="the native tokenizer is not built")
    from fastlm import Tokenizer

    def first_lines(name: str, count: int) -> list[str]:
        with open(ko_en_dir / name, encoding="utf-8") as file:
            return [line.strip() for line in itertools.islice(file, count)]

    training = first_lines("train.ko", 2000) + first_lines("train.en", 2000)
    tokenizer = Tokenizer.train(training, vocab_size=600, level="byte")
    ko, en = ko_en_dir / "valid.ko", ko_en_dir / "valid.en"
    corpus = prepare_parallel_corpus(ParallelLines(ko, en), tokenizer, tmp_path / "valid", shard_size=300,
                                     num_threads=2, progress=False)
    ko_lines, en_lines = first_lines("valid.ko", 10**6), first_lines("valid.en", 10**6)
    assert len(corpus) == len(ko_lines) and corpus.src.dtype == np.uint16
    for i in range(0, len(corpus), 7):
        assert tokenizer.decode(corpus.src[i].tolist()) == ko_lines[i]
        assert tokenizer.decode(corpus.tgt[i].tolist()) == en_lines[i]
    corpus.src.check_tokenizer(tokenizer)
