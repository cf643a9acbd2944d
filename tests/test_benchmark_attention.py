"""benchmarks/attention.py: the peers (FlexAttention with or without its BlockMask, flash-attn's unpadded varlen
layout) compute what fastlm computes, so that their times compare like with like; the rows name fastlm's path."""

import pytest
import torch
import torch.nn.functional as F
from benchmark_modules import load_benchmark
from torch.nn.attention.flex_attention import flex_attention

from fastlm.kernels.attention import attention_reference


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("attention")


def padded_case(bench, causal: bool, padded: bool = True):
    case = bench.Case("padded" if padded else "dense", 2, 3, 24, 40, 16, causal=causal, padded=padded)
    q, k, v, kv_lens = bench.make_inputs(case, "cpu", torch.float32, torch.Generator().manual_seed(0))
    expected = attention_reference(q, k, v, causal=causal, kv_lens=kv_lens, sm_scale=16**-0.5)
    return case, (q, k, v), kv_lens, expected


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal,padded", [(False, True), (True, True), (True, False), (False, False)])
def test_flex_block_mask_has_fastlms_semantics(bench, monkeypatch, causal, padded):
    # Eager FlexAttention applies the same mask; compiling it here would only cost the test time.
    monkeypatch.setattr(bench, "flex_attention", flex_attention)
    case, inputs, kv_lens, expected = padded_case(bench, causal, padded)
    out = bench.flex_provider(case, kv_lens, "cpu").run(*inputs)
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
    found, missing = bench.providers(case, kv_lens, "torch", "cpu")
    assert "flash-varlen" not in found and "causal" in missing["flash-varlen"]


def test_rows_name_the_forward_fastlm_takes(bench):
    case, (q, k, v), _, _ = padded_case(bench, causal=True, padded=False)
    assert bench.fastlm_paths(case, q, k, v, None) == {"fwd": "reference", "fwd+bwd": "reference"}  # off CUDA
    decode = bench.Case("decode", 1, 2, 1, 40, 16, backward=False)
    assert bench.fastlm_paths(decode, q[:1, :2, :1], k[:1, :2], v[:1, :2], None) == {"fwd": "reference"}
