"""How the native tokenizer's cost grows on the worst inputs: pre-split, training and encoding at 1 KB, 1 MB and
10 MB of one line each (one character repeated, digits, random code points, Korean without spaces, alternating
scripts, one run of spaces), at both levels. Linear work shows ~10x per 10x of input; the "growth" column is
time(10 MB) / time(1 MB). With --large, also the extra peak memory of encoding one 100 MB line, of training on a
1 GB file (streamed from disk, in a subprocess), of training to 32k tokens on one 100 MB word, and of encode_batch on
1M lines.

    python benchmarks/tokenizer_scaling.py [--quick] [--large] [--json PATH]
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing

from benchmarks.harness import Measurement, Row, base_parser, peak_memory_mib, report, time_call  # noqa: E402
import fastlm  # noqa: E402
from fastlm import Tokenizer, _native  # noqa: E402

SIZES = {"1 KB": 1 << 10, "1 MB": 1 << 20, "10 MB": 10 << 20}
TRAIN_MERGES = 1000
ENCODE_VOCAB = 4000


def worst_inputs() -> dict[str, callable]:
    """Name -> a function giving about that many UTF-8 bytes of one line of that kind (reproducible)."""
    def random_code_points(size: int) -> str:
        rng = random.Random(0)
        points = [rng.randrange(0x20, 0x30000) for _ in range(size // 3)]
        return "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000)

    def korean(size: int) -> str:
        rng = random.Random(1)
        return "".join(chr(rng.randrange(0xAC00, 0xD7A4)) for _ in range(size // 3))

    return {
        "one char 'a'": lambda size: "a" * size,
        "digits": lambda size: ("0123456789" * (size // 10 + 1))[:size],
        "random code points": random_code_points,
        "Korean, no spaces": korean,
        "alternating 'a가1!'": lambda size: "a가1!" * (size // 6),
        "spaces": lambda size: " " * size,
    }


def sample_tokenizer(level: str) -> Tokenizer:
    sample = Path(fastlm.__file__).resolve().parent / "demo_data"
    return Tokenizer.train([sample / "sample.ko", sample / "sample.en"], vocab_size=ENCODE_VOCAB, level=level,
                           min_frequency=1)


def train_merges(text: str, level: str) -> Tokenizer:
    """Training to TRAIN_MERGES merges past the base alphabet (at char level every character of `text` is in it)."""
    alphabet = len(set(text)) if level == "char" else 0
    return Tokenizer.train(iter([text]), vocab_size=4 + 256 + alphabet + TRAIN_MERGES, level=level, min_frequency=1,
                           num_threads=1, character_coverage=1.0)


def scaling_rows(sizes: dict[str, int], repeat: int) -> list[Row]:
    rows = []
    tokenizers = {level: sample_tokenizer(level) for level in ("byte", "char")}
    for name, make in worst_inputs().items():
        texts = {label: make(size) for label, size in sizes.items()}
        for level, tokenizer in tokenizers.items():
            operations = {
                "pre-split": lambda text: _native.pretokenize(text, level),
                f"train ({TRAIN_MERGES} merges)": lambda text: train_merges(text, level),
                "encode": tokenizer.encode,
            }
            for operation, run in operations.items():
                row = Row(f"{level} {operation}: {name}", "s", higher_is_better=False)
                for label, text in texts.items():
                    row.results.append(Measurement(label, time_call(lambda: run(text), warmup=0, repeat=repeat)))
                last, before = row.results[-1].value, row.results[-2].value
                row.results.append(Measurement("growth", last / before))
                rows.append(row)
                print(f"{row.case}: {[f'{m.value:.3g}' for m in row.results]}", file=sys.stderr, flush=True)
    return rows


def _train_on_file_in_subprocess(path: Path, level: str, vocab_size: int) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of training on `path` in a fresh process. The peak is VmHWM, which starts afresh
    at exec (ru_maxrss would keep the parent's peak, inherited through fork)."""
    script = ("import re, time; from fastlm import Tokenizer; t = time.perf_counter(); "
              f"Tokenizer.train({str(path)!r}, vocab_size={vocab_size}, level={level!r}); "
              "seconds = time.perf_counter() - t; "
              "status = open('/proc/self/status').read(); "
              "print(seconds, int(re.search(r'VmHWM:\\s*(\\d+)', status).group(1)) / 1024)")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    seconds, peak = out.stdout.split()
    return float(seconds), float(peak)


def large_rows() -> list[Row]:
    rows = []
    tokenizer = sample_tokenizer("byte")
    line = "서울에서 만나요 and the quick brown fox; " * (100_000_000 // 52)
    start = time.perf_counter()
    _, peak = peak_memory_mib(lambda: tokenizer.encode_batch([line], return_numpy=True))
    rows.append(Row(f"encode_batch(return_numpy) one {len(line.encode()) / 1e6:.0f} MB line", "s", False,
                    [Measurement("time", time.perf_counter() - start, peak)]))
    lines = ["오늘 날씨가 정말 좋네요! The weather is nice today."] * 1_000_000
    start = time.perf_counter()
    _, peak = peak_memory_mib(lambda: tokenizer.encode_batch(lines, return_numpy=True))
    rows.append(Row("encode_batch(return_numpy) 1M lines", "s", False,
                    [Measurement("time", time.perf_counter() - start, peak)]))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "corpus.txt"
        block = "".join(f"{i} 서울에서 만나요 and the quick brown fox jumps over the lazy dog\n" for i in range(10000))
        with path.open("w", encoding="utf-8") as file:
            while file.tell() < 1 << 30:
                file.write(block)
        for level in ("byte", "char"):
            seconds, peak = _train_on_file_in_subprocess(path, level, 4000)
            rows.append(Row(f"{level} train on a 1 GB file (process peak RSS)", "s", False,
                            [Measurement("time", seconds, peak)]))
        # One giant pre-token: 100 MB of Korean without a space or punctuation, of 300 distinct syllables (so that
        # there are pairs to merge all the way to 32k).
        rng = random.Random(2)
        syllables = [chr(rng.randrange(0xAC00, 0xD7A4)) for _ in range(300)]
        path.write_text("".join(rng.choices(syllables, k=100_000_000 // 3)) + "\n", encoding="utf-8")
        for level in ("byte", "char"):
            seconds, peak = _train_on_file_in_subprocess(path, level, 32000)
            rows.append(Row(f"{level} train on one 100 MB word to vocab 32000 (process peak RSS)", "s", False,
                            [Measurement("time", seconds, peak)]))
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also the 100 MB line, 1 GB file and 1M-line batch")
    args = parser.parse_args()
    sizes = dict(list(SIZES.items())[:2]) if args.quick else SIZES
    rows = scaling_rows(sizes, repeat=1 if args.quick else 2)
    if args.large:
        rows += large_rows()
    report("Tokenizer scaling on worst-case inputs (seconds; growth = time at 10x the input / time at 1x)",
           rows, json_path=args.json, compare=False)


if __name__ == "__main__":
    main()
