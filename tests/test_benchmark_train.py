"""benchmarks/train.py: the torch MLM baseline, which scores only the masked rows, trains on the same loss as fastlm."""

import pytest
import torch
import torch.nn.functional as F
from benchmark_modules import load_benchmark

from fastlm.models import EncoderLM, ModelConfig


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train")


@pytest.mark.parametrize("recipe", ["full logits + F.cross_entropy", "F.linear_cross_entropy"])
def test_gathered_mlm_baseline_has_the_full_logits_loss_and_fastlms(bench, recipe, monkeypatch):
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", vocab_size=96, dropout=0.0, n_layers=1)
    model = EncoderLM(config)
    batch = bench.make_batch("encoder", 4, 24, config.vocab_size, torch.device("cpu"),
                             torch.Generator().manual_seed(1))
    labels = batch["labels"]
    assert 0 < (labels != -100).sum() < labels.numel() // 2  # a real gather: most rows are left out

    full_logits = model(batch["input_ids"], batch["lengths"], return_logits=True).logits  # (B, T, V)
    full = F.cross_entropy(full_logits.reshape(-1, config.vocab_size), labels.reshape(-1), ignore_index=-100)
    full_grad, = torch.autograd.grad(full, model.head.dense.weight)
    fastlm = model(**batch).loss

    # As training_step hands the torch baseline its model: the projection's parameters are applied by the recipe.
    monkeypatch.setattr(bench.output_projection(model, "encoder"), "forward", lambda states: states)
    gathered = bench.torch_loss(model, "encoder", batch, recipe)
    gathered_grad, = torch.autograd.grad(gathered, model.head.dense.weight)

    torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fastlm, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_the_torch_recipe_is_timed_on_the_masked_rows(bench, monkeypatch):
    config = ModelConfig.preset("tiny", vocab_size=96, dropout=0.0)
    batch = bench.make_batch("encoder", 4, 24, config.vocab_size, torch.device("cpu"),
                             torch.Generator().manual_seed(1))
    setup = bench.Setup(preset="tiny", vocab=96, device=torch.device("cpu"), use_bf16=False, repeat=1)
    rows_seen = []
    monkeypatch.setattr(bench, "torch_objective",
                        lambda recipe, states, *rest: rows_seen.append(len(states)) or states.sum())
    monkeypatch.setattr(bench, "time_call", lambda call, repeat: call() or 1.0)
    bench.fastest_torch_recipe("encoder", config, batch, setup)
    assert set(rows_seen) == {int((batch["labels"] != -100).sum())}
