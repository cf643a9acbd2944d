"""Hostile model directories: every damage to config.json or model.safetensors is a ValueError naming the file and
the problem, never a traceback from deep inside torch and never a model with wrong or non-finite weights."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlm.models import DecoderLM, EncoderLM, Seq2SeqLM

from model_helpers import tiny_config


def _saved(directory, model_class=DecoderLM, **overrides):
    torch.manual_seed(0)
    model = model_class(tiny_config(n_layers=1, **overrides))
    model.save(directory)
    return model


def _rewrite_weights(directory, change):
    """Apply `change(tensors)` to the stored tensors and write them back."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _rewrite_config(directory, change):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(mapping, key, value):
    mapping[key] = value


def _poison(tensors, name, value):
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value


EMBEDDING = "body.embeddings.token.weight"


@pytest.mark.parametrize("damage, message", [
    (lambda t: _set(t, EMBEDDING, t[EMBEDDING][:-1].clone()), rf"'{EMBEDDING}' has shape \(95, 128\), expected \(96"),
    (lambda t: t.pop("body.final_norm.weight"), "missing tensor 'body.final_norm.weight'"),
    (lambda t: _set(t, "extra.weight", torch.zeros(2)), "unexpected tensor 'extra.weight'"),
    (lambda t: _set(t, EMBEDDING, t[EMBEDDING].half()), f"'{EMBEDDING}' has dtype torch.float16, expected "
                                                         "torch.float32"),
    (lambda t: _poison(t, EMBEDDING, math.nan), f"'{EMBEDDING}' holds 1 non-finite values"),
    (lambda t: _poison(t, "body.final_norm.bias", math.inf), "'body.final_norm.bias' holds 1 non-finite values"),
    (lambda t: _set(t, "lm_head.weight", torch.zeros_like(t[EMBEDDING])), r"tied tensors \[.*\] differ"),
])
def test_weights_that_do_not_fit_the_model_are_refused_by_name(tmp_path, damage, message):
    _saved(tmp_path)
    _rewrite_weights(tmp_path, damage)
    with pytest.raises(ValueError, match=rf"model.safetensors: not the weights of this DecoderLM: .*{message}"):
        DecoderLM.load(tmp_path)


def test_a_tied_tensor_may_be_stored_under_either_name(tmp_path):
    model = _saved(tmp_path)
    _rewrite_weights(tmp_path, lambda t: _set(t, "lm_head.weight", t.pop(EMBEDDING)))
    loaded = DecoderLM.load(tmp_path)
    assert loaded.lm_head.weight is loaded.body.embeddings.token.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_a_truncated_weights_file_is_refused(tmp_path, keep):
    _saved(tmp_path, EncoderLM)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match="model.safetensors: not the weights of this EncoderLM: not a readable"):
        EncoderLM.load(tmp_path)


def test_a_weights_file_with_trailing_bytes_is_refused(tmp_path):
    _saved(tmp_path)
    with open(tmp_path / "model.safetensors", "ab") as file:
        file.write(b"\0" * 64)
    with pytest.raises(ValueError, match="model.safetensors: not the weights"):
        DecoderLM.load(tmp_path)


def test_a_pickle_named_model_safetensors_is_never_unpickled(tmp_path):
    _saved(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DecoderLM.load(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda c: _set(c["config"], "d_model", "128"), r"ModelConfig.d_model = '128': expected int"),
    (lambda c: _set(c["config"], "n_layers", -1), "ModelConfig.n_layers = -1: expected a positive integer"),
    (lambda c: _set(c["config"], "dropout", 1.5), r"ModelConfig.dropout = 1.5: expected a probability"),
    (lambda c: _set(c["config"], "positional", "alibi"), "ModelConfig.positional = 'alibi': expected one of"),
    (lambda c: _set(c["config"], "d_models", 128), r"ModelConfig keys \['d_models'\]: unknown"),
    (lambda c: _set(c, "config", [1, 2]), "config.json: "),
    (lambda c: _set(c, "model_type", "EncoderLM"), "model_type = 'EncoderLM': expected 'DecoderLM'"),
])
def test_a_config_json_with_wrong_types_or_values_names_the_file(tmp_path, change, message):
    _saved(tmp_path)
    _rewrite_config(tmp_path, change)
    with pytest.raises(ValueError, match=rf"config.json.*{message}"):
        DecoderLM.load(tmp_path)


def test_a_config_with_another_shape_than_the_weights_is_refused(tmp_path):
    _saved(tmp_path)
    _rewrite_config(tmp_path, lambda c: _set(c["config"], "d_ff", 256))
    with pytest.raises(ValueError, match=r"has shape \(512, 128\), expected \(256, 128\)"):
        DecoderLM.load(tmp_path)


def test_a_seq2seq_config_with_a_non_boolean_share_embeddings_names_the_file(tmp_path):
    Seq2SeqLM(tiny_config(n_layers=1), tiny_config(n_layers=1)).save(tmp_path)
    _rewrite_config(tmp_path, lambda c: _set(c, "share_embeddings", "yes"))
    with pytest.raises(ValueError, match="config.json: share_embeddings = 'yes': expected true or false"):
        Seq2SeqLM.load(tmp_path)
