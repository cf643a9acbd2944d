"""Tokenizer benchmark: fastlm's native BPE against HF `tokenizers`, `rustbpe`, `tiktoken` and `sentencepiece`.

All on the ko-en corpus (train split, Korean and English lines interleaved, 10 MB; compression on the test split),
side by side in one run:
  - training time and extra peak memory, each trainer in a fresh subprocess so peaks never mix (vocab 32000, 8000);
  - encoding MB/s on short lines and on 64 KiB chunks, and decoding MB/s (ids to str, short lines); byte level:
    tiktoken built from OUR ranks, rustbpe, HF loaded from our export; char level: sentencepiece BPE with byte
    fallback. Each provider in its best mode: on 1 thread the faster of a loop of one-text calls and its batch call
    on 1 thread, on all threads the faster of that loop and its batch call on all threads; the notes name the mode
    that won and give the other's number. rustbpe decodes through its tiktoken export (its own decode is not meant
    for use: the notes give its speed);
  - compression: tokens per sentence on the test split, Korean and English apart, char vs byte level, with the
    byte-fallback tokens counted.

Without ../shared/data/ko-en it measures the small sample in fastlm/demo_data (and says so); peers that are not
installed (`pip install -e ".[bench]"`) are left out, each named in one line.

    python benchmarks/tokenizer.py [--quick] [--json PATH] [--data DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing

from benchmarks.harness import Measurement, Row, base_parser, peak_memory_mib, report, time_call  # noqa: E402
from fastlm import Tokenizer  # noqa: E402
from fastlm.reference_bpe import CL100K_PATTERN  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ko-en"
DEMO_DATA = Path(__file__).resolve().parents[1] / "fastlm" / "demo_data"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
CHUNK_BYTES = 64 * 1024
DECODE_SAMPLE_LINES = 16000
THREADS = os.cpu_count() or 1
PEER_MODULES = {"rustbpe": "rustbpe", "hf-tokenizers": "tokenizers", "tiktoken": "tiktoken",
                "sentencepiece": "sentencepiece"}  # provider -> the module (and pip package) it needs


def fail(message: str) -> None:
    print(f"benchmarks/tokenizer.py: {message}", file=sys.stderr)
    sys.exit(2)


def installed_peers() -> set[str]:
    """The peers whose package is installed; each missing one is named in one line (none at all: exit 2)."""
    missing = [name for name, module in PEER_MODULES.items() if importlib.util.find_spec(module) is None]
    for name in missing:
        print(f"benchmarks/tokenizer.py: leaving out {name}: the {PEER_MODULES[name]!r} package is not installed "
              f'(pip install -e ".[bench]")', file=sys.stderr)
    if len(missing) == len(PEER_MODULES):
        fail(f"no peer to compare with: none of {', '.join(PEER_MODULES.values())} is installed "
             '(pip install -e ".[bench]")')
    return set(PEER_MODULES) - set(missing)


@dataclass
class Corpus:
    """Where the text comes from: train and test files per language, and how much of it to use."""
    description: str
    train: dict[str, Path]  # language -> file
    test: dict[str, Path]
    limit_bytes: int
    vocab_sizes: tuple[int, ...]


def find_corpus(data: Path | None, quick: bool) -> Corpus:
    """--data (which must hold train/test .ko/.en), else ../shared/data/ko-en, else the demo sample (said so)."""
    directory = data or SHARED_DATA
    files = {(split, language): directory / f"{split}.{language}"
             for split in ("train", "test") for language in ("ko", "en")}
    if all(path.is_file() for path in files.values()):
        return Corpus(f"`{directory}` train split", {lang: files["train", lang] for lang in ("ko", "en")},
                      {lang: files["test", lang] for lang in ("ko", "en")},
                      2_000_000 if quick else 10_000_000, (8000,) if quick else (32000, 8000))
    missing = next(path for path in files.values() if not path.is_file())
    if data is not None:
        fail(f"--data {data}: {missing.name} not found (expected train.ko, train.en, test.ko, test.en)")
    sample = {language: DEMO_DATA / f"sample.{language}" for language in ("ko", "en")}
    print(f"benchmarks/tokenizer.py: {SHARED_DATA} not found: measuring the small demo sample in {DEMO_DATA} "
          "(vocab 1000), not comparable with docs/PERFORMANCE.md", file=sys.stderr)
    return Corpus(f"the demo sample `fastlm/demo_data` (no {SHARED_DATA}; compression on the same sample)",
                  sample, sample, sum(path.stat().st_size for path in sample.values()), (1000,))


def interleaved_lines(files: dict[str, Path], limit_bytes: int) -> list[str]:
    """Korean and English lines, alternating, until limit_bytes of UTF-8."""
    ko = files["ko"].read_text(encoding="utf-8").splitlines()
    en = files["en"].read_text(encoding="utf-8").splitlines()
    lines, size = [], 0
    for pair in zip(ko, en):
        for line in pair:
            lines.append(line)
            size += len(line.encode()) + 1
        if size >= limit_bytes:
            break
    return lines


def chunks_of(lines: list[str], chunk_bytes: int) -> list[str]:
    """Whole lines joined into texts of about chunk_bytes each."""
    chunks, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line.encode()) + 1
        if size >= chunk_bytes:
            chunks.append("\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n".join(current))
    return chunks


def utf8_megabytes(texts: list[str]) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


# ---- training, one trainer per subprocess ------------------------------------------------------------------------
def train_fastlm(level: str, corpus: Path, vocab_size: int, workdir: Path):
    return Tokenizer.train(corpus, vocab_size=vocab_size, level=level, special_tokens=SPECIAL_TOKENS)


def train_rustbpe(level: str, corpus: Path, vocab_size: int, workdir: Path):
    import rustbpe

    tokenizer = rustbpe.Tokenizer()
    with open(corpus, encoding="utf-8") as lines:
        tokenizer.train_from_iterator((line.rstrip("\n") for line in lines), vocab_size, pattern=CL100K_PATTERN)
    return tokenizer


def train_hf(level: str, corpus: Path, vocab_size: int, workdir: Path):
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    if level == "byte":
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = HFTokenizer(models.BPE(byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train([str(corpus)], trainer)
    return tokenizer


def train_sentencepiece(level: str, corpus: Path, vocab_size: int, workdir: Path):
    import sentencepiece as spm

    prefix = workdir / f"sentencepiece-{vocab_size}"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.9995, byte_fallback=True, num_threads=THREADS, minloglevel=2,
        max_sentence_length=1 << 20, hard_vocab_limit=False,  # the demo sample cannot fill every vocab size
    )
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


TRAINERS = {
    "byte": {"fastlm": train_fastlm, "rustbpe": train_rustbpe, "hf-tokenizers": train_hf},
    "char": {"fastlm": train_fastlm, "sentencepiece": train_sentencepiece, "hf-tokenizers": train_hf},
}


def train_in_subprocess(level: str, provider: str, corpus: Path, vocab_size: int) -> Measurement:
    command = [sys.executable, __file__, "--train-one", level, provider, str(corpus), str(vocab_size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Measurement(provider, result["seconds"], peak_mib=result["peak_mib"])


def train_one(level: str, provider: str, corpus: str, vocab_size: str) -> None:
    """Child process: train once, print {"seconds", "peak_mib"} as the last line."""
    with tempfile.TemporaryDirectory() as workdir:
        def timed() -> float:
            started = time.perf_counter()
            TRAINERS[level][provider](level, Path(corpus), int(vocab_size), Path(workdir))
            return time.perf_counter() - started

        seconds, peak = peak_memory_mib(timed)
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


# ---- encoding and decoding ----------------------------------------------------------------------------------------
@dataclass
class Calls:
    """A provider's calls: one text (or one id list) on the caller's thread, and its batch calls (texts, threads)."""
    encode: Callable[[str], Sequence[int]] | None
    encode_batch: Callable[[list[str], int], object] | None
    decode: Callable[[Sequence[int]], str] | None
    decode_batch: Callable[[list, int], list[str]] | None
    batch_threads: tuple[int, ...] = (1, THREADS)  # the thread counts its batch calls can be run on


def fastlm_calls(ours: Tokenizer) -> Calls:
    return Calls(ours.encode, lambda texts, threads: ours.encode_batch(texts, num_threads=threads),
                 ours.decode, lambda batch, threads: ours.decode_batch(batch, num_threads=threads))


def fastlm_numpy_calls(ours: Tokenizer) -> Calls:
    """encode_batch(..., return_numpy=True): ids and offsets arrays, what `fastlm prepare` uses (encoding only)."""
    return Calls(None, lambda texts, threads: ours.encode_batch(texts, num_threads=threads, return_numpy=True),
                 None, None)


def hf_calls(path: Path) -> Calls:
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(path))

    def in_parallel(call: Callable, threads: int):
        # Its pool is sized once per process (RAYON_NUM_THREADS); TOKENIZERS_PARALLELISM, read at every call,
        # turns it off for the 1-thread mode.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
        try:
            return call()
        finally:
            os.environ["TOKENIZERS_PARALLELISM"] = "true"

    return Calls(lambda text: hf.encode(text, add_special_tokens=False).ids,
                 lambda texts, threads: in_parallel(lambda: hf.encode_batch(texts, add_special_tokens=False), threads),
                 lambda ids: hf.decode(ids, skip_special_tokens=False),
                 lambda batch, threads: in_parallel(lambda: hf.decode_batch(batch, skip_special_tokens=False), threads))


def tiktoken_calls(encoding) -> Calls:
    return Calls(encoding.encode_ordinary,
                 lambda texts, threads: encoding.encode_ordinary_batch(texts, num_threads=threads),
                 encoding.decode, lambda batch, threads: encoding.decode_batch(batch, num_threads=threads))


def rustbpe_calls(rust) -> tuple[Calls, Callable]:
    """rustbpe's encode calls (its batch call on its fixed pool only), and decoding through its tiktoken export:
    rustbpe trains, and hands its ranks to tiktoken for inference. Also its own decode, for the notes."""
    import tiktoken

    export = tiktoken.Encoding(name="rustbpe-export", pat_str=rust.get_pattern(),
                               mergeable_ranks=dict(rust.get_mergeable_ranks()), special_tokens={})
    calls = Calls(rust.encode, lambda texts, threads: rust.batch_encode(texts), export.decode,
                  lambda batch, threads: export.decode_batch(batch, num_threads=threads), batch_threads=(THREADS,))
    return calls, rust.decode


def sentencepiece_calls(sp) -> Calls:
    return Calls(sp.encode, lambda texts, threads: sp.encode(texts, num_threads=threads),
                 sp.decode, lambda batch, threads: sp.decode(batch, num_threads=threads))


def best_mode_row(case: str, megabytes: float, modes: dict[str, dict[str, Callable]], timing: dict,
                  notes: list[str]) -> Row:
    """Each provider's fastest mode in MB/s; the notes name it and give the other modes' numbers."""
    row = Row(case, "MB/s", higher_is_better=True)
    described = []
    for provider, calls in modes.items():
        speeds = {mode: megabytes / time_call(call, **timing) for mode, call in calls.items()}
        best = max(speeds, key=speeds.get)
        row.results.append(Measurement(provider, speeds[best]))
        others = ", ".join(f"{mode} {speed:.3g}" for mode, speed in speeds.items() if mode != best)
        described.append(f"{provider} {best}" + (f" ({others})" if others else ""))
    notes.append(f"{case}: {'; '.join(described)}.")
    return row


def modes_on(threads: int, providers: dict[str, Calls], loop: Callable[[str, Calls], Callable | None],
             batch: Callable[[str, Calls, int], Callable | None]) -> dict[str, dict[str, Callable]]:
    """Per provider, its modes on `threads` threads: its loop of one-text calls, and its batch call where it can
    run on that many threads (builders return None for a call a provider lacks)."""
    modes = {}
    for name, calls in providers.items():
        options = {}
        if (call := loop(name, calls)) is not None:
            options["loop"] = call
        if threads in calls.batch_threads and (call := batch(name, calls, threads)) is not None:
            options[f"batch {threads}t"] = call
        if options:
            modes[name] = options
    return modes


def speed_rows(level: str, providers: dict[str, Calls], lines: list[str], timing: dict, notes: list[str]) -> list[Row]:
    rows = []
    budgets = sorted({1, THREADS})

    def threads_named(threads: int) -> str:
        return f"{threads} thread{'s' * (threads > 1)}"

    for texts, what in ((lines, "short lines"), (chunks_of(lines, CHUNK_BYTES), "64 KiB chunks")):
        megabytes = utf8_megabytes(texts)
        for threads in budgets:
            modes = modes_on(
                threads, providers,
                lambda name, calls, texts=texts: calls.encode and (lambda: [calls.encode(t) for t in texts]),
                lambda name, calls, n, texts=texts: calls.encode_batch and (lambda: calls.encode_batch(texts, n)))
            rows.append(best_mode_row(f"{level}: encode, {what}, {threads_named(threads)}", megabytes, modes, timing,
                                      notes))
    sample = lines[:DECODE_SAMPLE_LINES]
    decoders = {name: calls for name, calls in providers.items() if calls.decode is not None}
    encoded = {name: [list(calls.encode(t)) for t in sample] for name, calls in decoders.items()}
    for threads in budgets:
        modes = modes_on(
            threads, decoders,
            lambda name, calls: lambda ids=encoded[name]: [calls.decode(i) for i in ids],
            lambda name, calls, n: calls.decode_batch and (lambda ids=encoded[name]: calls.decode_batch(ids, n)))
        rows.append(best_mode_row(f"{level}: decode to str, {len(sample)} short lines, {threads_named(threads)}",
                                  utf8_megabytes(sample), modes, timing, notes))
    return rows


def byte_level_providers(ours: Tokenizer, corpus: Path, workdir: Path, peers: set[str], notes: list[str],
                         sample: list[str]) -> dict[str, Calls]:
    """fastlm and each installed byte-level peer; all but rustbpe use our exact vocabulary."""
    providers = {"fastlm": fastlm_calls(ours), "fastlm numpy": fastlm_numpy_calls(ours)}
    if "tiktoken" in peers:
        providers["tiktoken"] = tiktoken_calls(ours.to_tiktoken())
    if "rustbpe" in peers:
        rust = train_rustbpe("byte", corpus, ours.vocab_size - len(SPECIAL_TOKENS), workdir)
        if "tiktoken" in peers:
            providers["rustbpe"], own_decode = rustbpe_calls(rust)
            few = [rust.encode(text) for text in sample[:200]]
            seconds = time_call(lambda: [own_decode(ids) for ids in few], warmup=0, repeat=1)
            notes.append(f"rustbpe decodes through its tiktoken export; its own decode ran at "
                         f"{utf8_megabytes(sample[:200]) / seconds:.3g} MB/s (200 lines, byte level).")
        else:  # its own decode takes minutes here: encoding rows only
            providers["rustbpe"] = Calls(rust.encode, lambda texts, threads: rust.batch_encode(texts), None, None,
                                         batch_threads=(THREADS,))
    if "hf-tokenizers" in peers:
        path = workdir / "fastlm-byte-hf.json"
        ours.save_huggingface(path)
        providers["hf-tokenizers"] = hf_calls(path)
    return providers


# ---- compression --------------------------------------------------------------------------------------------------
def compression_rows(byte_tok: Tokenizer, char_tok: Tokenizer, sp, test: dict[str, Path]) -> tuple[list[Row], str]:
    fallback = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 256)  # our byte-fallback ids (char level)
    sp_fallback = {sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)} if sp is not None else set()
    rows, notes = [], []
    for language, name in (("ko", "Korean"), ("en", "English")):
        sentences = test[language].read_text(encoding="utf-8").splitlines()
        ours_char = [char_tok.encode(s) for s in sentences]
        row = Row(f"tokens/sentence, {name} test (fastlm = char level)", "tokens", higher_is_better=False)
        row.results += [
            Measurement("fastlm", sum(map(len, ours_char)) / len(sentences)),
            Measurement("fastlm byte", sum(len(byte_tok.encode(s)) for s in sentences) / len(sentences)),
        ]
        note = (f"{name} test ({len(sentences)} sentences): byte-fallback tokens fastlm char "
                f"{sum(i in fallback for ids in ours_char for i in ids)}")
        if sp is not None:
            theirs = [sp.encode(s) for s in sentences]
            row.results.append(Measurement("sentencepiece", sum(map(len, theirs)) / len(sentences)))
            note += f", sentencepiece {sum(i in sp_fallback for ids in theirs for i in ids)}"
        rows.append(row)
        notes.append(note)
    return rows, "; ".join(notes) + "."


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help=f"directory with train/test .ko/.en (default: {SHARED_DATA}, "
                        "else the demo sample)")
    parser.add_argument("--train-one", nargs=4, metavar=("LEVEL", "PROVIDER", "CORPUS", "VOCAB"),
                        help=argparse.SUPPRESS)  # the subprocess side of train_in_subprocess
    args = parser.parse_args()
    # HF tokenizers and rustbpe size their thread pools when first used: every core (2 on CI).
    os.environ.setdefault("RAYON_NUM_THREADS", str(THREADS))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.train_one:
        train_one(*args.train_one)
        return
    peers = installed_peers()
    source = find_corpus(args.data, args.quick)
    timing = {"warmup": 0, "repeat": 1} if args.quick else {"warmup": 1, "repeat": 5}
    lines = interleaved_lines(source.train, source.limit_bytes)
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus = workdir / "train.ko-en.txt"
        corpus.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        corpus_megabytes = corpus.stat().st_size / 1e6
        for vocab_size in source.vocab_sizes:
            for level, trainers in TRAINERS.items():
                row = Row(f"{level}: train, vocab {vocab_size}, {corpus_megabytes:.3g} MB", "s", higher_is_better=False)
                row.results += [train_in_subprocess(level, provider, corpus, vocab_size) for provider in trainers
                                if provider == "fastlm" or provider in peers]
                rows.append(row)
        vocab_size = source.vocab_sizes[0]
        byte_tok = Tokenizer.train(corpus, vocab_size=vocab_size, level="byte", special_tokens=SPECIAL_TOKENS)
        char_tok = Tokenizer.train(corpus, vocab_size=vocab_size, level="char", special_tokens=SPECIAL_TOKENS)
        byte_providers = byte_level_providers(byte_tok, corpus, workdir, peers, notes, lines[:DECODE_SAMPLE_LINES])
        rows += speed_rows("byte", byte_providers, lines, timing, notes)
        char_providers = {"fastlm": fastlm_calls(char_tok), "fastlm numpy": fastlm_numpy_calls(char_tok)}
        sp = None
        if "sentencepiece" in peers:
            sp = train_sentencepiece("char", corpus, char_tok.vocab_size, workdir)
            char_providers["sentencepiece"] = sentencepiece_calls(sp)
        rows += speed_rows("char", char_providers, lines, timing, notes)
        compression, compression_notes = compression_rows(byte_tok, char_tok, sp, source.test)
        rows += compression
    report(f"Tokenizers on ko-en ({len(lines)} lines, vocab {vocab_size} for speed and compression)", rows,
           json_path=args.json,
           notes=f"Corpus: {source.description}. Threads: {THREADS}. Training memory: extra peak RSS of the training "
                 f"call. {compression_notes}\nThe mode each provider ran in (the other mode's MB/s in parentheses; "
                 f"'loop': one call per text):\n" + "\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
