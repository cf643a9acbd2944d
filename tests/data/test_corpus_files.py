"""Hostile prepared corpora: each damage to a shard or to meta.json is a ValueError naming the file and the problem
when the corpus is opened, before a batch could read outside a shard or feed the model an id outside its vocab; and
a full disk while `prepare` writes a shard leaves a corpus that is neither finished-looking nor lost."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from data_helpers import ByteTokenizer

from fastlm.data import TokenizedCorpus, prepare_corpus
from fastlm.data import prepare as prepare_module

SENTENCES = [f"문장 {i}: sentence {'x' * (i % 7)}" for i in range(12)]


@pytest.fixture
def corpus_dir(tmp_path):
    prepare_corpus(iter(SENTENCES), ByteTokenizer(), tmp_path / "corpus", shard_size=5, progress=False)
    return tmp_path / "corpus"


def _edit_meta(directory, change):
    meta = json.loads((directory / "meta.json").read_text())
    change(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


def _write_offsets(directory, name, change):
    path = directory / f"{name}.offsets"
    offsets = np.fromfile(path, dtype="<i8")
    change(offsets)
    offsets.tofile(path)


def _write_id(directory, name, position, value):
    path = directory / f"{name}.ids"
    ids = np.fromfile(path, dtype="<u2")
    ids[position] = value
    ids.tofile(path)


def _truncate(path, keep_bytes):
    path.write_bytes(path.read_bytes()[:keep_bytes])


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize("damage, message", [
    # Offsets that point past the ids, or back.
    (lambda d: _write_offsets(d, "shard-00001", lambda o: o.__setitem__(-1, o[-1] + 5)),
     r"shard-00001.ids: size \d+ bytes, expected \d+"),
    (lambda d: _write_offsets(d, "shard-00000", lambda o: o.__setitem__(2, o[3] + 1)),
     r"shard-00000.offsets: offsets must start at 0 and never decrease \(offsets\[3\] = \d+ < offsets\[2\]"),
    (lambda d: _write_offsets(d, "shard-00002", lambda o: o.__setitem__(0, 3)),
     r"shard-00002.offsets: .*\(offsets\[0\] = 3\)"),
    # Truncated shards.
    (lambda d: _truncate(d / "shard-00001.ids", 11), r"shard-00001.ids: size 11 bytes, expected"),
    (lambda d: _truncate(d / "shard-00000.offsets", 20), "shard-00000.offsets: size 20 is not a positive multiple"),
    (lambda d: _truncate(d / "shard-00000.offsets", 0), "shard-00000.offsets: size 0 is not a positive multiple"),
    (lambda d: (d / "shard-00002.ids").unlink(), "shard-00002.ids: shard file missing"),
    # Ids the tokenizer cannot have made.
    (lambda d: _write_id(d, "shard-00001", 7, 300), r"shard-00001.ids: id 300 \(first bad id at token 7\) is >= "
                                                     "vocab_size=260"),
    (lambda d: _edit_meta(d, lambda m: _set(m, "vocab_size", 100)), r"shard-00000.ids: id \d+ .* >= vocab_size=100"),
    # A meta.json that lies.
    (lambda d: _edit_meta(d, lambda m: _set(m, "num_tokens", m["num_tokens"] + 1)),
     r"meta.json: num_sentences=12, num_tokens=\d+, but the shards hold 12 and \d+"),
    (lambda d: _edit_meta(d, lambda m: m["shards"][1].update(num_sentences=4)),
     "meta.json: shard shard-00001 should hold 4 sentences"),
    (lambda d: _edit_meta(d, lambda m: m["shards"][0].update(name="../../etc/passwd")),
     r"meta.json: shards\[0\]=.*etc/passwd.*expected \{'name': 'shard-00000'"),
    (lambda d: _edit_meta(d, lambda m: m["shards"][2].update(num_tokens=-1)), r"meta.json: shards\[2\]="),
    (lambda d: _edit_meta(d, lambda m: m["shards"].append("shard-00003")), r"meta.json: shards\[3\]='shard-00003'"),
    (lambda d: _edit_meta(d, lambda m: _set(m, "dtype", "uint32")),
     "meta.json: dtype='uint32' with vocab_size=260, expected a positive vocab_size and the dtype prepare picks"),
    (lambda d: _edit_meta(d, lambda m: _set(m, "vocab_size", 0)), "meta.json: dtype='uint16' with vocab_size=0"),
    (lambda d: _edit_meta(d, lambda m: m["special_token_ids"].update(pad_id=260)),
     r"meta.json: special_token_ids\['pad_id'\]=260, expected an id in \[0, 260\)"),
    (lambda d: _edit_meta(d, lambda m: _set(m, "shards", {})), "meta.json: shards={}, expected a list"),
])
def test_a_damaged_corpus_is_refused_at_open_naming_the_file(corpus_dir, damage, message):
    damage(corpus_dir)
    with pytest.raises(ValueError, match=message):
        TokenizedCorpus(corpus_dir)


def test_a_meta_json_claiming_a_larger_vocab_than_the_tokenizer_is_refused(corpus_dir):
    # Ids up to the claimed vocab would pass the id check: the tokenizer check compares the sizes too.
    _edit_meta(corpus_dir, lambda m: _set(m, "vocab_size", 1000))
    corpus = TokenizedCorpus(corpus_dir)
    with pytest.raises(ValueError, match=r"vocab_size=1000\), but the tokenizer given has .*vocab_size=260"):
        corpus.check_tokenizer(ByteTokenizer())


class FullDisk:
    """An `open` for the prepare module whose binary files raise ENOSPC once `budget` bytes have been written."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", **kwargs):
        file = open(path, mode, **kwargs)
        if "b" not in mode:
            return file
        disk = self
        original_write = file.write

        class Limited:
            def __getattr__(self, name):
                return getattr(file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                file.close()

            def write(self, data):
                if len(data) > disk.budget:
                    original_write(bytes(data)[:disk.budget])
                    disk.budget = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.budget -= len(data)
                return original_write(data)

        return Limited()


def test_a_full_disk_while_writing_a_shard_leaves_an_unfinished_corpus_that_a_rerun_completes(tmp_path,
                                                                                              monkeypatch):
    out = tmp_path / "corpus"
    expected = prepare_corpus(iter(SENTENCES), ByteTokenizer(), tmp_path / "straight", shard_size=5, progress=False)
    # Room for shard 0 (ids and offsets), not for shard 1.
    room = sum((tmp_path / "straight" / f"shard-00000.{kind}").stat().st_size for kind in ("ids", "offsets"))
    monkeypatch.setattr(prepare_module, "open", FullDisk(budget=room + 10), raising=False)
    with pytest.raises(OSError, match=rf"prepare: writing {out}/shard-00001 failed \(No space left on device\); "
                                      "the 1 shard\\(s\\) finished before it are kept"):
        prepare_corpus(iter(SENTENCES), ByteTokenizer(), out, shard_size=5, progress=False)
    monkeypatch.undo()
    assert not (out / "meta.json").exists(), "the corpus must not look finished"
    assert not list(out.glob("*.tmp")), "no half-written file is left behind"
    with pytest.raises(ValueError, match="meta.json: missing"):
        TokenizedCorpus(out)
    resumed = prepare_corpus(iter(SENTENCES), ByteTokenizer(), out, shard_size=5, progress=False)  # space freed
    assert [resumed[i].tolist() for i in range(len(resumed))] == [expected[i].tolist() for i in range(len(expected))]
