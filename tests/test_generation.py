"""generate(): the KV cache changes nothing, beam width 1 is greedy, per-row EOS and padding, repeated n-grams
forbidden (against brute-force references), per-row length limits, option errors."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fastlm.generation import generate, repeated_ngram_bans
from fastlm.models import DecoderLM, ModelConfig, Seq2SeqLM

EOS, PAD = 2, 0


def _config(**overrides) -> ModelConfig:
    # A 12-token vocabulary makes </s> likely enough that rows finish at different steps.
    # Narrower than tiny so that the 40-odd generations here stay quick on 2 cores.
    shape = {"vocab_size": 12, "dropout": 0.0, "n_layers": 2, "d_model": 64, "d_ff": 128}
    return ModelConfig.preset("tiny", **{**shape, **overrides})


def _decoder(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(_config(**overrides))


def _seq2seq(**overrides) -> Seq2SeqLM:
    torch.manual_seed(0)
    return Seq2SeqLM(_config(), _config(**overrides))


def _prompts():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [4, 9, 0, 0, 0, 0], [11, 3, 5, 0, 0, 0]])
    return ids, torch.tensor([6, 2, 3])


def _inputs(model):
    ids, lengths = _prompts()
    if isinstance(model, Seq2SeqLM):
        return dict(src_ids=ids, src_lengths=lengths)
    return dict(input_ids=ids, lengths=lengths)


MODELS = [
    pytest.param(lambda: _decoder(), id="decoder"),
    pytest.param(lambda: _decoder(positional="rope", n_kv_heads=2), id="decoder-rope-gqa"),
    pytest.param(lambda: _decoder(positional="sinusoidal", norm_position="post", attn_impl="sdpa"), id="decoder-post"),
    pytest.param(lambda: _seq2seq(), id="seq2seq"),
    pytest.param(lambda: _seq2seq(positional="rope", n_kv_heads=1, attn_impl="eager"), id="seq2seq-rope-mqa"),
]
STRATEGIES = [
    dict(strategy="greedy"),
    dict(strategy="beam", num_beams=3, num_return_sequences=2),
    dict(strategy="beam", num_beams=2, early_stopping=False, length_penalty=0.6),
    dict(strategy="sample", temperature=1.5, top_k=6, top_p=0.9, num_return_sequences=2),
]


@pytest.mark.parametrize("make_model", MODELS)
@pytest.mark.parametrize("options", STRATEGIES, ids=lambda options: options["strategy"])
def test_cached_equals_uncached_token_for_token(make_model, options):
    model = make_model()
    runs = [generate(model, **_inputs(model), max_new_tokens=12, use_cache=use_cache,
                     generator=torch.Generator().manual_seed(0), **options) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("make_model", MODELS)
def test_beam_width_one_is_greedy(make_model):
    model = make_model()
    greedy = generate(model, **_inputs(model), max_new_tokens=12)
    assert torch.equal(generate(model, **_inputs(model), max_new_tokens=12, strategy="beam", num_beams=1), greedy)
    assert torch.equal(generate(model, **_inputs(model), max_new_tokens=12, strategy="sample", top_k=1), greedy)


def test_greedy_follows_the_full_forward_argmax():
    model = _decoder().eval()
    ids, lengths = _prompts()
    generated = generate(model, ids, lengths, max_new_tokens=8)
    for row in range(3):
        sequence = ids[row, : lengths[row]].tolist()
        for token in generated[row].tolist():
            expected = model(torch.tensor([sequence]), return_logits=True).logits[0, -1].argmax().item()
            assert token == expected
            if token == EOS:
                break
            sequence.append(token)


def test_rows_end_with_eos_then_padding():
    model = _seq2seq()
    sampled = generate(model, **_inputs(model), max_new_tokens=20, strategy="sample", num_return_sequences=4,
                       generator=torch.Generator().manual_seed(1))
    assert sampled.shape[0] == 12 and sampled.shape[1] <= 20
    ended = 0
    for row in sampled.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert all(token == PAD for token in row[end + 1:])
            ended += 1
    assert 0 < ended                       # the property above was exercised
    beams = generate(model, **_inputs(model), max_new_tokens=20, strategy="beam", num_beams=4,
                     num_return_sequences=4)
    assert beams.shape[0] == 12
    for row in beams.tolist():
        assert EOS not in row or all(token == PAD for token in row[row.index(EOS) + 1:])


def test_beam_hypotheses_come_best_first():
    model = _decoder().eval()
    ids, lengths = _prompts()
    beams = generate(model, ids[:1], lengths[:1], max_new_tokens=6, strategy="beam", num_beams=4,
                     num_return_sequences=4, length_penalty=1.0)
    scores = []
    for row in beams.tolist():
        tokens = row[: row.index(EOS) + 1] if EOS in row else [t for t in row if t != PAD] or row
        sequence = torch.tensor([ids[0].tolist() + tokens])
        log_probs = F.log_softmax(model(sequence, return_logits=True).logits[0, 5:-1], dim=-1)
        total = log_probs.gather(1, torch.tensor(tokens)[:, None]).sum().item()
        scores.append(total / len(tokens))
    assert scores == sorted(scores, reverse=True)


def test_training_mode_is_restored():
    model = _decoder().train()
    generate(model, **_inputs(model), max_new_tokens=3)
    assert model.training


@pytest.mark.parametrize("arguments, message", [
    (dict(strategy="topk"), "strategy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=128), "max_new_tokens = 128"),
    (dict(strategy="beam", num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(strategy="sample", temperature=0.0), "temperature"),
    (dict(strategy="sample", top_p=0.0), "top_p"),
    (dict(strategy="sample", top_k=-1), "top_k"),
    (dict(max_new_tokens=2.5), "max_new_tokens = 2.5"),
    (dict(strategy="beam", num_beams=2.0), "num_beams = 2.0"),
    (dict(strategy="sample", top_k=True), "top_k = True"),
    (dict(strategy="beam", length_penalty=float("nan")), "length_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size = -1"),
    (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size = 1.5"),
    (dict(max_len_a=1.2), "max_len_a = 1.2 needs max_len_b"),
    (dict(max_len_a=-1.0, max_len_b=3), "max_len_a = -1.0"),
    (dict(max_len_a=float("inf"), max_len_b=3), "max_len_a = inf"),
    (dict(max_len_b=-2), "max_len_b = -2"),
    (dict(max_len_b=2.5), "max_len_b = 2.5"),
])
def test_bad_options_name_the_argument(arguments, message):
    model = _decoder()
    with pytest.raises(ValueError, match=message):
        generate(model, **_inputs(model), **arguments)


def test_wrong_inputs_for_the_model():
    ids, lengths = _prompts()
    with pytest.raises(ValueError, match="src_ids"):
        generate(_seq2seq(), ids, lengths)
    with pytest.raises(ValueError, match="input_ids"):
        generate(_decoder(), src_ids=ids)
    with pytest.raises(ValueError, match="input_ids contains 12"):
        generate(_decoder(), ids.masked_fill(ids == 5, 12), lengths)


def test_cache_steps_through_the_triton_kernel(monkeypatch):
    """The cached step (one query against the whole cache, masked by kv_lens) through the Triton kernel itself."""
    pytest.importorskip("triton")
    from fastlm.kernels import attention
    from fastlm.kernels.utils import interpreter_active
    from fastlm.models import blocks

    if not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    model = _seq2seq(positional="rope", n_kv_heads=2)
    expected = generate(model, **_inputs(model), max_new_tokens=4, use_cache=False)
    monkeypatch.setattr(blocks, "attention", functools.partial(attention, impl="triton"))
    assert torch.equal(generate(model, **_inputs(model), max_new_tokens=4), expected)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_nan_logits_are_an_error_not_tokens(strategy):
    model = _decoder()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits contain NaN"):
        generate(model, **_inputs(model), max_new_tokens=2, strategy=strategy)


# ----- no_repeat_ngram_size -----

def _ngram_bans_reference(sequence: list[int], size: int) -> set[int]:
    """The tokens that would complete, after `sequence`, an n-gram of `size` tokens it already holds."""
    prefix = tuple(sequence[len(sequence) - size + 1:]) if size > 1 else ()
    return {sequence[start + size - 1] for start in range(len(sequence) - size + 1)
            if tuple(sequence[start:start + size - 1]) == prefix}


@given(st.data())
def test_repeated_ngram_bans_match_a_brute_force_reference(data):
    vocab, width = 5, data.draw(st.integers(1, 12))          # 5 tokens: n-grams repeat often
    rows = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=width, max_size=width), min_size=1,
                              max_size=4))
    lengths = data.draw(st.lists(st.integers(0, width), min_size=len(rows), max_size=len(rows)))
    size = data.draw(st.integers(1, 4))
    bans = repeated_ngram_bans(torch.tensor(rows), torch.tensor(lengths), size, vocab)
    for row, length, banned in zip(rows, lengths, bans.tolist()):
        assert {token for token in range(vocab) if banned[token]} == _ngram_bans_reference(row[:length], size)


def test_repeated_ngram_bans_match_transformers():
    transformers = pytest.importorskip("transformers")
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 3, 4):
        ids = torch.randint(0, 4, (6, 15), generator=generator)
        processor = transformers.NoRepeatNGramLogitsProcessor(size)
        theirs = processor(ids, torch.zeros(6, 4)) == float("-inf")
        assert torch.equal(repeated_ngram_bans(ids, torch.full((6,), 15), size, 4), theirs)


def _reference_greedy(model, prompt: list[int], source: list[int] | None, size: int, limit: int) -> list[int]:
    """Greedy decoding of one row by full forward passes (no cache), forbidding repeated n-grams as transformers does
    (over prompt, or start token, plus the new tokens), eos when nothing else is left, at most `limit` tokens."""
    generated: list[int] = []
    while len(generated) < limit and EOS not in generated:
        if source is None:
            logits = model(torch.tensor([prompt + generated]), return_logits=True).logits[0, -1]
        else:  # the decoder reads its start token then tgt_ids[:, :-1]: a trailing pad makes room for the next one
            logits = model(torch.tensor([source]), torch.tensor([generated + [PAD]]),
                           return_logits=True).logits[0, len(generated)]
        banned = _ngram_bans_reference(prompt + generated, size) if size else set()
        allowed = [token for token in range(logits.shape[0]) if token not in banned] or [EOS]
        generated.append(max(allowed, key=lambda token: logits[token].item()))
    return generated


def _until_eos(row: list[int]) -> list[int]:
    """A generated row up to its eos (pad is a token a model may generate: only what follows eos is padding)."""
    return row[: row.index(EOS) + 1] if EOS in row else row


def _padded(tokens: list[int], width: int) -> list[int]:
    return tokens + [PAD] * (width - len(tokens))


@given(seq2seq=st.booleans(), size=st.integers(0, 3), max_len_a=st.sampled_from([0.5, 1.0, 2.0]),
       max_len_b=st.integers(0, 4), prompts=st.lists(st.lists(st.integers(3, 11), min_size=1, max_size=6),
                                                      min_size=1, max_size=3))
def test_greedy_with_bans_and_limits_matches_a_brute_force_reference(seq2seq, size, max_len_a, max_len_b, prompts):
    model = (_seq2seq() if seq2seq else _decoder()).eval()
    lengths = torch.tensor([len(prompt) for prompt in prompts])
    ids = torch.tensor([prompt + [PAD] * (6 - len(prompt)) for prompt in prompts])
    inputs = dict(src_ids=ids, src_lengths=lengths) if seq2seq else dict(input_ids=ids, lengths=lengths)
    generated = generate(model, **inputs, max_new_tokens=10, no_repeat_ngram_size=size, max_len_a=max_len_a,
                         max_len_b=max_len_b)
    for prompt, row in zip(prompts, generated.tolist()):
        limit = min(max(int(max_len_a * len(prompt) + max_len_b), 1), 10)
        expected = (_reference_greedy(model, [model.decoder_start_id], prompt, size, limit) if seq2seq
                    else _reference_greedy(model, prompt, None, size, limit))
        assert row == _padded(expected, len(row))


def _repeats(sequence: list[int], size: int, first_new: int) -> bool:
    """Whether a token from position `first_new` on completes an n-gram of `size` that ended earlier already."""
    grams = [tuple(sequence[end - size + 1: end + 1]) for end in range(size - 1, len(sequence))]
    return any(gram in grams[:index] for index, gram in enumerate(grams) if index + size - 1 >= first_new)


@pytest.mark.parametrize("make_model", MODELS)
def test_no_sequence_repeats_an_ngram(make_model):
    model = make_model()
    ids, lengths = _prompts()
    repeated_without_the_rule = 0
    for options in STRATEGIES:
        for size in (1, 2, 3):
            # Prompt and new tokens together stay under the 12 tokens of the vocabulary: no row runs out of tokens.
            for banned in (0, size):
                rows = generate(model, **_inputs(model), max_new_tokens=5, no_repeat_ngram_size=banned,
                                generator=torch.Generator().manual_seed(0), **options).tolist()
                copies = len(rows) // 3
                prompts = [[model.decoder_start_id] if isinstance(model, Seq2SeqLM)
                           else ids[i // copies, : lengths[i // copies]].tolist() for i in range(len(rows))]
                repeats = sum(_repeats(prompt + _until_eos(row), size, len(prompt))
                              for prompt, row in zip(prompts, rows))
                assert banned == 0 or repeats == 0, (options, size)
                repeated_without_the_rule += repeats
    assert repeated_without_the_rule > 0  # the rule had something to forbid (random tiny models repeat themselves)


def test_a_row_with_every_token_forbidden_ends_with_eos():
    model = _decoder()
    every_token = torch.arange(12)[None, :]
    for strategy in ("greedy", "sample", "beam"):
        generated = generate(model, every_token, max_new_tokens=4, no_repeat_ngram_size=1, strategy=strategy)
        assert generated.tolist() == [[EOS]]


def test_bans_that_never_bind_change_nothing():
    """An n-gram longer than any sequence forbids nothing: every strategy gives what it gives without the option."""
    for make_model in MODELS:
        model = make_model.values[0]()
        for options in STRATEGIES:
            runs = [generate(model, **_inputs(model), max_new_tokens=6, no_repeat_ngram_size=size,
                             generator=torch.Generator().manual_seed(0), **options) for size in (0, 13)]
            assert torch.equal(runs[0], runs[1])


# ----- max_len_a, max_len_b -----

@pytest.mark.parametrize("make_model", MODELS[::3])
def test_each_row_stops_at_its_own_length_limit(make_model):
    """Source lengths 6, 2, 3 with limit 1.5 * length + 1: 10, 4 and 5 new tokens. Greedy and sampling rows are the
    unlimited ones cut there; a beam row is what beam search gives that row with max_new_tokens = its limit."""
    model = make_model()
    limits = [10, 4, 5]
    limited = dict(max_new_tokens=12, max_len_a=1.5, max_len_b=1)
    cut_something = False
    for options in (dict(strategy="greedy"), dict(strategy="sample", num_return_sequences=2)):
        runs = [generate(model, **_inputs(model), generator=torch.Generator().manual_seed(0), **options, **extra)
                for extra in (limited, dict(max_new_tokens=12))]
        copies = runs[0].shape[0] // 3
        for row, (cut, free) in enumerate(zip(runs[0].tolist(), runs[1].tolist())):
            limit = limits[row // copies]
            assert cut == _padded(_until_eos(free)[:limit], len(cut))
            cut_something |= len(_until_eos(free)) > limit
    assert cut_something
    beam = dict(strategy="beam", num_beams=3, num_return_sequences=3)
    per_row = generate(model, **_inputs(model), **beam, **limited).tolist()
    for row, limit in enumerate(limits):
        alone = generate(model, **_inputs(model), **beam, max_new_tokens=limit).tolist()
        assert per_row[3 * row: 3 * row + 3] == [_padded(_until_eos(r), len(per_row[0]))
                                                 for r in alone[3 * row: 3 * row + 3]]


def test_max_new_tokens_caps_the_length_limit():
    model = _seq2seq()
    assert torch.equal(generate(model, **_inputs(model), max_new_tokens=5, max_len_a=3.0, max_len_b=10),
                       generate(model, **_inputs(model), max_new_tokens=5))
    # A limit of 0 (int(0.1 * 2 + 0)) still generates one token, as max_new_tokens = 1 would.
    assert generate(model, **_inputs(model), max_len_a=0.1, max_len_b=0).shape[1] == 1
