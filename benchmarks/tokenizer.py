"""Tokenizer benchmark: fastlm's native BPE against HF `tokenizers`, `rustbpe`, `tiktoken` and `sentencepiece`.

All on the ko-en corpus (train split, Korean and English lines interleaved, 10 MB; compression on the test split),
side by side in one run:
  - training time and extra peak memory, each trainer in a fresh subprocess so peaks never mix (vocab 32000, 8000);
  - encoding MB/s: one call per line on one thread, and the batch APIs on all threads; on short lines and on
    64 KiB chunks (byte level: tiktoken built from OUR ranks, rustbpe, HF loaded from our export; char level:
    sentencepiece BPE with byte fallback);
  - decoding MB/s (to str, on a 4000-line sample);
  - compression: tokens per sentence on the test split, Korean and English apart, char vs byte level, with the
    byte-fallback tokens counted.

    python benchmarks/tokenizer.py [--quick] [--json PATH] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# HF tokenizers sizes its thread pool when first used; the batch rows use every core (2 on CI).
os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing

from benchmarks.harness import Measurement, Row, base_parser, peak_memory_mib, report, time_call  # noqa: E402
from fastlm import Tokenizer  # noqa: E402
from fastlm.reference_bpe import CL100K_PATTERN  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ko-en"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
CHUNK_BYTES = 64 * 1024
DECODE_SAMPLE_LINES = 4000
THREADS = os.cpu_count() or 1


def interleaved_lines(data_dir: Path, split: str, limit_bytes: int) -> list[str]:
    """Korean and English lines of a split, alternating, until limit_bytes of UTF-8."""
    ko = (data_dir / f"{split}.ko").read_text(encoding="utf-8").splitlines()
    en = (data_dir / f"{split}.en").read_text(encoding="utf-8").splitlines()
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
        max_sentence_length=1 << 20,
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
def throughput(case: str, megabytes: float, providers: dict, timing: dict) -> Row:
    row = Row(case, "MB/s", higher_is_better=True)
    for name, fn in providers.items():
        row.results.append(Measurement(name, megabytes / time_call(fn, **timing)))
    return row


def fastlm_functions(ours: Tokenizer) -> tuple:
    """(encode, batch encode, decode) like every peer's, then the tokenizer itself for its numpy batch output."""
    return ours.encode, lambda texts: ours.encode_batch(texts, num_threads=THREADS), ours.decode, ours


def byte_level_peers(ours: Tokenizer, corpus: Path, lines: list[str], workdir: Path) -> dict:
    """(encode, batch encode, decode) of each byte-level peer; all but rustbpe use our exact vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer

    tiktoken_encoding = ours.to_tiktoken()
    rust = train_rustbpe("byte", corpus, ours.vocab_size - len(SPECIAL_TOKENS), workdir)
    hf_path = workdir / "fastlm-byte-hf.json"
    ours.save_huggingface(hf_path)
    hf = HFTokenizer.from_file(str(hf_path))
    return {
        "fastlm": fastlm_functions(ours),
        "tiktoken": (tiktoken_encoding.encode_ordinary,
                     lambda texts: tiktoken_encoding.encode_ordinary_batch(texts, num_threads=THREADS),
                     tiktoken_encoding.decode),
        "rustbpe": (rust.encode, rust.batch_encode, rust.decode),
        "hf-tokenizers": (lambda text: hf.encode(text, add_special_tokens=False).ids,
                          lambda texts: hf.encode_batch(texts, add_special_tokens=False), hf.decode),
    }


def char_level_peers(ours: Tokenizer, corpus: Path, workdir: Path) -> dict:
    sp = train_sentencepiece("char", corpus, ours.vocab_size, workdir)
    return {
        "fastlm": fastlm_functions(ours),
        "sentencepiece": (sp.encode, lambda texts: sp.encode(texts, num_threads=THREADS), sp.decode),
    }, sp


def speed_rows(level: str, peers: dict, lines: list[str], timing: dict) -> list[Row]:
    chunks = chunks_of(lines, CHUNK_BYTES)
    rows = []
    for texts, what in ((lines, "short lines"), (chunks, "64 KiB chunks")):
        megabytes = utf8_megabytes(texts)
        one = {name: (lambda encode=fns[0], texts=texts: [encode(t) for t in texts]) for name, fns in peers.items()}
        batch = {name: (lambda encode=fns[1], texts=texts: encode(texts)) for name, fns in peers.items()}
        ours = peers["fastlm"][3]
        batch["fastlm numpy"] = lambda texts=texts: ours.encode_batch(texts, num_threads=THREADS, return_numpy=True)
        rows.append(throughput(f"{level}: encode, 1 thread, {what}", megabytes, one, timing))
        rows.append(throughput(f"{level}: encode batch, {THREADS} threads, {what}", megabytes, batch, timing))
    # A sample: rustbpe's decode runs at well under 1 MB/s, which would make the whole corpus take minutes.
    sample = lines[:DECODE_SAMPLE_LINES]
    encoded = {name: [fns[0](t) for t in sample] for name, fns in peers.items()}
    decode = {name: (lambda decode=fns[2], ids=encoded[name]: [decode(i) for i in ids]) for name, fns in peers.items()}
    rows.append(throughput(f"{level}: decode to str, 1 thread, {len(sample)} short lines", utf8_megabytes(sample),
                           decode, timing))
    return rows


# ---- compression --------------------------------------------------------------------------------------------------
def compression_rows(byte_tok: Tokenizer, char_tok: Tokenizer, sp, data_dir: Path) -> tuple[list[Row], str]:
    fallback = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 256)  # our byte-fallback ids (char level)
    sp_fallback = {sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    rows, notes = [], []
    for language, name in (("ko", "Korean"), ("en", "English")):
        sentences = (data_dir / f"test.{language}").read_text(encoding="utf-8").splitlines()
        ours_char = [char_tok.encode(s) for s in sentences]
        theirs = [sp.encode(s) for s in sentences]
        row = Row(f"tokens/sentence, {name} test (fastlm = char level)", "tokens", higher_is_better=False)
        row.results += [
            Measurement("fastlm", sum(map(len, ours_char)) / len(sentences)),
            Measurement("fastlm byte", sum(len(byte_tok.encode(s)) for s in sentences) / len(sentences)),
            Measurement("sentencepiece", sum(map(len, theirs)) / len(sentences)),
        ]
        rows.append(row)
        ours_fallback = sum(i in fallback for ids in ours_char for i in ids)
        sp_fallbacks = sum(i in sp_fallback for ids in theirs for i in ids)
        notes.append(f"{name} test ({len(sentences)} sentences): byte-fallback tokens fastlm char {ours_fallback}, "
                     f"sentencepiece {sp_fallbacks}")
    return rows, "; ".join(notes) + "."


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with train/test .ko/.en")
    parser.add_argument("--train-one", nargs=4, metavar=("LEVEL", "PROVIDER", "CORPUS", "VOCAB"),
                        help=argparse.SUPPRESS)  # the subprocess side of train_in_subprocess
    args = parser.parse_args()
    if args.train_one:
        train_one(*args.train_one)
        return
    corpus_bytes = 2_000_000 if args.quick else 10_000_000
    vocab_sizes = (8000,) if args.quick else (32000, 8000)
    timing = {"warmup": 0, "repeat": 1} if args.quick else {"warmup": 1, "repeat": 3}
    lines = interleaved_lines(args.data, "train", corpus_bytes)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpus = workdir / "train.ko-en.txt"
        corpus.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        for vocab_size in vocab_sizes:
            for level, providers in TRAINERS.items():
                row = Row(f"{level}: train, vocab {vocab_size}, {corpus_bytes / 1e6:.0f} MB", "s",
                          higher_is_better=False)
                row.results += [train_in_subprocess(level, p, corpus, vocab_size) for p in providers]
                rows.append(row)
        vocab_size = vocab_sizes[0]
        byte_tok = Tokenizer.train(corpus, vocab_size=vocab_size, level="byte", special_tokens=SPECIAL_TOKENS)
        char_tok = Tokenizer.train(corpus, vocab_size=vocab_size, level="char", special_tokens=SPECIAL_TOKENS)
        rows += speed_rows("byte", byte_level_peers(byte_tok, corpus, lines, workdir), lines, timing)
        char_peers, sp = char_level_peers(char_tok, corpus, workdir)
        rows += speed_rows("char", char_peers, lines, timing)
        compression, notes = compression_rows(byte_tok, char_tok, sp, args.data)
        rows += compression
    report(f"Tokenizers on ko-en ({len(lines)} lines, vocab {vocab_size} for speed and compression)", rows,
           json_path=args.json,
           notes=f"Threads: {THREADS}. Training memory: extra peak RSS of the training call. {notes}")


if __name__ == "__main__":
    main()
