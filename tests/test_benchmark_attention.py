"""benchmarks/attention.py: the padded-row peers (FlexAttention's BlockMask, flash-attn's unpadded varlen layout)
compute what fastlm computes, so that their times compare like with like."""

import pytest
import torch
import torch.nn.functional as F
from benchmark_modules import load_benchmark
from torch.nn.attention.flex_attention import flex_attention

from fastlm.kernels.attention import attention_reference


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("attention")


def padded_case(bench, causal: bool):
    case = bench.Case("padded", 2, 3, 24, 40, 16, causal=causal, padded=True)
    q, k, v, kv_lens = bench.make_inputs(case, "cpu", torch.float32, torch.Generator().manual_seed(0))
    expected = attention_reference(q, k, v, causal=causal, kv_lens=kv_lens, sm_scale=16**-0.5)
    return case, (q, k, v), kv_lens, expected


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_has_fastlms_semantics(bench, monkeypatch, causal):
    # Eager FlexAttention applies the same mask; compiling it here would only cost the test time.
    monkeypatch.setattr(bench, "flex_attention", flex_attention)
    case, inputs, kv_lens, expected = padded_case(bench, causal)
    out = bench.flex_provider(case, kv_lens).run(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def varlen_oracle(q, k, v, query_starts, key_starts, max_query_len, max_key_len):
    """flash_attn_varlen_func's contract, one sequence at a time: (tokens, H, D) rows, sequence i at starts[i]."""
    outputs = []
    for i in range(len(query_starts) - 1):
        rows = [t[starts[i]:starts[i + 1]].transpose(0, 1) for t, starts in
                ((q, query_starts), (k, key_starts), (v, key_starts))]  # (H, n, D)
        outputs.append(F.scaled_dot_product_attention(*rows).transpose(0, 1))
    return torch.cat(outputs)


def test_flash_varlen_layout_unpads_the_keys_and_keeps_every_query(bench, monkeypatch):
    monkeypatch.setattr(bench, "flash_attn_varlen_func", varlen_oracle)
    case, inputs, kv_lens, expected = padded_case(bench, causal=False)
    provider = bench.flash_varlen_provider(case, kv_lens)
    q, k, v, grad_out = provider.adapt(*inputs, torch.zeros_like(inputs[0]))
    assert k.shape[0] == v.shape[0] == int(kv_lens.sum()) and grad_out.shape == q.shape
    out = provider.run(q, k, v).reshape(case.batch, case.q_len, case.heads, case.head_dim).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_flash_varlen_is_named_not_run_on_causal_padded_rows(bench, monkeypatch):
    monkeypatch.setattr(bench, "flash_attn_varlen_func", varlen_oracle)
    case, _, kv_lens, _ = padded_case(bench, causal=True)
    found, missing = bench.providers(case, kv_lens, "torch")
    assert "flash-varlen" not in found and "causal" in missing["flash-varlen"]
