"""Checkpoint averaging: the result is the mean of the tensors (a property test against the float64 mean), exact for
copies of one state, in each tensor's dtype; the newest K of a run; refusals of other runs, other architectures,
repeated steps and runs that kept fewer than K; an averaged DecoderLM keeps its tied embedding, loads and runs."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastlm.models import DecoderLM, ModelConfig
from fastlm.train import TrainConfig, Trainer, load_checkpoint
from fastlm.train.averaging import average_checkpoints, mean_state_dict, newest_checkpoints
from fastlm.train.tasks import average

sys.path.insert(0, str(Path(__file__).parent))
from scale_out_training import MODEL, RandomBatches  # noqa: E402
from toy_training import ToyBatches, ToyLM  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = {"weight": (2, 3), "bias": (3,)}


@st.composite
def state_dicts(draw) -> tuple[list[dict[str, torch.Tensor]], torch.dtype]:
    """K state dicts of one layout: float tensors of any values the dtype holds, and an integer counter."""
    k, dtype = draw(st.integers(1, 6)), draw(st.sampled_from(DTYPES))
    limit = 65504.0 if dtype == torch.float16 else 2.0**100  # float16 holds no larger value

    def tensor(shape) -> torch.Tensor:
        values = draw(st.lists(st.floats(-limit, limit, width=32), min_size=int(torch.Size(shape).numel()),
                               max_size=int(torch.Size(shape).numel())))
        return torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype)

    return [{**{name: tensor(shape) for name, shape in SHAPES.items()}, "steps": torch.tensor(7)}
            for _ in range(k)], dtype


@given(state_dicts())
def test_the_average_is_the_mean_of_the_tensors_in_their_dtype(drawn):
    states, dtype = drawn
    before = [{name: tensor.clone() for name, tensor in state.items()} for state in states]
    averaged = mean_state_dict(states)
    for name in SHAPES:
        expected = torch.stack([state[name].double() for state in states]).mean(0).to(dtype)
        assert averaged[name].dtype == dtype
        torch.testing.assert_close(averaged[name], expected, msg=name)
    assert torch.equal(averaged["steps"], torch.tensor(7))
    assert all(torch.equal(state[name], old[name]) for state, old in zip(states, before) for name in state)
    copies = mean_state_dict([states[0]] * len(states))
    assert all(torch.equal(copies[name], states[0][name]) for name in states[0])  # exact: no rounding on the way


def test_state_dicts_of_different_models_or_counters_are_refused():
    state = {"weight": torch.ones(2, 3), "steps": torch.tensor(7)}
    with pytest.raises(ValueError, match=r"weight: the first has \(\(2, 3\), torch.float32\), state 1 has \(\(3, 2\)"):
        mean_state_dict([state, {**state, "weight": torch.ones(3, 2)}])
    with pytest.raises(ValueError, match="steps: a torch.int64 tensor that differs"):
        mean_state_dict([state, {**state, "steps": torch.tensor(8)}])
    with pytest.raises(ValueError, match="no state dicts to average"):
        mean_state_dict([])


def toy_run(run_dir: Path, *, seed: int = 0, width: int = 32) -> Path:
    """A toy run with step checkpoints 1 to 4 (keep_last 3 keeps 2 to 4) and best.pt."""
    torch.manual_seed(seed)
    config = TrainConfig(progress=False, warmup_steps=1, max_steps=4, batch_size=4, eval_interval=0,
                         checkpoint_interval=1, keep_last=3, lr=3e-2, seed=seed)
    Trainer(ToyLM(width=width), ToyBatches(), config, run_dir, run_info={"task": "toy"}).fit()
    return run_dir


def test_the_newest_checkpoints_of_a_run_average_to_the_mean_of_their_weights(tmp_path):
    run = toy_run(tmp_path / "run")
    paths = newest_checkpoints(run, 2)
    assert [path.name for path in paths] == ["step-00000003.pt", "step-00000004.pt"]
    weights, run_info, steps = average_checkpoints(paths)
    assert steps == [3, 4] and run_info == {"task": "toy"}
    models = [load_checkpoint(path)["model"] for path in paths]
    assert not torch.equal(models[0]["head.weight"], models[1]["head.weight"])
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, (models[0][name] + models[1][name]) / 2, msg=name)
    with pytest.raises(ValueError, match=r"--last 4: .*checkpoints holds 3 step checkpoint\(s\) \(the run keeps "
                                         r"keep_last=3\): average at most 3, or train with --keep_last 4 or more"):
        newest_checkpoints(run, 4)
    with pytest.raises(FileNotFoundError, match="no checkpoints/ in it"):
        newest_checkpoints(tmp_path / "nowhere", 1)


@pytest.mark.parametrize("other, message", [
    (dict(seed=1), r"seed: the first has 0, this one 1"),
    (dict(width=16), r"shapes.blocks.0.bias: the first has \(32,\), this one \(16,\)"),
])
def test_checkpoints_of_another_run_or_architecture_are_refused(tmp_path, other, message):
    run, other_run = toy_run(tmp_path / "run"), toy_run(tmp_path / "other", **other)
    with pytest.raises(ValueError, match=rf"step-00000004.pt is a checkpoint of another run than .*{message}"):
        average_checkpoints([run / "checkpoints" / "step-00000004.pt", other_run / "checkpoints" / "step-00000004.pt"])


def test_a_step_given_twice_or_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    checkpoints = toy_run(tmp_path / "run") / "checkpoints"
    with pytest.raises(ValueError, match=r"best.pt: step 4 given twice \(best.pt is a step checkpoint too\)"):
        average_checkpoints([checkpoints / "step-00000004.pt", checkpoints / "best.pt"])
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: format None, expected a 'fastlm-checkpoint' file"):
        average_checkpoints([tmp_path / "other.pt"])


def test_an_averaged_decoder_keeps_its_tied_embedding_loads_and_runs(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(progress=False, warmup_steps=1, max_steps=3, batch_size=2, eval_interval=0,
                         checkpoint_interval=1, keep_last=3, lr=1e-2)
    run_info = {"task": "pretrain-decoder", "model": MODEL, "tokenizer_sha256": "a" * 64}
    batches = RandomBatches("decoder", config.batch_size)
    Trainer(DecoderLM(ModelConfig(**MODEL)), batches, config, tmp_path / "run", run_info=run_info).fit()
    paths = newest_checkpoints(tmp_path / "run", 3)
    assert average(paths, tmp_path / "averaged") == [1, 2, 3]

    model = DecoderLM.load(tmp_path / "averaged")
    assert model.lm_head.weight is model.body.embeddings.token.weight
    states = [load_checkpoint(path)["model"] for path in paths]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, sum(state[name] for state in states) / 3, msg=name)
    assert torch.isfinite(model(**batches.batch(0, 0)).loss)
    config_json = (tmp_path / "averaged" / "config.json").read_text()
    assert '"averaged_steps": [\n      1,\n      2,\n      3\n    ]' in config_json and "a" * 64 in config_json

    with pytest.raises(FileExistsError, match="--output .*averaged exists: .* pass --overwrite"):
        average(paths[-1:], tmp_path / "averaged")
    average(paths[-1:], tmp_path / "averaged", overwrite=True)  # --last 1: the last weights as a model
    assert torch.equal(DecoderLM.load(tmp_path / "averaged").lm_head.weight, states[-1]["lm_head.weight"])
