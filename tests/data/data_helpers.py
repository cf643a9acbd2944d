"""A tiny stand-in tokenizer with the Tokenizer methods the data pipeline uses, and a file helper.

The pipeline's byte layout and batching do not depend on how text is tokenised, so most tests use this fast,
transparent tokenizer (one id per UTF-8 byte); test_corpus.py also runs `prepare` with the real fastlm.Tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")


class ByteTokenizer:
    """id = first_byte_id + byte: by default a 260-id vocabulary (uint16 corpora); a large first_byte_id puts
    ids above 65535 (uint32 corpora). `fail_on_call` makes that encode_batch call raise (an interrupted run)."""

    def __init__(self, vocab_size: int = 260, first_byte_id: int = 4, fail_on_call: int | None = None):
        assert first_byte_id + 256 <= vocab_size
        self.vocab_size, self.first_byte_id, self.fail_on_call = vocab_size, first_byte_id, fail_on_call
        self.special_tokens = SPECIAL_TOKENS
        self.special_ids = frozenset(range(len(SPECIAL_TOKENS)))
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(4)
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        return [self.first_byte_id + byte for byte in text.encode("utf-8")]

    def encode_batch(self, texts, num_threads=None, return_numpy=False):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError(f"encode_batch call {self.calls} fails on purpose")
        batch = [self.encode(text) for text in texts]
        if not return_numpy:
            return batch
        offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in batch])]).astype(np.int64)
        return np.array([i for ids in batch for i in ids], dtype=np.uint32), offsets

    def decode(self, ids) -> str:
        return bytes(int(i) - self.first_byte_id for i in ids if int(i) >= self.first_byte_id).decode("utf-8")

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"byte_tokenizer": [self.vocab_size, self.first_byte_id]}))


def write_lines(path: Path, lines, ending: str = "\n") -> Path:
    path.write_bytes("".join(line + ending for line in lines).encode("utf-8"))
    return path
