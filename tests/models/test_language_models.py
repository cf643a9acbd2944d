"""EncoderLM and DecoderLM (and Seq2SeqLM's loss): causality, padding, weight tying, loss/labels, label smoothing,
kernels vs torch, save/load, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import (assert_same_loss_and_gradients, force_triton_kernels, random_batch,
                           tiny_config)
from safetensors import safe_open

from fastlm.data import target_positions
from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM

MODELS = {"encoder": EncoderLM, "decoder": DecoderLM}
VARIANTS = [
    dict(),
    dict(positional="rope", n_kv_heads=2, activation="swiglu"),
    dict(positional="sinusoidal", norm_position="post", activation="relu", attn_impl="sdpa"),
    dict(attn_impl="eager", n_kv_heads=1, tie_embeddings=False),
]


def _model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return MODELS[kind](tiny_config(**overrides)).eval()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_decoder_is_causal_bitwise(overrides):
    model = _model("decoder", **overrides)
    ids, lengths = random_batch(model.config, [24, 24])
    changed = ids.clone()
    changed[:, 10:] = torch.randint(4, model.config.vocab_size, changed[:, 10:].shape)
    before = model(ids, lengths, return_logits=True).logits
    after = model(changed, lengths, return_logits=True).logits
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.equal(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("overrides", VARIANTS)
def test_extra_padding_leaves_real_tokens_unchanged(kind, overrides):
    model = _model(kind, **overrides)
    ids, lengths = random_batch(model.config, [9, 14, 5])
    # Widen with non-pad garbage: only `lengths` may decide what is real.
    garbage = torch.randint(4, model.config.vocab_size, (3, 25))
    real = torch.arange(25)[None, :] < lengths[:, None]
    padded = torch.where(real, torch.cat([ids, garbage[:, 14:]], dim=1), garbage)
    short = model(ids, lengths, labels=ids, return_logits=True)
    long = model(padded, lengths, labels=padded, return_logits=True)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(long.logits[row, :length], short.logits[row, :length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.loss, short.loss)
    assert long.n_targets == short.n_targets


@pytest.mark.parametrize("kind", MODELS)
def test_loss_and_accuracy_match_the_logits(kind):
    model = _model(kind)
    ids, lengths = random_batch(model.config, [12, 7])
    labels = ids.clone()
    if kind == "encoder":
        labels[:, ::2] = -100                     # MLM: only "masked" positions carry a target
        targets = labels.masked_fill(torch.arange(12)[None] >= lengths[:, None], -100)
    else:                                         # causal: position t predicts token t + 1 of its own row
        targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        targets = targets.masked_fill(torch.arange(12)[None] >= lengths[:, None] - 1, -100)
    out = model(ids, lengths, labels=labels, return_logits=True)
    expected = F.cross_entropy(out.logits.reshape(-1, model.config.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    valid = targets != -100
    assert out.n_targets == valid.sum()
    correct = ((out.logits.argmax(-1) == targets) & valid).sum()
    torch.testing.assert_close(out.accuracy, correct / valid.sum())
    assert model(ids, lengths).loss is None and model(ids, lengths).logits is None


def _loss_inputs(kind: str, seed: int) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """(model, forward arguments with labels, the (B, T) targets its logits are scored against) for each loss path:
    the MLM head on every row or on the target rows only, the causal shift, and teacher-forced translation."""
    small = dict(n_layers=1, d_model=32, n_heads=2, d_ff=64)
    torch.manual_seed(seed)
    ids, lengths = random_batch(tiny_config(**small), [11, 6], seed=seed)
    beyond = torch.arange(11)[None, :] >= lengths[:, None]
    if kind == "seq2seq":
        model = Seq2SeqLM(tiny_config(**small), tiny_config(**small)).eval()
        arguments = dict(src_ids=ids.flip(0), src_lengths=lengths.flip(0), tgt_ids=ids, tgt_lengths=lengths, labels=ids)
        return model, arguments, ids.masked_fill(beyond, -100)
    if kind == "decoder":
        targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        shifted_beyond = torch.arange(11)[None, :] >= lengths[:, None] - 1
        return DecoderLM(tiny_config(**small)).eval(), dict(input_ids=ids, lengths=lengths, labels=ids), \
            targets.masked_fill(shifted_beyond, -100)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.6, -100)
    targets = labels.masked_fill(beyond, -100)
    arguments = dict(input_ids=ids, lengths=lengths, labels=labels)
    if kind == "encoder-target-rows":
        arguments["target_positions"] = target_positions(targets)
    return EncoderLM(tiny_config(**small)).eval(), arguments, targets


@pytest.mark.parametrize("kind", ["encoder", "encoder-target-rows", "decoder", "seq2seq"])
@settings(max_examples=6)
@given(label_smoothing=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_label_smoothing_is_f_cross_entropy_s_on_the_logits(kind, label_smoothing, seed):
    model, arguments, targets = _loss_inputs(kind, seed)
    plain = model(**arguments, return_logits=True)
    smoothed = model(**arguments, label_smoothing=label_smoothing)
    logits64 = plain.logits.double().reshape(-1, plain.logits.shape[-1])
    expected = F.cross_entropy(logits64, targets.reshape(-1), label_smoothing=label_smoothing)
    torch.testing.assert_close(smoothed.loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.loss.double(), F.cross_entropy(logits64, targets.reshape(-1)), atol=1e-5,
                               rtol=1e-5)
    assert smoothed.n_targets == plain.n_targets and torch.equal(smoothed.accuracy, plain.accuracy)


@pytest.mark.parametrize("kind", MODELS)
def test_tied_embedding_is_one_tensor_and_both_uses_get_gradient(kind):
    tied = _model(kind)
    embedding = tied.body.embeddings.token.weight
    output = tied.head.output.weight if kind == "encoder" else tied.lm_head.weight
    assert output is embedding
    assert sum(1 for p in tied.parameters() if p is embedding) == 1
    # The same weights untied: the tied gradient must be the sum of the input-side and output-side gradients.
    untied = MODELS[kind](ModelConfig.from_dict({**tied.config.to_dict(), "tie_embeddings": False})).eval()
    untied.load_state_dict(tied.state_dict())
    ids, lengths = random_batch(tied.config, [10, 6])
    tied(ids, lengths, labels=ids).loss.backward()
    untied(ids, lengths, labels=ids).loss.backward()
    untied_output = untied.head.output.weight if kind == "encoder" else untied.lm_head.weight
    input_grad, output_grad = untied.body.embeddings.token.weight.grad, untied_output.grad
    assert input_grad.abs().sum() > 0 and output_grad.abs().sum() > 0
    torch.testing.assert_close(embedding.grad, input_grad + output_grad)


@pytest.mark.parametrize("kind", MODELS)
def test_fastlm_kernels_sdpa_and_eager_agree(kind, monkeypatch):
    force_triton_kernels(monkeypatch)
    small = dict(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, n_layers=2, d_ff=64, positional="rope")
    ids, lengths = random_batch(tiny_config(**small), [16, 11], seed=3)
    results = {}
    for impl in ("fastlm", "sdpa", "eager"):
        model = _model(kind, seed=1, attn_impl=impl, **small)
        loss = model(ids, lengths, labels=ids).loss
        loss.backward()
        results[impl] = loss.detach(), {name: p.grad for name, p in model.named_parameters()}
    assert_same_loss_and_gradients(results)


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3), density=st.sampled_from([0.0, 0.15, 0.5, 1.0]),
       seed=st.integers(0, 2**16), tie_embeddings=st.booleans())
def test_encoder_head_on_target_rows_only_equals_the_head_on_every_row(lengths, density, seed, tie_embeddings):
    """The MLM head on the N labelled rows (target_positions) gives the loss, accuracy, n_targets and gradients of
    the head on all B*T rows, for masks from none to every position (labels beyond lengths included: ignored)."""
    # The head is under test: a one-layer body is enough.
    model = _model("encoder", seed=1, tie_embeddings=tie_embeddings, attn_impl="sdpa", n_layers=1, d_model=32,
                   n_heads=2, d_ff=64)
    ids, lengths = random_batch(model.config, lengths, seed=seed)
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < density
    labels = ids.masked_fill(~chosen, -100)
    within = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    results = []
    for positions in (None, target_positions(labels.masked_fill(~within, -100))):
        model.zero_grad(set_to_none=True)
        out = model(ids, lengths, labels=labels, target_positions=positions)
        out.loss.backward()
        grads = {name: parameter.grad for name, parameter in model.named_parameters()}
        results.append((out.loss.detach(), out.accuracy, out.n_targets, grads))
    (dense_loss, dense_accuracy, dense_n, dense_grads), (loss, accuracy, n, grads) = results
    assert n == dense_n == int((chosen & within).sum())
    torch.testing.assert_close(loss, dense_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(accuracy, dense_accuracy)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_encoder_target_positions_keep_the_full_logits_and_reject_a_mismatch():
    model = _model("encoder")
    ids, lengths = random_batch(model.config, [7, 5])
    labels = ids.masked_fill(torch.arange(7)[None, :] % 3 != 0, -100)
    positions = target_positions(labels.masked_fill(torch.arange(7)[None, :] >= lengths[:, None], -100))
    dense = model(ids, lengths, labels=labels, return_logits=True)
    sparse = model(ids, lengths, labels=labels, return_logits=True, target_positions=positions)
    assert sparse.logits.shape == (2, 7, model.config.vocab_size)
    torch.testing.assert_close(sparse.logits, dense.logits)
    bad_calls = [
        (dict(target_positions=positions[1:]), "target_positions differs from labels at 1 positions"),
        (dict(target_positions=torch.cat([positions, torch.tensor([1])]).sort().values), "differs from labels"),
        (dict(target_positions=positions.flip(0)), "steps that do not increase"),
        (dict(target_positions=positions + 100), "target_positions contains 1.*expected flat indices < 14"),
        (dict(target_positions=positions - 10), "target_positions contains -10"),
        (dict(target_positions=positions.float()), "target_positions of dtype torch.float32"),
        (dict(target_positions=positions[None]), "target_positions of shape \\(1, 5\\)"),
        (dict(target_positions=positions.tolist()), "target_positions of type list"),
        (dict(target_positions=positions, labels=None), "target_positions given without labels"),
    ]
    for arguments, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            model(**{"input_ids": ids, "lengths": lengths, "labels": labels, **arguments})


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_save_load_round_trip(kind, tie_embeddings, tmp_path):
    model = _model(kind, positional="rope", tie_embeddings=tie_embeddings)
    model.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == MODELS[kind].__name__
    with safe_open(tmp_path / "model.safetensors", "pt") as stored:
        assert len(list(stored.keys())) == len(list(model.parameters()))   # a tied tensor is stored once
    loaded = MODELS[kind].load(tmp_path)
    assert not any(module.training for module in loaded.modules())  # as from_pretrained: dropout off
    assert loaded.config == model.config
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(actual, expected), name
    output = loaded.head.output.weight if kind == "encoder" else loaded.lm_head.weight
    assert (output is loaded.body.embeddings.token.weight) == tie_embeddings
    ids, lengths = random_batch(model.config, [8, 5])
    assert torch.equal(loaded(ids, lengths, labels=ids).loss, model(ids, lengths, labels=ids).loss)
    other = EncoderLM if kind == "decoder" else DecoderLM
    with pytest.raises(ValueError, match="model_type"):
        other.load(tmp_path)


@pytest.mark.parametrize("kind", MODELS)
def test_bad_input_names_the_argument(kind):
    model = _model(kind)
    vocab, longest = model.config.vocab_size, model.config.max_seq_len
    ids, lengths = random_batch(model.config, [6, 4])
    bad_calls = [
        (dict(input_ids=ids.masked_fill(ids == ids[0, 0], vocab)), "input_ids contains 96"),
        (dict(input_ids=ids.masked_fill(ids == ids[0, 0], -1)), "input_ids contains -1"),
        (dict(input_ids=ids.float()), "input_ids"),
        (dict(input_ids=ids[0]), "input_ids"),
        (dict(input_ids=torch.ones(1, longest + 1, dtype=torch.long)), "max_seq_len"),
        (dict(input_ids=ids, lengths=torch.tensor([6, 4, 2])), "lengths of shape"),
        (dict(input_ids=ids, lengths=torch.tensor([7, 4])), "lengths contains 7"),
        (dict(input_ids=ids, lengths=torch.tensor([6, 0])), "lengths contains 0"),
        (dict(input_ids=ids, labels=ids[:, :3]), "labels of shape"),
        (dict(input_ids=ids, labels=ids.masked_fill(ids == ids[0, 0], -5)), "labels has 1 negative"),
        (dict(input_ids=ids, labels=ids.masked_fill(ids == ids[0, 0], vocab + 3)), "labels contains 99"),
        (dict(input_ids=ids.bool()), "input_ids of dtype torch.bool"),
        (dict(input_ids=ids.to(torch.uint8)), "input_ids of dtype torch.uint8"),
        (dict(input_ids=ids.tolist()), "input_ids of type list"),
        (dict(input_ids=ids[:0]), "input_ids of shape \\(0, 6\\)"),
        (dict(input_ids=ids[:, :0]), "input_ids of shape \\(2, 0\\)"),
        (dict(input_ids=ids, lengths=lengths.float()), "lengths of dtype torch.float32"),
        (dict(input_ids=ids, lengths=torch.tensor([-1, 4])), "lengths contains -1"),
        (dict(input_ids=ids, lengths=lengths.to("meta")), "lengths is on meta"),
        (dict(input_ids=ids, labels=ids.float()), "labels of dtype torch.float32"),
    ]
    for arguments, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            model(**arguments)


def test_optimizer_groups_and_accounting():
    model = _model("decoder", tie_embeddings=False)
    optimizer = model.configure_optimizers(weight_decay=0.1, lr=1e-3)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    embeddings = {id(model.body.embeddings.token.weight), id(model.body.embeddings.position.weight)}
    assert embeddings <= {id(p) for p in plain["params"]}
    assert id(model.lm_head.weight) in {id(p) for p in decayed["params"]}    # untied: a plain projection
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    embedding_count = sum(p.numel() for p in model.parameters() if id(p) in embeddings)
    assert model.num_params(exclude_embeddings=True) == total - embedding_count
    config = model.config
    assert model.estimate_flops_per_token() == 6 * total + 12 * config.n_layers * config.d_model * config.max_seq_len
    # At the batch's real length, not max_seq_len: attention FLOPs scale with the keys each token attends to.
    assert model.estimate_flops_per_token(length=20) == 6 * total + 12 * config.n_layers * config.d_model * 20
    tied = _model("decoder")
    assert tied.num_params() == total - config.vocab_size * config.d_model


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"model_type": "DecoderLM"}'), "config.json: missing key 'config'"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 8), "model.safetensors: not the weights"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors: not the weights"),
    (lambda d: _model("decoder", n_layers=1).save(d / "other") or (d / "other" / "model.safetensors").replace(
        d / "model.safetensors"), "model.safetensors: not the weights"),
])
def test_load_of_a_damaged_directory_names_the_file(tmp_path, damage, message):
    _model("decoder").save(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        DecoderLM.load(tmp_path)


def _model_and_batch(kind: str, attn_impl: str):
    """A tiny model of `kind` (or a Seq2SeqLM) and a padded training batch for it."""
    from fastlm.models import Seq2SeqLM

    config = tiny_config(attn_impl=attn_impl, n_layers=1, d_model=32, n_heads=2, d_ff=64)
    torch.manual_seed(0)
    ids, lengths = random_batch(config, [7, 5])
    if kind == "seq2seq":
        src_ids, src_lengths = random_batch(config, [4, 6], seed=1)
        return Seq2SeqLM(config, config), dict(src_ids=src_ids, src_lengths=src_lengths, tgt_ids=ids,
                                               tgt_lengths=lengths, labels=ids)
    return MODELS[kind](config), dict(input_ids=ids, lengths=lengths, labels=ids)


@pytest.mark.parametrize("attn_impl", ["fastlm", "sdpa", "eager"])
@pytest.mark.parametrize("kind", [*MODELS, "seq2seq"])
def test_forward_and_loss_compile_into_one_graph(kind, attn_impl):
    # No host sync in a forward: value checks of the inputs run only on CPU in eager mode or with FASTLM_DEBUG=1,
    # so torch.compile traces forward and loss whole (fullgraph=True raises at any graph break).
    torch._dynamo.reset()
    model, batch = _model_and_batch(kind, attn_impl)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    out = compiled(**batch)
    out.loss.backward()
    expected = model(**batch)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.n_targets == expected.n_targets


def test_value_checks_run_on_cpu_eager_and_under_fastlm_debug(monkeypatch):
    from fastlm.models.base import value_checks_wanted

    ids = torch.zeros(2, 3, dtype=torch.long)
    assert value_checks_wanted(ids) and not value_checks_wanted(ids.to("meta"))
    monkeypatch.setenv("FASTLM_DEBUG", "1")
    assert value_checks_wanted(ids.to("meta"))
