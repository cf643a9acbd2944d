"""Data: corpus readers, `prepare` (tokenised memory-mapped shards) and the batch sources the trainer iterates."""

from fastlm.data.batches import BatchSource, CausalLMBatches, MaskedLMBatches, TranslationBatches
from fastlm.data.corpus import ParallelCorpus, TokenizedCorpus, tokenizer_sha256
from fastlm.data.masking import IGNORE_INDEX, MaskingPolicy, target_positions
from fastlm.data.prepare import prepare_corpus, prepare_parallel_corpus
from fastlm.data.readers import (
    AihubPairs, CorpusFormatError, ParallelLines, Reader, TextLines, TsvPairs, open_reader,
)

__all__ = [
    "AihubPairs", "BatchSource", "CausalLMBatches", "CorpusFormatError", "IGNORE_INDEX", "MaskedLMBatches",
    "MaskingPolicy", "ParallelCorpus", "ParallelLines", "Reader", "TextLines", "TokenizedCorpus",
    "TranslationBatches", "TsvPairs", "open_reader", "prepare_corpus", "prepare_parallel_corpus",
    "target_positions", "tokenizer_sha256",
]
