"""Small configs, random batches and a corpus sample shared by the model tests."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from fastlm.models import ModelConfig
from fastlm.models import base as models_base
from fastlm.models import blocks as models_blocks


def tiny_config(**overrides) -> ModelConfig:
    """The tiny preset with a small vocabulary and no dropout (deterministic forwards)."""
    return ModelConfig.preset("tiny", **{"vocab_size": 96, "dropout": 0.0, **overrides})


def random_batch(config: ModelConfig, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max(lengths)) ids in [4, vocab) with pad_id beyond each row's length, and the lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    lengths_tensor = torch.tensor(lengths)
    ids[torch.arange(ids.shape[1])[None, :] >= lengths_tensor[:, None]] = config.pad_id
    return ids, lengths_tensor


def corpus_pairs(directory: Path, count: int, max_bytes: int) -> list[tuple[str, str]]:
    """The first `count` (Korean, English) training pairs of at most `max_bytes` UTF-8 bytes on each side."""
    korean = (directory / "train.ko").read_text(encoding="utf-8").splitlines()
    english = (directory / "train.en").read_text(encoding="utf-8").splitlines()
    pairs = [(ko, en) for ko, en in zip(korean, english)
             if 0 < len(ko.encode()) <= max_bytes and 0 < len(en.encode()) <= max_bytes]
    assert len(pairs) >= count, f"only {len(pairs)} pairs of <= {max_bytes} bytes in {directory}"
    return pairs[:count]


def force_triton_kernels(monkeypatch) -> None:
    """Route the models' kernel calls to the Triton kernels (the CPU interpreter here), never the torch path."""
    pytest.importorskip("triton")
    from fastlm.kernels import attention, attention_varlen, linear_cross_entropy
    from fastlm.kernels.utils import interpreter_active
    if not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    monkeypatch.setattr(models_blocks, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(models_blocks, "attention", functools.partial(attention, impl="triton"))
    monkeypatch.setattr(models_blocks, "attention_varlen", functools.partial(attention_varlen, impl="triton"))
    monkeypatch.setattr(models_base, "linear_cross_entropy", functools.partial(linear_cross_entropy, impl="triton"))


def assert_same_loss_and_gradients(results: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> None:
    """results[attn_impl] = (loss, {parameter name: gradient}): "fastlm" and "sdpa" must match "eager"."""
    reference_loss, reference_grads = results["eager"]
    for impl in ("fastlm", "sdpa"):
        loss, grads = results[impl]
        torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5, msg=impl)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=f"{impl} {name}")
