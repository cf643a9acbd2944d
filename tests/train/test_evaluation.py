"""What the in-training evaluation scores: the whole validation split by default, or a fixed random sample of it
(config.eval_batches), never the shortest pairs that a prefix of the length-sorted batches would be."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastlm import Tokenizer
from fastlm.data import ParallelLines, prepare_parallel_corpus
from fastlm.train import TrainConfig
from fastlm.train.distributed import World
from fastlm.train.evaluation import evaluate_loss
from fastlm.train.tasks import translation_batches

# 60 pairs of lengths that vary with the index, so that sorting by length reorders them.
KO = [f"{i}번 문장{'은 길다' * (i * 7 % 11)}." for i in range(60)]
EN = [f"Sentence {i}{' goes on' * (i * 7 % 11)}." for i in range(60)]


class PairRecorder(nn.Module):
    """Stands in for a Seq2SeqLM: records the source rows it is given and scores every target 1.0."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, src_ids, src_lengths, tgt_ids, tgt_lengths, labels):
        self.seen += [tuple(row[:length].tolist()) for row, length in zip(src_ids, src_lengths)]
        n_targets = tgt_lengths.sum()
        return SimpleNamespace(loss=torch.tensor(1.0), accuracy=torch.tensor(0.5), n_targets=n_targets)


@pytest.fixture(scope="module")
def valid_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    (root / "valid.ko").write_text("".join(line + "\n" for line in KO), encoding="utf-8")
    (root / "valid.en").write_text("".join(line + "\n" for line in EN), encoding="utf-8")
    tokenizer = Tokenizer.train(KO + EN, vocab_size=300)
    pairs = prepare_parallel_corpus(ParallelLines(root / "valid.ko", root / "valid.en"), tokenizer, root / "pairs",
                                    progress=False)
    return tokenizer, pairs


def evaluated_sources(valid_pairs, **settings) -> list[str]:
    """The Korean sentences one evaluation scores, in the order it scores them."""
    tokenizer, pairs = valid_pairs
    config = TrainConfig(progress=False, max_len=64, batch_size=4, **settings)
    model = PairRecorder()
    evaluate_loss(model, translation_batches(pairs, tokenizer, config, validation=True),
                  world=World(0, 1, torch.device("cpu")))
    return [tokenizer.decode(row[1:-1]) for row in model.seen]  # without <s> ... </s>


def test_the_default_evaluation_scores_every_validation_pair_once(valid_pairs):
    assert Counter(evaluated_sources(valid_pairs)) == Counter(KO)


def test_eval_batches_scores_a_fixed_random_sample_not_the_shortest_pairs(valid_pairs):
    sample = evaluated_sources(valid_pairs, eval_batches=3)
    assert len(set(sample)) == 12 and set(sample) <= set(KO)
    shortest = sorted(KO, key=len)[:12]
    assert set(sample) != set(shortest), "a prefix of the length-sorted batches: the shortest pairs"
    assert sorted(map(len, sample)) != sorted(map(len, shortest))
    # The same sample at every evaluation and for every training seed: curves and seeds compare like with like.
    assert set(evaluated_sources(valid_pairs, eval_batches=3, seed=7)) == set(sample)
