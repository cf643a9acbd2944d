"""benchmarks/cross_entropy.py: a peer that fails is named and left out, and the others are still timed."""

import pytest
import torch
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cross_entropy")


def test_a_failing_peer_is_named_and_left_out(bench, capsys):
    hidden = torch.randn(8, 4, requires_grad=True)

    def broken():
        raise RuntimeError("out of memory")

    row = bench.measure("case", [hidden], {"fastlm": lambda: hidden.square().sum(), "broken": broken}, repeat=2)
    assert [m.provider for m in row.results] == ["fastlm"] and row.results[0].value > 0
    assert "broken failed: RuntimeError: out of memory" in capsys.readouterr().err
