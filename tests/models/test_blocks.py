"""The shared building blocks: the three attention implementations agree, rope is relative, the cache writes rows."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
