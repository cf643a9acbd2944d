"""Coverage-guided fuzzing (atheris) of the Python layer over the native core: `Tokenizer.load` of arbitrary
files, `encode` with allowed special tokens, and `decode` of arbitrary id lists.

Run with `tests/fuzz/run.sh atheris SECONDS` (or `python tests/fuzz/fuzz_tokenizer_files.py -max_total_time=60`).
The corpus (build/fuzz/corpus/atheris) starts from files that `save` wrote, so mutations stay close to the format.
Invariants: loading raises ValueError naming the file or gives a tokenizer that round-trips text; encoding with
specials round-trips (after normalisation at char level); decoding raises ValueError or TypeError or gives a str.
"""

import sys
import tempfile
import unicodedata
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["fastlm"]):
    from fastlm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "build" / "fuzz" / "corpus" / "atheris"
SEED_LINES = [line for path in sorted((ROOT / "tests" / "fuzz" / "seeds").glob("*.txt"))
              for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
SPECIALS = ("<pad>", "<s>", "</s>", "<mask>")
TOKENIZERS = [Tokenizer.train(iter(SEED_LINES * 3), vocab_size=vocab, level=level, min_frequency=1,
                              special_tokens=SPECIALS) for level, vocab in (("byte", 320), ("char", 420))]
FILE = Path(tempfile.mkdtemp(prefix="fastlm-fuzz-")) / "tokenizer.json"


def seed_corpus() -> None:
    """Saved tokenizer files (one per level) as the first inputs, marked by a leading 0 byte (the 'file' mode)."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    if any(CORPUS.iterdir()):
        return
    for tokenizer in TOKENIZERS:
        tokenizer.save(FILE)
        (CORPUS / f"file-{tokenizer.level}").write_bytes(b"\0" + FILE.read_bytes())
    for i, line in enumerate(SEED_LINES):
        (CORPUS / f"text-{i}").write_bytes(b"\1" + line.encode("utf-8"))


def check_load(data: bytes) -> None:
    FILE.write_bytes(data)
    try:
        tokenizer = Tokenizer.load(FILE)
    except ValueError as error:
        assert str(FILE) in str(error), error
        return
    for line in SEED_LINES[:3]:
        expected = line if tokenizer.level == "byte" else unicodedata.normalize(
            tokenizer.normalization.upper(), line).replace("\u2581", " ")
        assert tokenizer.decode(tokenizer.encode(line, allowed_special="all")) == expected


def check_text(tokenizer: Tokenizer, text: str) -> None:
    for allowed in ((), "all", SPECIALS[1:3]):
        ids = tokenizer.encode(text, allowed_special=allowed)
        expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # lone surrogates -> U+FFFD
        # Char level: each run between specials is normalised on its own; text that normalisation leaves alone
        # must come back as it is.
        if tokenizer.level == "byte" or "\u2581" not in expected and unicodedata.is_normalized("NFC", expected):
            assert tokenizer.decode(ids) == expected, (text, allowed, ids)
        assert tokenizer.encode_batch([text, text], allowed_special=allowed) == [ids, ids]


def check_decode(tokenizer: Tokenizer, ids: list[int]) -> None:
    try:
        assert isinstance(tokenizer.decode(ids), str)
    except ValueError as error:
        assert "out of range" in str(error) or "must be" in str(error), error


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        check_load(rest)
        return
    provider = atheris.FuzzedDataProvider(rest)
    tokenizer = TOKENIZERS[provider.ConsumeBool()]
    if mode == 3:
        count = provider.ConsumeIntInRange(0, 64)
        check_decode(tokenizer, [provider.ConsumeIntInRange(-2, tokenizer.vocab_size + 2) for _ in range(count)])
    else:
        check_text(tokenizer, provider.ConsumeUnicodeNoSurrogates(4096) if mode == 1 else provider.ConsumeUnicode(4096))


if __name__ == "__main__":
    seed_corpus()
    # Without an input file or corpus directory named, fuzz (and grow) the default corpus.
    named_inputs = any(not argument.startswith("-") for argument in sys.argv[1:])
    atheris.Setup(sys.argv if named_inputs else [*sys.argv, str(CORPUS)], test_one_input)
    atheris.Fuzz()
