"""The shared building blocks: the three attention implementations agree, SDPA gets a mask only where padding needs
it, rope is relative, the cache writes rows."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import random_batch, tiny_config

from fastlm.models import DecoderLM, EncoderLM, Seq2SeqLM
from fastlm.models import blocks
from fastlm.models.blocks import apply_rope, scaled_dot_product
from fastlm.models.kv_cache import AttentionCache


@st.composite
def attention_problems(draw):
    batch, kv_heads, groups = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    n_queries, n_keys = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    causal = draw(st.booleans())
    if causal:
        n_keys = max(n_keys, n_queries)   # bottom-right causal: every query sees at least one key
    kv_lens = draw(st.none() | st.lists(st.integers(1, n_keys), min_size=batch, max_size=batch))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    q = torch.randn(batch, kv_heads * groups, n_queries, 16, generator=generator)
    k = torch.randn(batch, kv_heads, n_keys, 16, generator=generator)
    v = torch.randn(batch, kv_heads, n_keys, 16, generator=generator)
    return q, k, v, causal, None if kv_lens is None else torch.tensor(kv_lens)


def _dense_reference(q, k, v, causal, kv_lens):
    """Attention written out row by row in float64: the oracle."""
    batch, heads, n_queries, _ = q.shape
    n_keys, groups = k.shape[2], heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_queries):
                visible = [j for j in range(n_keys)
                           if (not causal or j <= i + n_keys - n_queries) and (kv_lens is None or j < kv_lens[b])]
                if not visible:
                    continue
                keys, values = k[b, h // groups, visible], v[b, h // groups, visible]
                weights = (keys @ q[b, h, i] / 4.0).softmax(dim=0)
                out[b, h, i] = weights @ values
    return out


@settings(max_examples=20)
@given(problem=attention_problems())
def test_implementations_match_the_reference(problem):
    q, k, v, causal, kv_lens = problem
    expected = _dense_reference(q.double(), k.double(), v.double(), causal, kv_lens).float()
    # Rows that see no key (causal with short kv_lens) are undefined for sdpa/eager: compare the others only.
    defined = expected.abs().sum(-1, keepdim=True) > 0
    for impl in ("fastlm", "sdpa", "eager"):
        out = scaled_dot_product(q, k, v, causal=causal, kv_lens=kv_lens, dropout_p=0.0, impl=impl)
        torch.testing.assert_close(torch.where(defined, out, 0.0), expected, msg=impl)


def test_rope_scores_depend_on_relative_position_only():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 32, generator=generator, dtype=torch.float64).unbind(0)
    def score(query_position, key_position):
        rotated_q = apply_rope(q[None], torch.tensor([[query_position]]), 10000.0)
        rotated_k = apply_rope(k[None], torch.tensor([[key_position]]), 10000.0)
        return (rotated_q * rotated_k).sum().item()
    assert abs(score(7, 3) - score(24, 20)) < 1e-4   # angles are computed in float32
    assert abs(score(7, 3) - score(7, 4)) > 1e-2


def test_cache_writes_each_row_at_its_positions():
    cache = AttentionCache(capacity=6)
    first = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    cache.write(first, -first, torch.arange(3)[None])
    step = torch.full((2, 1, 1, 2), 100.0)
    keys, values = cache.write(step, -step, torch.tensor([[3], [1]]))
    assert torch.equal(keys[0, 0, :4], torch.cat([first[0, 0], step[0, 0]]))
    assert torch.equal(keys[1, 0, :3], torch.cat([first[1, 0, :1], step[1, 0], first[1, 0, 2:]]))
    assert torch.equal(values, -keys)
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[0], cache.keys[1])


def _sdpa_calls(monkeypatch, run) -> list[tuple[bool, tuple | None]]:
    """(is_causal, attn_mask shape or None) of every F.scaled_dot_product_attention call made by `run()`."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((is_causal, None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    run()
    return calls


# attn_impl="fastlm" takes SDPA on the CPU (its Triton kernel runs on CUDA): both must reach SDPA's fast backends.
@pytest.mark.parametrize("impl", ["sdpa", "fastlm"])
def test_sdpa_gets_a_mask_only_where_rows_are_padded(impl, monkeypatch):
    config = tiny_config(attn_impl=impl, n_layers=1)
    ids, lengths = random_batch(config, [9, 6])
    full = torch.randint(4, config.vocab_size, (2, 9))
    padding_mask = (2, 1, 1, 9)   # keys beyond each row's length, broadcast over heads and queries
    decoder, encoder = DecoderLM(config), EncoderLM(config)
    # Packed causal blocks: SDPA's own causal mask and no attn_mask, so flash / cuDNN can run.
    assert _sdpa_calls(monkeypatch, lambda: decoder(full, labels=full)) == [(True, None)]
    # Padded causal rows: the causal and padding masks in one, where padding needs it.
    assert _sdpa_calls(monkeypatch, lambda: decoder(ids, lengths, labels=ids)) == [(False, (2, 1, 9, 9))]
    # Bidirectional and unpadded: no mask at all; padded: the padding mask alone.
    assert _sdpa_calls(monkeypatch, lambda: encoder(full, labels=full)) == [(False, None)]
    assert _sdpa_calls(monkeypatch, lambda: encoder(ids, lengths, labels=ids)) == [(False, padding_mask)]
    # Cross-attention reads padded sources through the padding mask; the unpadded causal target needs none.
    seq2seq = Seq2SeqLM(config, tiny_config(attn_impl=impl, n_layers=1, positional="rope"))
    calls = _sdpa_calls(monkeypatch, lambda: seq2seq(ids, full, src_lengths=lengths, labels=full))
    assert calls == [(False, padding_mask), (True, None), (False, padding_mask)]   # encoder, self, cross


def test_fastlm_attention_keeps_its_kernel_where_it_runs(monkeypatch):
    """On the devices of KERNEL_DEVICE_TYPES attn_impl="fastlm" calls fastlm's kernel, never SDPA."""
    kernel_calls = []
    monkeypatch.setattr(blocks, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(blocks, "attention", lambda q, k, v, **options: kernel_calls.append(options) or q)
    q = torch.randn(1, 2, 4, 16)
    assert _sdpa_calls(monkeypatch, lambda: scaled_dot_product(q, q, q, causal=True, kv_lens=None, dropout_p=0.0,
                                                               impl="fastlm")) == []
    assert kernel_calls == [dict(causal=True, kv_lens=None, dropout_p=0.0)]


def test_cpu_autocast_training_attends_in_fp32(monkeypatch):
    """SDPA's bf16 backward is slow on the CPU: under autocast a training forward attends in fp32 (and hands bf16
    on), an inference forward keeps bf16; both close to fp32 attention."""
    dtypes = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **options: dtypes.append(q.dtype)
                        or real(q, k, v, **options))
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))
    expected = scaled_dot_product(q, k, v, causal=True, kv_lens=torch.tensor([5, 3]), dropout_p=0.0, impl="sdpa")
    for requires_grad in (True, False):
        half = [t.bfloat16().requires_grad_(requires_grad) for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = scaled_dot_product(*half, causal=True, kv_lens=torch.tensor([5, 3]), dropout_p=0.0, impl="sdpa")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16]
