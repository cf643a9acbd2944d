"""generate(): the KV cache changes nothing, beam width 1 is greedy, per-row EOS and padding, option errors."""

import functools

import pytest
import torch
import torch.nn.functional as F

from fastlm.generation import generate
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
