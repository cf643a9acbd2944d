"""Identity with the peers: our byte-level merges in HF `tokenizers` and in tiktoken give our ids on the held-out
split of the shared corpus, and our training gives rustbpe's merges."""

import itertools
import unicodedata

import pytest
from hypothesis import given, settings
from tokenizer_strategies import assigned_texts

from fastlm import Tokenizer

TRAIN_LINES_PER_LANGUAGE = 10_000  # 20k interleaved lines: enough to exercise real merges, quick in CI
VOCAB_SIZE = 4000


def read_lines(path, limit=None):
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\n") for line in itertools.islice(file, limit)]


@pytest.fixture(scope="module")
def train_lines(ko_en_dir):
    korean = read_lines(ko_en_dir / "train.ko", TRAIN_LINES_PER_LANGUAGE)
    english = read_lines(ko_en_dir / "train.en", TRAIN_LINES_PER_LANGUAGE)
    return [line for pair in zip(korean, english) for line in pair]


@pytest.fixture(scope="module")
def held_out_lines(ko_en_dir):
    return [line for split in ("valid", "test") for lang in ("ko", "en")
            for line in read_lines(ko_en_dir / f"{split}.{lang}")]


@pytest.fixture(scope="module")
def byte_tokenizer(train_lines):
    return Tokenizer.train(train_lines, vocab_size=VOCAB_SIZE, level="byte")


@pytest.fixture(scope="module", params=["nfc", "nfkc"])
def char_tokenizer(train_lines, request):
    return Tokenizer.train(train_lines, vocab_size=VOCAB_SIZE, level="char", normalization=request.param)


ADVERSARIAL = ["", " ", "  x  ", "a\n\n\nb", "I'LL've 's", "1234567 ①②③", "e\u0301\u0301", "😀👍🏽 👨‍👩‍👧",
               "\t\r\n \u3000\u00a0x", "가" * 500, "<s>not special</s>",
               "हिन्दी ภาษาไทย தமிழ் \u0301x 1\u0301"]


def hf_tokenizer(tokenizer, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    tokenizer.save_huggingface(path)
    return tokenizers.Tokenizer.from_file(str(path))


def test_huggingface_gives_identical_ids_at_byte_level(byte_tokenizer, held_out_lines, tmp_path):
    hf = hf_tokenizer(byte_tokenizer, tmp_path)
    lines = held_out_lines + [text for text in ADVERSARIAL if "<s>" not in text]  # HF always splits specials
    ours = byte_tokenizer.encode_batch(lines)
    theirs = [encoding.ids for encoding in hf.encode_batch(lines, add_special_tokens=False)]
    assert ours == theirs
    assert [hf.decode(ids, skip_special_tokens=False) for ids in ours[:200]] == lines[:200]
    assert hf.get_vocab_size() == byte_tokenizer.vocab_size
    assert [hf.id_to_token(i) for i in range(50)] == [byte_tokenizer.id_to_token(i) for i in range(50)]


def test_huggingface_gives_identical_ids_at_char_level(char_tokenizer, held_out_lines, tmp_path):
    """The char level is reproduced too (see Tokenizer.save_huggingface for where HF could differ: not here)."""
    hf = hf_tokenizer(char_tokenizer, tmp_path)
    lines = held_out_lines + [text for text in ADVERSARIAL if "<s>" not in text]
    ours = char_tokenizer.encode_batch(lines)
    theirs = [encoding.ids for encoding in hf.encode_batch(lines, add_special_tokens=False)]
    assert ours == theirs
    normalized = [unicodedata.normalize(char_tokenizer.normalization.upper(), line) for line in lines[:200]]
    assert [hf.decode(ids, skip_special_tokens=False) for ids in ours[:200]] == normalized


# Scripts whose words are letters and combining marks, and marks that survive NFC (no precomposed q-acute).
MARKED_LINES = ["हिन्दी भाषा में वाक्य", "ภาษาไทยเขียนแบบนี้", "தமிழ் மொழி", "q\u0301q\u0301 x\u0323\u0301y",
                "\u0301x 1\u0301 \u2581\u0301"]


@pytest.mark.parametrize("normalization", ["nfc", "nfkc"])
def test_huggingface_gives_identical_ids_on_combining_marks(normalization, tmp_path):
    """Trained on the marked scripts themselves, so that merges inside their words exist and a split that HF
    made differently would change the ids (on the ko-en vocabulary they are all byte fallback)."""
    tokenizer = Tokenizer.train(MARKED_LINES * 3, vocab_size=2000, level="char", min_frequency=1,
                                normalization=normalization)
    hf = hf_tokenizer(tokenizer, tmp_path)
    lines = MARKED_LINES + ["हिन्दीภาษา தமிழ்1\u0301", "मेंq\u0301"]
    assert [encoding.ids for encoding in hf.encode_batch(lines, add_special_tokens=False)] == \
        tokenizer.encode_batch(lines)


def test_tiktoken_gives_identical_ids(byte_tokenizer, held_out_lines):
    pytest.importorskip("tiktoken")
    encoding = byte_tokenizer.to_tiktoken()
    lines = held_out_lines + ADVERSARIAL
    assert [encoding.encode_ordinary(line) for line in lines] == byte_tokenizer.encode_batch(lines)
    with_specials = "<s>x</s>"
    assert encoding.encode(with_specials, allowed_special="all") == byte_tokenizer.encode(with_specials, "all")
    assert encoding.decode(byte_tokenizer.encode(lines[0])) == lines[0]


def test_training_gives_rustbpes_merges(train_lines):
    rustbpe = pytest.importorskip("rustbpe")
    from fastlm.reference_bpe import CL100K_PATTERN

    theirs = rustbpe.Tokenizer()
    theirs.train_from_iterator(iter(train_lines), VOCAB_SIZE, pattern=CL100K_PATTERN)
    # rustbpe has no special tokens and no min_frequency: its ranks are our ids with neither.
    ours = Tokenizer.train(train_lines, vocab_size=VOCAB_SIZE, level="byte", special_tokens=(), min_frequency=1)
    our_ranks = {ours.decode_bytes([i]): i for i in range(ours.vocab_size)}
    assert dict(theirs.get_mergeable_ranks()) == our_ranks


@settings(max_examples=300)
@given(assigned_texts)
def test_peers_agree_on_arbitrary_text(byte_tokenizer, char_tokenizer, peer_encoders, text):
    hf_byte, hf_char, tiktoken_encoding = peer_encoders
    ours = byte_tokenizer.encode(text)
    assert tiktoken_encoding.encode_ordinary(text) == ours
    if "<" not in text:  # HF always matches special tokens in its input
        assert hf_byte.encode(text, add_special_tokens=False).ids == ours
        assert hf_char.encode(text, add_special_tokens=False).ids == char_tokenizer.encode(text)


@pytest.fixture(scope="module")
def peer_encoders(byte_tokenizer, char_tokenizer, tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("tiktoken")
    folder = tmp_path_factory.mktemp("hf")
    byte_tokenizer.save_huggingface(folder / "byte.json")
    char_tokenizer.save_huggingface(folder / "char.json")
    return (tokenizers.Tokenizer.from_file(str(folder / "byte.json")),
            tokenizers.Tokenizer.from_file(str(folder / "char.json")), byte_tokenizer.to_tiktoken())
