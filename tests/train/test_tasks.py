"""The training jobs' batch sources: the config's batch_size, or its max_tokens budget, decides every batch."""

import sys
from pathlib import Path

import pytest

from fastlm.data import ParallelLines, prepare_parallel_corpus
from fastlm.train.config import TrainConfig
from fastlm.train.tasks import check_packing, lm_batches, translation_batches

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from data_helpers import ByteTokenizer, write_lines  # noqa: E402

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    # 3 to 24 bytes a sentence (one token each with the byte tokenizer): rows 8 to 32 tokens wide once padded.
    korean = [f"{i}번{'은' * (i % 7)}." for i in range(40)]
    english = [f"L{i}{' and' * (i % 5)}." for i in range(40)]
    lines = ParallelLines(write_lines(root / "x.ko", korean), write_lines(root / "x.en", english))
    return prepare_parallel_corpus(lines, TOKENIZER, root / "pairs", progress=False)


@pytest.mark.parametrize("max_tokens", [0, 96])
def test_the_config_decides_the_batches_of_every_task(pairs, max_tokens):
    config = TrainConfig(batch_size=4, max_len=32, max_tokens=max_tokens)
    sources = {"encoder": lm_batches("encoder", pairs.src, TOKENIZER, config, validation=False),
               "decoder": lm_batches("decoder", pairs.tgt, TOKENIZER, config, validation=False),
               "translation": translation_batches(pairs, TOKENIZER, config, validation=False)}
    for name, source in sources.items():
        batches = [source.batch(0, index) for index in range(source.num_batches(0))]
        rows = [len(next(iter(batch.values()))) for batch in batches]
        widths = [max(value.shape[1] for key, value in batch.items() if key.endswith("ids")) for batch in batches]
        if max_tokens:
            assert all(count * width <= max_tokens for count, width in zip(rows, widths)), name
            # The budget, not batch_size, decides: short rows come more than 4 to a batch, 32-token blocks 3.
            assert max(rows) == 3 if name == "decoder" else max(rows) > 4, name
        else:
            assert max(rows) == 4, name


@pytest.mark.parametrize("task", ["encoder", "translation"])
def test_packing_packs_the_training_batches_of_the_encoder_and_translation_only(pairs, task):
    def source(config: TrainConfig, validation: bool):
        if task == "encoder":
            return lm_batches("encoder", pairs.src, TOKENIZER, config, validation=validation)
        return translation_batches(pairs, TOKENIZER, config, validation=validation)

    config = TrainConfig(batch_size=4, max_len=32, packing=True)
    train, valid = source(config, validation=False), source(config, validation=True)
    ids, offsets = {"encoder": ("input_ids", "cu_seqlens"), "translation": ("src_ids", "src_cu_seqlens")}[task]
    assert offsets in train.batch(0, 0) and len(train.batch(0, 0)[ids]) <= 4
    # Validation keeps one sentence (pair) per row: every run is scored on the same batches, packed or not.
    assert offsets not in valid.batch(0, 0)
    assert train.num_batches(0) < source(TrainConfig(batch_size=4, max_len=32), validation=False).num_batches(0)


def test_packing_is_refused_where_sentences_are_not_packed():
    with pytest.raises(ValueError, match="packing=True with pretrain-decoder: only encoder pre-training"):
        check_packing(TrainConfig(packing=True), "pretrain-decoder")
    for task in ("pretrain-encoder", "finetune"):
        check_packing(TrainConfig(packing=True), task)
