"""ModelConfig: presets, JSON round trip, type-checked overrides, unknown keys rejected."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlm.models import ModelConfig
from fastlm.models.config import PRESETS


@given(
    preset=st.sampled_from(sorted(PRESETS)),
    vocab_size=st.integers(8, 70000),
    n_kv_heads=st.sampled_from([None, 1, 2, 4]),
    norm_position=st.sampled_from(["pre", "post"]),
    positional=st.sampled_from(["learned", "sinusoidal", "rope"]),
    activation=st.sampled_from(["gelu", "relu", "swiglu"]),
    dropout=st.floats(0.0, 0.9),
    tie_embeddings=st.booleans(),
)
def test_json_round_trip(tmp_path_factory, preset, vocab_size, n_kv_heads, **fields):
    config = ModelConfig.preset(preset, vocab_size=vocab_size, n_kv_heads=n_kv_heads, **fields)
    path = tmp_path_factory.mktemp("config") / "config.json"
    config.save_json(path)
    assert ModelConfig.load_json(path) == config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_presets_have_the_documented_shapes():
    base = ModelConfig.preset("base")
    assert (base.d_model, base.n_layers, base.n_heads, base.d_ff) == (768, 12, 12, 3072)
    tiny = ModelConfig.preset("tiny")
    assert (tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.d_ff, tiny.max_seq_len) == (128, 4, 4, 512, 128)


def test_int_for_float_becomes_float():
    config = ModelConfig.preset("tiny", dropout=0, init_std=1)
    assert isinstance(config.dropout, float) and isinstance(config.init_std, float)


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_size": 128}, "hidden_size"),
    ({"d_model": "128"}, "d_model"),
    ({"tie_embeddings": 1}, "tie_embeddings"),
    ({"n_layers": True}, "n_layers"),
    ({"n_layers": 2.0}, "n_layers"),
    ({"positional": "alibi"}, "positional"),
    ({"attn_impl": "flash"}, "attn_impl"),
    ({"d_model": 130}, "d_model"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"dropout": 1.0}, "dropout"),
    ({"eos_id": 96}, "eos_id"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"n_kv_heads": 0}, "n_kv_heads = 0"),
    ({"n_kv_heads": -2}, "n_kv_heads = -2"),
    ({"dropout": -0.1}, "dropout"),
    ({"init_std": float("nan")}, "init_std"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ({"positional": "rope", "rope_theta": -1.0}, "rope_theta"),
])
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **{"vocab_size": 96, **overrides})


def test_unknown_preset():
    with pytest.raises(ValueError, match="huge"):
        ModelConfig.preset("huge")


def test_unknown_key_in_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"d_model": 64, "n_heads": 4, "colour": "blue"}')
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.load_json(path)
