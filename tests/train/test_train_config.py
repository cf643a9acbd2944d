"""TrainConfig presets, validation and `--key value` overrides; the learning-rate schedule."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlm.train.config import PRESETS, TASK_DEFAULTS, ConfigError, TrainConfig, parse_overrides, resolve
from fastlm.train.optim import lr_multiplier


def test_overrides_are_typed_and_applied_over_the_preset():
    config = resolve("tiny", parse_overrides(["--lr", "3e-4", "--compile=yes", "--max-steps", "7",
                                              "--schedule", "linear"]))
    assert config.lr == 3e-4 and config.compile is True and config.max_steps == 7 and config.schedule == "linear"
    assert config.batch_size == PRESETS["tiny"]["batch_size"]
    assert config.eval_batches == 0, "evaluation covers the whole validation split unless asked otherwise"


@pytest.mark.parametrize("args, message", [
    (["--lrr", "1"], "unknown config key 'lrr'"),
    (["--lr", "fast"], "--lr 'fast': expected float"),
    (["--max_steps", "1.5"], "--max_steps '1.5': expected int"),
    (["--compile", "maybe"], "expected a boolean"),
    (["--schedule", "cos"], "schedule='cos': expected one of cosine, linear, constant"),
    (["--lr", "0"], "lr=0.0: expected a value > 0"),
    (["--beta2", "1.5"], "beta2=1.5: expected a value in [0, 1]"),
    (["--label_smoothing", "1.5"], "label_smoothing=1.5: expected a value in [0, 1]"),
    (["--max_tokens", "-1"], "max_tokens=-1: expected a value >= 0"),
    (["--eval_batches", "-1"], "eval_batches=-1: expected a value >= 0"),
    (["--lr"], "--lr: missing value"),
    (["lr", "1"], "unexpected argument 'lr'"),
    (["--max_steps", "2", "--max-steps", "3"], "--max-steps '3': --max_steps '2' was given already"),
    (["--model.d_model=64", "--model.d-model", "32"], "--model.d-model '32': --model.d_model '64' was given already"),
])
def test_bad_overrides_name_the_key_and_value(args, message):
    with pytest.raises(ConfigError) as error:
        resolve("tiny", parse_overrides(args))
    assert message in str(error.value)


def test_the_task_sets_its_defaults_under_the_overrides(monkeypatch):
    assert resolve("tiny", {}, "finetune").label_smoothing == 0.0 == resolve("tiny", {}).label_smoothing  # measured
    monkeypatch.setitem(TASK_DEFAULTS, "finetune", {"label_smoothing": 0.1, "max_steps": 7})
    assert (resolve("tiny", {}, "finetune").label_smoothing, resolve("tiny", {}, "finetune").max_steps) == (0.1, 7)
    assert resolve("tiny", {}, "pretrain").label_smoothing == 0.0
    assert resolve("tiny", {"label_smoothing": "0"}, "finetune").label_smoothing == 0.0
    with pytest.raises(ConfigError, match="task='translate': expected one of pretrain, finetune"):
        resolve("tiny", {}, "translate")


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="preset='huge'"):
        TrainConfig.preset("huge")


def test_json_round_trip(tmp_path):
    config = resolve("small", {"seed": "3"})
    config.save_json(tmp_path / "c.json")
    assert TrainConfig.from_dict(json.loads((tmp_path / "c.json").read_text())) == config
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        TrainConfig.from_dict({**config.to_dict(), "bogus": 1})


@given(warmup=st.integers(0, 50), extra=st.integers(1, 500), schedule=st.sampled_from(["cosine", "linear"]),
       min_ratio=st.floats(0, 1))
def test_schedule_warms_up_then_decays_monotonically_to_the_floor(warmup, extra, schedule, min_ratio):
    max_steps = warmup + extra
    factors = [lr_multiplier(s, warmup_steps=warmup, max_steps=max_steps, schedule=schedule, min_lr_ratio=min_ratio)
               for s in range(max_steps + 5)]
    if warmup:
        assert factors[0] == pytest.approx(1 / warmup) and factors[warmup - 1] == pytest.approx(1.0)
        assert all(a < b for a, b in zip(factors[:warmup - 1], factors[1:warmup]))
    decay = factors[warmup:]
    assert decay[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))
    assert factors[max_steps] == pytest.approx(min_ratio) and factors[-1] == pytest.approx(min_ratio)
