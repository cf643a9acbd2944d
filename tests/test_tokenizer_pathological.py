"""Pathological inputs at sizes where any quadratic step would hang: one long run of one character, digits, Korean
without spaces, one run of spaces, all as single multi-megabyte lines, at both levels (pre-split, training,
encoding, decoding). Not timed: the work runs in a subprocess with a generous limit, which a linear (or n log n)
tokenizer meets in seconds and a quadratic one misses by hours (2 MiB squared is 4e12 steps).
benchmarks/tokenizer_scaling.py measures the actual growth."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIZE = 2 << 20  # bytes per input

SCRIPT = textwrap.dedent("""
    import sys
    from fastlm import Tokenizer, _native

    level, size = sys.argv[1], int(sys.argv[2])
    inputs = {
        "one character": "a" * size,
        "digits": ("0123456789" * (size // 10 + 1))[:size],
        "Korean without spaces": "".join(chr(0xAC00 + (i * 7919) % 11172) for i in range(size // 3)),
        "spaces": " " * size,
        "alternating scripts": "a가1!" * (size // 6),
    }
    for name, text in inputs.items():
        pieces = _native.pretokenize(text, level)
        tokenizer = Tokenizer.train(iter([text]), vocab_size=260 + len(set(text)) + 300, level=level,
                                    min_frequency=1, character_coverage=1.0)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, name
        batch = tokenizer.encode_batch([text[: size // 2], text[size // 2:]])
        assert tokenizer.decode_batch(batch) == [text[: size // 2], text[size // 2:]], name
        print(name, len(pieces), len(ids), flush=True)
    print("ok")
""")


@pytest.mark.parametrize("level", ["byte", "char"])
def test_multi_megabyte_lines_finish(level):
    done = subprocess.run([sys.executable, "-c", SCRIPT, level, str(SIZE)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr
