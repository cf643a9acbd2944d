"""One Tokenizer shared by many Python threads: encode, encode_batch and decode give what serial calls give.

The native calls release the GIL, so these threads really run the native core at once (per-thread word caches,
the shared worker pool); the C++ side of the same is checked under ThreadSanitizer by ctest (see .ci/run).
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fastlm
from fastlm import Tokenizer

NUM_THREADS = 8
ROUNDS = 3


@pytest.fixture(scope="module")
def sample_lines() -> list[str]:
    sample = Path(fastlm.__file__).resolve().parent / "demo_data"
    lines = [line for name in ("sample.ko", "sample.en")
             for line in (sample / name).read_text(encoding="utf-8").splitlines()[:150]]
    # Long words (the heap merge path, no word cache), specials inside text, mixed scripts.
    return lines + ["a" * 5000, "가" * 2000, "<s>한국어</s> and <mask> English", "x1234567 " * 50]


@pytest.mark.parametrize("level", ["byte", "char"])
def test_threads_sharing_a_tokenizer_match_serial_calls(level, sample_lines):
    tokenizer = Tokenizer.train(iter(sample_lines), vocab_size=600, level=level, min_frequency=1)
    expected_ids = [tokenizer.encode(line) for line in sample_lines]
    expected_special = [tokenizer.encode(line, allowed_special="all") for line in sample_lines]
    expected_text = [tokenizer.decode(ids) for ids in expected_special]

    def work(worker: int) -> bool:
        # Each worker starts at another line, so that different threads encode different words at the same time.
        order = sample_lines[worker:] + sample_lines[:worker]
        def shift(values: list) -> list:
            return values[worker:] + values[:worker]

        for _ in range(ROUNDS):
            if [tokenizer.encode(line) for line in order] != shift(expected_ids):
                return False
            if tokenizer.encode_batch(order, num_threads=2) != shift(expected_ids):
                return False
            if tokenizer.encode_batch(order, allowed_special="all") != shift(expected_special):
                return False
            if [tokenizer.decode(ids) for ids in shift(expected_special)] != shift(expected_text):
                return False
            if tokenizer.decode_batch(shift(expected_special), num_threads=2) != shift(expected_text):
                return False
        return True

    with ThreadPoolExecutor(NUM_THREADS) as pool:
        assert all(pool.map(work, range(NUM_THREADS)))
