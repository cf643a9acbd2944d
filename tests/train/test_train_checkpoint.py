"""Checkpoint files: atomic replacement, last-K plus best retention, RNG states, unreadable files."""

import random

import numpy as np
import pytest
import torch

from fastlm.train import checkpoint
from fastlm.train.checkpoint import CheckpointDir, capture_rng_state, load_checkpoint, restore_rng_state


def test_keeps_the_last_k_and_the_best(tmp_path):
    store = CheckpointDir(tmp_path, keep_last=2)
    for step, is_best in [(10, True), (20, False), (30, True), (40, False), (50, False)]:
        store.save({"step": step}, step, is_best=is_best)
    assert [p.name for p in store.step_files()] == ["step-00000040.pt", "step-00000050.pt"]
    assert load_checkpoint(store.best)["step"] == 30  # outlives the pruned step-30 file
    assert store.latest().name == "step-00000050.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-00000040.pt", "step-00000050.pt"]


def test_a_crash_while_writing_leaves_the_old_file_intact(tmp_path, monkeypatch):
    store = CheckpointDir(tmp_path, keep_last=3)
    store.save({"step": 10, "w": torch.ones(3)}, 10, is_best=True)

    def crash_half_way(payload, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        store.save({"step": 10, "w": torch.zeros(3)}, 10, is_best=True)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path / "step-00000010.pt")["w"], torch.ones(3))
    assert torch.equal(load_checkpoint(store.best)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-00000010.pt"]  # no temp file left


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint.atomic_save({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")


def test_best_is_an_atomic_copy_where_hard_links_fail(tmp_path, monkeypatch):
    def no_hard_links(source, destination):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_hard_links)
    store = CheckpointDir(tmp_path, keep_last=1)
    store.save({"step": 10, "w": torch.ones(3)}, 10, is_best=True)
    store.save({"step": 20, "w": torch.zeros(3)}, 20, is_best=False)
    assert torch.equal(load_checkpoint(store.best)["w"], torch.ones(3))  # outlives the pruned step-10 file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-00000020.pt"]  # no temp file left
