"""benchmarks/tokenizer.py in a fresh clone: a missing ../shared corpus or peer package is said in one line."""

import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("tokenizer")


def test_without_the_shared_corpus_it_measures_the_demo_sample(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "SHARED_DATA", tmp_path / "ko-en")
    corpus = bench.find_corpus(None, quick=False)
    assert corpus.train == corpus.test and all(path.is_file() for path in corpus.train.values())
    assert bench.interleaved_lines(corpus.train, corpus.limit_bytes)
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(tmp_path / "ko-en") in message and "demo sample" in message


def test_a_data_directory_given_but_incomplete_exits_2(bench, tmp_path, capsys):
    (tmp_path / "train.ko").write_text("안녕\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        bench.find_corpus(tmp_path, quick=True)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.count("\n") == 1 and "train.en not found" in message


def test_missing_peers_are_named_and_left_out(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "PEER_MODULES", {"present": "json", "absent": "no_such_peer_module"})
    assert bench.installed_peers() == {"present"}
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "no_such_peer_module" in message and 'pip install -e ".[bench]"' in message
    monkeypatch.setattr(bench, "PEER_MODULES", {"absent": "no_such_peer_module"})
    with pytest.raises(SystemExit) as stop:
        bench.installed_peers()
    assert stop.value.code == 2 and "no peer to compare with" in capsys.readouterr().err
