"""fastlm.kernels.attention against a float64 oracle: the Triton kernels (compiled on CUDA, interpreted on CPU) and
the plain-torch reference path, forward and every gradient, masks, dropout, determinism and validation; padded
(B, H, N, D) batches and packed ones (attention_varlen)."""

import contextlib
import itertools
import math
import os
import re
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastlm.kernels import attention, attention_varlen
from fastlm.kernels.attention import dropout_keep_mask

attention_kernels = sys.modules["fastlm.kernels.attention"]  # the module: `attention` names the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max error allowed, relative to max(|expected|, 1): 16-bit inputs are rounded, and on a GPU the attention weights
# and score gradients enter the tensor-core products in that 16-bit dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = list(TOLERANCE)


def visible_keys(q_len, k_len, batch, causal, kv_lens):
    """(B, 1, Nq, Nk) bool: which keys each query attends to, written from the spec rather than from the kernel."""
    query = torch.arange(q_len)[:, None]
    key = torch.arange(k_len)[None, :]
    visible = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
    if causal:
        visible = visible & (key <= query + (k_len - q_len))
    if kv_lens is not None:
        visible = visible & (key < kv_lens.cpu().view(batch, 1, 1, 1))
    return visible.to(DEVICE)


def float64_oracle(q, k, v, *, causal=False, kv_lens=None, sm_scale=None, dropout_keep=None, dropout_p=0.0):
    """SDPA in float64 with an explicit boolean mask; rows that see no key are zero. With `dropout_keep`, the same
    math written out, since SDPA cannot take a given dropout mask."""
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    visible = visible_keys(q.shape[2], k.shape[2], q.shape[0], causal, kv_lens)
    sees_a_key = visible.any(-1, keepdim=True)
    # Rows that see nothing get an all-true mask (finite, no NaN in autograd) and are zeroed after.
    mask = visible | ~sees_a_key
    if dropout_keep is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)
    else:
        scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
        weights = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), dim=-1)
        out = (weights * dropout_keep / (1.0 - dropout_p)) @ v
    return torch.where(sees_a_key, out, 0.0)


def assert_close(actual, expected, dtype, what, *, unit=1.0):
    """Max error within TOLERANCE[dtype] of max(|expected|, unit): `unit` is the size rounding errors scale with
    when the expected values are near 0 (dk, after cancellation, scales with q)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual.double() - expected).abs().max().item()
    bound = TOLERANCE[dtype] * max(expected.abs().max().item(), unit)
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


@contextlib.contextmanager
def poisoned_allocations():
    """Every new floating tensor starts as NaN, so an output element a kernel forgets to write is caught."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    with mock.patch.object(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw))), \
            mock.patch.object(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw))):
        yield


def make_inputs(batch, heads, kv_heads, q_len, k_len, head_dim, dtype, *, scale=1.0, transposed=False, seed=0):
    """q, k, v requiring grad; `scale` multiplies q: logits far past exp's range unless the row max is subtracted
    (scaling k as well would push them past fp32's precision, where no kernel can recompute them consistently);
    `transposed` makes (B, N, H, D) storage."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(h, n, factor):
        shape = (batch, n, h, head_dim) if transposed else (batch, h, n, head_dim)
        data = (torch.randn(shape, generator=generator, dtype=torch.float64) * factor).to(DEVICE, dtype)
        return (data.transpose(1, 2) if transposed else data).requires_grad_()

    return tensor(heads, q_len, scale), tensor(kv_heads, k_len, 1.0), tensor(kv_heads, k_len, 1.0)


def run_with_grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def check_against_oracle(case, impl, poison):
    q, k, v = make_inputs(case["batch"], case["heads"], case["kv_heads"], case["q_len"], case["k_len"],
                          case["head_dim"], case["dtype"], scale=case["scale"], transposed=case["transposed"])
    kv_lens = case["kv_lens"]
    kv_lens = None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE)
    options = dict(causal=case["causal"], kv_lens=kv_lens, sm_scale=case["sm_scale"])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(DEVICE, q.dtype)

    with poisoned_allocations() if poison else contextlib.nullcontext():
        got = run_with_grads(lambda *t: attention(*t, **options, impl=impl), q, k, v, grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = run_with_grads(lambda *t: float64_oracle(*t, **options), q64, k64, v64, grad_out.double())
    units = (1.0, 1.0, case["scale"], 1.0)
    for name, a, e, unit in zip(("out", "dq", "dk", "dv"), got, expected, units):
        assert a.dtype == case["dtype"], name
        assert_close(a, e, case["dtype"], f"{name} {case}", unit=unit)


@st.composite
def attention_cases(draw, lengths, max_batch_heads):
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    batch = draw(st.integers(1, max(1, max_batch_heads // (kv_heads * group))))
    k_len = draw(lengths)
    kv_lens = draw(st.one_of(
        st.none(),
        st.lists(st.one_of(st.just(0), st.just(k_len), st.integers(0, k_len)), min_size=batch, max_size=batch),
    ))
    return dict(
        batch=batch, heads=kv_heads * group, kv_heads=kv_heads, q_len=draw(lengths), k_len=k_len,
        head_dim=draw(st.sampled_from([16, 24, 32, 64, 80])), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), kv_lens=kv_lens, scale=draw(st.sampled_from([1.0, 1.0, 30.0, 1000.0])),
        sm_scale=draw(st.sampled_from([None, None, 0.3])), transposed=draw(st.booleans()),
    )


# The interpreter costs ~1 ms per tile step: lengths and batch x heads stay small on CPU.
KERNEL_LENGTHS = st.one_of(st.sampled_from([1, 7, 16, 33, 65, 129]), st.integers(1, 48))


def targeted_case(**overrides):
    return dict(batch=1, heads=1, kv_heads=1, q_len=16, k_len=16, head_dim=16, dtype=torch.float32, causal=False,
                kv_lens=None, scale=1.0, sm_scale=None, transposed=False) | overrides


@settings(max_examples=30)
@given(case=attention_cases(KERNEL_LENGTHS, max_batch_heads=4))
@example(case=targeted_case(batch=2, heads=4, kv_heads=2, q_len=65, k_len=129, head_dim=64, dtype=torch.bfloat16,
                            causal=True, kv_lens=[100, 129], scale=1000.0))
@example(case=targeted_case(batch=2, heads=2, q_len=129, k_len=7, head_dim=80, dtype=torch.float16, causal=True,
                            kv_lens=[7, 3]))
@example(case=targeted_case(q_len=20, k_len=37, head_dim=256, dtype=torch.bfloat16, kv_lens=[30]))
@example(case=targeted_case(heads=2, q_len=33, k_len=40, head_dim=128, causal=True, transposed=True))
def test_triton_kernels_match_float64_reference(case):
    check_against_oracle(case, "triton", poison=True)


@settings(max_examples=40)
@given(case=attention_cases(st.sampled_from([1, 7, 65, 129, 1000]), max_batch_heads=6))
def test_reference_path_matches_float64_reference(case):
    check_against_oracle(case, "torch", poison=False)


@pytest.mark.parametrize("causal_shift", [-17, -1, 0, 1, 14, 15, 16, 17, 31])
def test_triton_causal_diagonal_at_every_offset_to_the_blocks(causal_shift):
    # Nk - Nq moves the diagonal across block edges, where the skipped/unmasked/masked block ranges change.
    check_against_oracle(targeted_case(q_len=40, k_len=40 + causal_shift, causal=True), "triton", poison=True)


def test_triton_long_sequence_small_head():
    # Causal with padded keys: most key blocks are skipped, which keeps the interpreter's time sane.
    check_against_oracle(targeted_case(q_len=999, k_len=1000, causal=True, kv_lens=[777]), "triton", poison=False)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rows_that_see_no_key_are_zero_with_zero_gradient(impl):
    # kv_lens = 0 hides every key of sequence 0; causal with Nq > Nk hides every key from the first Nq - Nk rows.
    q, k, v = make_inputs(2, 2, 1, 40, 24, 16, torch.float32)
    out = attention(q, k, v, causal=True, kv_lens=torch.tensor([0, 24], device=DEVICE), impl=impl)
    grad_q, grad_k, grad_v = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all() and torch.isfinite(grad_q).all()
    assert (out[0] == 0).all() and (grad_q[0] == 0).all() and (grad_k[0] == 0).all() and (grad_v[0] == 0).all()
    assert (out[1, :, :16] == 0).all() and (grad_q[1, :, :16] == 0).all()
    assert (out[1, :, 16:] != 0).any()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dropout_keeps_one_minus_p_of_the_weight(impl):
    # With q = 0 every visible key gets weight 1/Nk, and v = 1 turns each output into (kept keys / Nk) / (1 - p).
    batch, heads, q_len, k_len, p = 2, 2, 64, 96, 0.3
    q = torch.zeros(batch, heads, q_len, 16, device=DEVICE)
    v = torch.ones(batch, heads, k_len, 16, device=DEVICE)
    out = attention(q, v, v, dropout_p=p, generator=torch.Generator().manual_seed(0), impl=impl)
    kept = out[..., 0].double() * (1 - p)
    sigma = math.sqrt(p * (1 - p) / (kept.numel() * k_len))
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma
    assert torch.allclose(out[..., 1:], out[..., :1])  # one mask for the whole row of v


def test_dropout_mask_statistics_and_independence():
    keep = dropout_keep_mask(2, 3, 64, 96, 0.2, generator=torch.Generator().manual_seed(3), device=DEVICE)
    sigma = math.sqrt(0.2 * 0.8 / keep.numel())
    assert abs(keep.double().mean().item() - 0.8) < 5 * sigma
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("causal,kv_lens", [(False, None), (True, [33, 0])])
def test_dropout_forward_and_backward_use_the_same_mask(causal, kv_lens):
    batch, heads, kv_heads, q_len, k_len, p = 2, 2, 1, 37, 45, 0.25
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, 32, torch.float32)
    kv_lens = None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    options = dict(causal=causal, kv_lens=kv_lens)

    with poisoned_allocations():
        got = run_with_grads(lambda *t: attention(*t, **options, dropout_p=p, impl="triton",
                                                  generator=torch.Generator().manual_seed(11)), q, k, v, grad_out)
    keep = dropout_keep_mask(batch, heads, q_len, k_len, p, generator=torch.Generator().manual_seed(11), device=DEVICE)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = run_with_grads(lambda *t: float64_oracle(*t, **options, dropout_keep=keep, dropout_p=p),
                              q64, k64, v64, grad_out.double())
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert_close(a, e, torch.float32, name)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dropout_is_reproducible_from_the_generator(impl):
    q, k, v = make_inputs(1, 2, 2, 20, 30, 16, torch.float32)

    def run(seed):
        return attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(seed), impl=impl)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_zero_dropout_is_bitwise_the_no_dropout_path(impl):
    q, k, v = make_inputs(1, 2, 1, 33, 17, 24, torch.float16)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    without = run_with_grads(lambda *t: attention(*t, causal=True, impl=impl), q, k, v, torch.ones_like(q))
    with_zero = run_with_grads(lambda *t: attention(*t, causal=True, dropout_p=0.0, generator=generator, impl=impl),
                               q, k, v, torch.ones_like(q))
    assert all(torch.equal(a, b) for a, b in zip(without, with_zero))
    assert torch.equal(generator.get_state(), state)  # no seed drawn


def test_backward_is_deterministic_and_the_atomic_variant_is_correct():
    q, k, v = make_inputs(2, 4, 2, 45, 70, 32, torch.bfloat16)
    kv_lens = torch.tensor([70, 31], device=DEVICE)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, q.dtype)

    def grads(deterministic):
        return run_with_grads(lambda *t: attention(*t, causal=True, kv_lens=kv_lens, impl="triton",
                                                   deterministic=deterministic), q, k, v, grad_out)

    first, second = grads(True), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for name, a, b in zip(("out", "dq", "dk", "dv"), grads(False), first):
        assert_close(a, b.double(), torch.bfloat16, name)


def test_auto_runs_the_reference_path_off_gpu_and_the_kernel_on_gpu():
    q, k, v = make_inputs(1, 2, 2, 9, 9, 16, torch.float32)
    expected_impl = "triton" if DEVICE == "cuda" else "torch"
    assert torch.equal(attention(q, k, v, causal=True), attention(q, k, v, causal=True, impl=expected_impl))


def test_torch_compile_keeps_one_graph():
    q, k, v = make_inputs(1, 2, 1, 21, 21, 16, torch.float32)
    compiled = torch.compile(lambda *t: attention(*t, causal=True, impl="triton"), fullgraph=True,
                             backend="aot_eager")
    got = run_with_grads(compiled, q, k, v, torch.ones_like(q))
    eager = run_with_grads(lambda *t: attention(*t, causal=True, impl="triton"), q, k, v, torch.ones_like(q))
    assert all(torch.equal(a, b) for a, b in zip(got, eager))


def test_tuning_buckets_are_the_lengths_rounded_up_to_a_power_of_two():
    buckets = {tuple(attention_kernels._tuning_buckets(n, 193 - n).values()) for n in range(65, 129)}
    assert buckets == {(128, 128)}
    assert attention_kernels._tuning_buckets(1, 129) == {"Q_BUCKET": 1, "K_BUCKET": 256}


# (configs, pruner, the rows argument, the configs added for head dim 64, those of them that fit at d <= 64 only)
HEAD_DIM_64_CONFIGS = [
    ("_FORWARD_GPU_CONFIGS", "_prune_forward", "Q_BUCKET",
     {(128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)}, {(128, 128, 4, 3), (128, 128, 8, 3)}),
    ("_KEY_BLOCK_GPU_CONFIGS", "_prune_key_block", "K_BUCKET", {(128, 128, 8, 3), (64, 128, 8, 3)}, {(128, 128, 8, 3)}),
    ("_QUERY_BLOCK_GPU_CONFIGS", "_prune_query_block", "Q_BUCKET", {(128, 128, 8, 3), (128, 64, 8, 3)},
     {(128, 128, 8, 3)}),
]


@pytest.mark.parametrize("configs,pruner,rows_arg,added,head_dim_64_only", HEAD_DIM_64_CONFIGS)
def test_head_dim_64_configs_pass_the_shared_memory_pruning_only_where_they_fit(configs, pruner, rows_arg, added,
                                                                                head_dim_64_only):
    def kept(head_dim):
        pruned = getattr(attention_kernels, pruner)(getattr(attention_kernels, configs),
                                                    {"BLOCK_D": head_dim, rows_arg: 2048})
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned}

    assert added <= kept(64)
    assert added - head_dim_64_only <= kept(128) and not head_dim_64_only & kept(128)
    assert not added & kept(256)


def test_lengths_of_one_bucket_share_one_tuning(monkeypatch):
    """Forward and backward tune once for all query and key lengths in 33..64, again for 65; the config picked
    for one length is exact for the others of its bucket. Every tuner gets two candidates and a stand-in benchmark
    (the interpreter runs one config and cannot time kernels) preferring the larger outer block: 64 rows or keys
    for 33, the masking case."""
    tuners = [attention_kernels._forward, attention_kernels._key_block_grads, attention_kernels._query_block_grads]
    candidates = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}), triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})]
    benchmarked = []

    def stand_in_benchmark(*args, config, **meta):
        benchmarked.append(config)
        return [1.0 / (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]) + (config is candidates[0])]

    for tuner in tuners:
        monkeypatch.setattr(tuner, "configs", candidates)
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "_bench", stand_in_benchmark)
    for q_len, k_len, tunings in [(64, 64, 1), (33, 33, 1), (50, 41, 1), (65, 64, 2)]:
        q, k, v = make_inputs(1, 1, 1, q_len, k_len, 16, torch.float32, seed=q_len + k_len)
        check_against_oracle(dict(batch=1, heads=1, kv_heads=1, q_len=q_len, k_len=k_len, head_dim=16,
                                  dtype=torch.float32, scale=1.0, transposed=False, causal=True, kv_lens=None,
                                  sm_scale=None), "triton", poison=False)
        assert [len(tuner.cache) for tuner in tuners] == [tunings] * 3, (q_len, k_len)
    assert len(benchmarked) == 2 * 2 * len(tuners)  # two tunings of two candidates each, per tuner
    assert all(config is candidates[1] for tuner in tuners for config in tuner.cache.values())


def _bad_calls():
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 2, 8, 16)
    return [
        ("q must have 4 dimensions", dict(q=q[0])),
        ("q.dtype", dict(q=q.double(), k=k.double(), v=k.double())),
        ("q, k, v must share one dtype", dict(k=k.half())),
        ("k and v", dict(v=torch.randn(2, 2, 9, 16))),
        ("k.shape[0]=1", dict(k=k[:1], v=k[:1])),
        ("k.shape[1]=3", dict(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16))),
        ("k.shape[3]=8", dict(k=k[..., :8], v=k[..., :8])),
        ("q.shape[3]=300", dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300), v=torch.randn(1, 1, 2, 300))),
        ("every dimension", dict(q=q[:, :, :0])),
        ("kv_lens.dtype", dict(kv_lens=torch.tensor([1.0, 2.0]))),
        ("kv_lens.shape", dict(kv_lens=torch.tensor([1, 2, 3]))),
        ("kv_lens has values in [-1, 2]", dict(kv_lens=torch.tensor([-1, 2]))),
        ("kv_lens has values in [3, 9]", dict(kv_lens=torch.tensor([3, 9]))),
        ("kv_lens must be a torch.Tensor", dict(kv_lens=[1, 2])),
        ("dropout_p=1.0", dict(dropout_p=1.0)),
        ("sm_scale=nan", dict(sm_scale=float("nan"))),
        ("impl='cuda'", dict(impl="cuda")),
        ("every dimension must be >= 1, got q (0, 4, 8, 16)", dict(q=q[:0], k=k[:0], v=k[:0])),
        ("kv_lens.dtype=torch.int16", dict(kv_lens=torch.tensor([1, 2], dtype=torch.int16))),
        ("kv_lens must have 1 dimensions", dict(kv_lens=torch.tensor(2))),
        ("k is on meta", dict(k=k.to("meta"), v=k.to("meta"))),
    ]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_nan_input_is_not_hidden(impl):
    """A NaN in q reaches its own output row only; a NaN in a key reaches every row that attends to it."""
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    q[0, 0, 1, 3] = float("nan")
    out = attention(q, k, v, impl=impl)
    assert out[0, 0, 1].isnan().all() and not out[0, 0, [0, 2, 3]].isnan().any() and not out[0, 1].isnan().any()
    k[0, 1, 2, 0] = float("nan")
    out = attention(q, k, v, causal=True, impl=impl)
    assert out[0, 1, 2:].isnan().all() and not out[0, 1, :2].isnan().any()


@pytest.mark.parametrize("message,overrides", _bad_calls(), ids=[m for m, _ in _bad_calls()])
def test_invalid_arguments_raise_a_value_error_naming_them(message, overrides):
    args = dict(q=torch.randn(2, 4, 8, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16)) | overrides
    with pytest.raises(ValueError, match=re.escape(message)):
        attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices_are_rejected():
    with pytest.raises(ValueError, match="k is on cpu"):
        attention(torch.randn(1, 1, 4, 16, device="cuda"), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))


# ---- packed batches (attention_varlen) ---------------------------------------------------------------------------


def offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def packed_float64_oracle(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, sm_scale=None, dropout_keep=None,
                          dropout_p=0.0):
    """float64_oracle on each sequence alone: rows [start, end) of (total, H, D) viewed as (1, H, end - start, D)."""
    pieces = []
    for (q_start, q_end), (k_start, k_end) in zip(itertools.pairwise(cu_seqlens_q.tolist()),
                                                   itertools.pairwise(cu_seqlens_k.tolist())):
        def plane(tensor, start, end):
            return tensor[start:end].transpose(0, 1).unsqueeze(0)

        keep = None if dropout_keep is None else dropout_keep[:, :, q_start:q_end, k_start:k_end]
        out = float64_oracle(plane(q, q_start, q_end), plane(k, k_start, k_end), plane(v, k_start, k_end),
                             causal=causal, sm_scale=sm_scale, dropout_keep=keep, dropout_p=dropout_p)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)


def make_packed_inputs(q_lengths, k_lengths, heads, kv_heads, head_dim, dtype, *, scale=1.0, seed=0):
    """q (total_q, H, D), k and v (total_k, Hkv, D) requiring grad; `scale` multiplies q as in make_inputs."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(rows, h, factor):
        data = torch.randn(rows, h, head_dim, generator=generator, dtype=torch.float64) * factor
        return data.to(DEVICE, dtype).requires_grad_()

    return (tensor(sum(q_lengths), heads, scale), tensor(sum(k_lengths), kv_heads, 1.0),
            tensor(sum(k_lengths), kv_heads, 1.0))


def check_packed_against_oracle(case, impl, poison):
    q, k, v = make_packed_inputs(case["q_lengths"], case["k_lengths"], case["heads"], case["kv_heads"],
                                 case["head_dim"], case["dtype"], scale=case["scale"])
    cu_seqlens_q, cu_seqlens_k = offsets(case["q_lengths"]), offsets(case["k_lengths"])
    # max_seqlen may be any bound above the longest sequence: a larger one only adds idle programs.
    bounds = (max(case["q_lengths"]) + case["slack"], max(case["k_lengths"]) + case["slack"])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(DEVICE, q.dtype)
    options = dict(causal=case["causal"], sm_scale=case["sm_scale"])

    with poisoned_allocations() if poison else contextlib.nullcontext():
        got = run_with_grads(lambda *t: attention_varlen(*t, cu_seqlens_q, cu_seqlens_k, *bounds, **options,
                                                         impl=impl, deterministic=case["deterministic"]),
                             q, k, v, grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = run_with_grads(lambda *t: packed_float64_oracle(*t, cu_seqlens_q, cu_seqlens_k, **options),
                              q64, k64, v64, grad_out.double())
    for name, a, e, unit in zip(("out", "dq", "dk", "dv"), got, expected, (1.0, 1.0, case["scale"], 1.0)):
        assert a.dtype == case["dtype"], name
        assert_close(a, e, case["dtype"], f"{name} {case}", unit=unit)


@st.composite
def packed_cases(draw, max_length, max_sequences):
    """Sequences of odd lengths, length 1 often; self-attention (k lengths = q lengths) or cross-attention (other
    k lengths, other totals: packed translation pairs, sequence i of the targets on sequence i of the sources)."""
    count = draw(st.integers(1, max_sequences))
    lengths = st.lists(st.one_of(st.just(1), st.integers(1, max_length)), min_size=count, max_size=count)
    q_lengths = draw(lengths)
    kv_heads, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    return dict(
        q_lengths=q_lengths, k_lengths=draw(st.one_of(st.just(q_lengths), lengths)), heads=kv_heads * group,
        kv_heads=kv_heads, head_dim=draw(st.sampled_from([16, 24, 32, 64])), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 1.0, 30.0])),
        sm_scale=draw(st.sampled_from([None, None, 0.3])), slack=draw(st.sampled_from([0, 0, 1, 40])),
        deterministic=draw(st.booleans()),
    )


def targeted_packed_case(**overrides):
    return dict(q_lengths=[16], k_lengths=[16], heads=1, kv_heads=1, head_dim=16, dtype=torch.float32,
                causal=False, scale=1.0, sm_scale=None, slack=0, deterministic=True) | overrides


@settings(max_examples=15)
@given(case=packed_cases(max_length=100, max_sequences=5))
@example(case=targeted_packed_case(q_lengths=[1, 97, 1, 33, 64], k_lengths=[1, 97, 1, 33, 64], heads=4,
                                   kv_heads=2, head_dim=64, dtype=torch.bfloat16, causal=True, scale=30.0))
@example(case=targeted_packed_case(q_lengths=[45, 3], k_lengths=[7, 80], heads=2, dtype=torch.float16,
                                   causal=True, slack=40, deterministic=False))
# Cross-attention of packed translation pairs: target rows of 8 tokens, [6, 1, 1] and [3, 5], on source rows of 16,
# [2, 9, 5] and [11, 5], each row's last sequence its padding tail (Seq2SeqLM over TranslationBatches(packed=True)).
@example(case=targeted_packed_case(q_lengths=[6, 1, 1, 3, 5], k_lengths=[2, 9, 5, 11, 5], heads=2, slack=2))
def test_triton_packed_kernels_match_float64_reference(case):
    check_packed_against_oracle(case, "triton", poison=True)


@settings(max_examples=40)
@given(case=packed_cases(max_length=300, max_sequences=8))
def test_packed_reference_path_matches_float64_reference(case):
    check_packed_against_oracle(case, "torch", poison=False)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_dropout_forward_and_backward_use_the_same_mask(causal):
    """The kernels draw the entries of dropout_keep_mask(1, H, total_q, total_k) inside the sequences."""
    q_lengths, k_lengths, heads, p = [37, 1, 20], [45, 9, 1], 2, 0.25
    q, k, v = make_packed_inputs(q_lengths, k_lengths, heads, 1, 32, torch.float32)
    cu_seqlens_q, cu_seqlens_k = offsets(q_lengths), offsets(k_lengths)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    with poisoned_allocations():
        got = run_with_grads(lambda *t: attention_varlen(*t, cu_seqlens_q, cu_seqlens_k, 37, 45, causal=causal,
                                                         dropout_p=p, generator=torch.Generator().manual_seed(11),
                                                         impl="triton"), q, k, v, grad_out)
    keep = dropout_keep_mask(1, heads, sum(q_lengths), sum(k_lengths), p,
                             generator=torch.Generator().manual_seed(11), device=DEVICE)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = run_with_grads(lambda *t: packed_float64_oracle(*t, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                               dropout_keep=keep, dropout_p=p),
                              q64, k64, v64, grad_out.double())
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert_close(a, e, torch.float32, name)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_packed_equals_padded_attention_over_the_same_sequences(impl):
    """The packed call and the padded one (kv_lens) agree row for row: packing changes the layout, not the math."""
    lengths, heads = [13, 1, 40, 7], 2
    q, k, v = make_packed_inputs(lengths, lengths, heads, heads, 16, torch.float32)
    packed = attention_varlen(q, k, v, offsets(lengths), offsets(lengths), 40, 40, causal=True, impl=impl)
    padded_rows = [torch.nn.functional.pad(part.transpose(0, 1), (0, 0, 0, 40 - len(part)))
                   for tensor in (q, k, v) for part in tensor.split(lengths)]
    planes = [torch.stack(padded_rows[i * len(lengths):(i + 1) * len(lengths)]) for i in range(3)]
    kv_lens = torch.tensor(lengths, device=DEVICE)
    # Causal and kv_lens hide the padding from every real row: the padded rows' own outputs are not compared.
    padded = attention(*planes, causal=True, kv_lens=kv_lens, impl=impl)
    for part, row, length in zip(packed.split(lengths), padded, lengths):
        torch.testing.assert_close(part, row[:, :length].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_packed_torch_compile_keeps_one_graph():
    q, k, v = make_packed_inputs([5, 16], [5, 16], 2, 1, 16, torch.float32)
    cu_seqlens = offsets([5, 16])

    def packed(*tensors):
        return attention_varlen(*tensors, cu_seqlens, cu_seqlens, 16, 16, causal=True, impl="triton")

    compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")
    got = run_with_grads(compiled, q, k, v, torch.ones_like(q))
    eager = run_with_grads(packed, q, k, v, torch.ones_like(q))
    assert all(torch.equal(a, b) for a, b in zip(got, eager))


def _bad_packed_calls():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    return [
        ("q must have 3 dimensions", dict(q=torch.randn(1, 8, 4, 16))),
        ("k.shape[2]=8: expected the head dim of q, 16", dict(k=torch.randn(8, 2, 8), v=torch.randn(8, 2, 8))),
        ("cu_seqlens_q.dtype=torch.float32", dict(cu_seqlens_q=cu.float())),
        ("cu_seqlens_k has shape (1,)", dict(cu_seqlens_k=cu[:1])),
        ("cu_seqlens_q = [0, 3, 7]: expected offsets increasing from 0 to 8", dict(cu_seqlens_q=cu - cu // 8)),
        ("cu_seqlens_k = [0, 8, 8]: expected offsets increasing from 0 to 8 (the rows of k), every sequence at "
         "least one row", dict(cu_seqlens_k=torch.tensor([0, 8, 8], dtype=torch.int32))),
        ("max_seqlen_q=4: a sequence of cu_seqlens_q has 5 rows", dict(max_seqlen_q=4)),
        ("max_seqlen_k=0: expected an integer >= 1", dict(max_seqlen_k=0)),
        ("max_seqlen_q=5.0", dict(max_seqlen_q=5.0)),
        ("cu_seqlens_k holds 1 sequences, cu_seqlens_q 2", dict(cu_seqlens_k=torch.tensor([0, 8]), max_seqlen_k=8)),
        ("70000 sequences x 4 heads", dict(q=torch.randn(70000, 4, 16), k=torch.randn(70000, 2, 16),
                                           v=torch.randn(70000, 2, 16),
                                           cu_seqlens_q=torch.arange(70001), cu_seqlens_k=torch.arange(70001),
                                           max_seqlen_q=1, max_seqlen_k=1)),
    ]


@pytest.mark.parametrize("message,overrides", _bad_packed_calls(), ids=[m for m, _ in _bad_packed_calls()])
def test_invalid_packed_arguments_raise_a_value_error_naming_them(message, overrides):
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    args = dict(q=torch.randn(8, 4, 16), k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16), cu_seqlens_q=cu,
                cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5) | overrides
    with pytest.raises(ValueError, match=re.escape(message)):
        attention_varlen(**args)


# Split-key decoding (split_key_attention): forward only, so no gradients; the one-pass kernel is a second oracle.


@st.composite
def split_key_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    batch = draw(st.integers(1, max(1, 4 // (kv_heads * group))))
    k_len = draw(st.one_of(st.sampled_from([1, 16, 33, 129]), st.integers(1, 100)))
    # Lengths far below k_len leave whole splits with no key.
    kv_lens = draw(st.one_of(st.none(), st.lists(st.one_of(st.just(0), st.integers(0, 5), st.just(k_len),
                                                           st.integers(0, k_len)), min_size=batch, max_size=batch)))
    return dict(batch=batch, heads=kv_heads * group, kv_heads=kv_heads, q_len=draw(st.sampled_from([1, 1, 2, 5, 17])),
                k_len=k_len, head_dim=draw(st.sampled_from([16, 24, 64])), dtype=draw(st.sampled_from(DTYPES)),
                causal=draw(st.booleans()), kv_lens=kv_lens, scale=draw(st.sampled_from([1.0, 30.0])),
                sm_scale=None, transposed=draw(st.booleans()),
                # 1 (no split) up to more splits than the interpreter's 16-key blocks, or the heuristic's choice.
                splits=draw(st.sampled_from([None, 1, 2, 3, 7, 16])))


@settings(max_examples=12)
@given(case=split_key_cases())
@example(case=targeted_case(batch=2, heads=4, kv_heads=2, q_len=1, k_len=129, head_dim=64, dtype=torch.bfloat16,
                            kv_lens=[3, 129], splits=8))
@example(case=targeted_case(q_len=5, k_len=40, dtype=torch.float16, causal=True, kv_lens=[0], splits=3))
# Whole key blocks past the first rows' diagonal: the causal mask must hold inside a split.
@example(case=targeted_case(batch=2, q_len=17, k_len=50, causal=True, kv_lens=[50, 40], splits=1))
def test_split_key_attention_matches_float64_reference_and_the_one_pass_kernel(case):
    q, k, v = make_inputs(case["batch"], case["heads"], case["kv_heads"], case["q_len"], case["k_len"],
                          case["head_dim"], case["dtype"], scale=case["scale"], transposed=case["transposed"])
    kv_lens = None if case["kv_lens"] is None else torch.tensor(case["kv_lens"], device=DEVICE)
    options = dict(causal=case["causal"], kv_lens=kv_lens, sm_scale=case["sm_scale"])
    with torch.no_grad():
        with poisoned_allocations():
            got = attention_kernels.split_key_attention(q, k, v, **options, splits=case["splits"], impl="triton")
        one_pass = attention(q, k, v, **options, impl="triton")
        expected = float64_oracle(q, k, v, **options)
    assert got.dtype == case["dtype"]
    assert_close(got, expected, case["dtype"], f"split-key {case}")
    assert_close(got, one_pass.double(), case["dtype"], f"split-key against one-pass {case}")


def test_split_key_attention_refuses_gradients_and_bad_split_counts():
    q, k, v = make_inputs(1, 2, 1, 1, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="forward-only"):
        attention_kernels.split_key_attention(q, k, v, impl="torch")
    for splits in (0, -1, 2.0, True):
        with torch.no_grad(), pytest.raises(ValueError, match=re.escape(f"splits={splits!r}")):
            attention_kernels.split_key_attention(q, k, v, splits=splits, impl="torch")


@pytest.mark.skipif(DEVICE != "cuda", reason="attention() takes the split-key path on CUDA only")
def test_attention_decodes_long_contexts_by_split_keys_on_cuda(monkeypatch):
    calls = []
    split_key_forward = attention_kernels._split_key_forward_op
    monkeypatch.setattr(attention_kernels, "_split_key_forward_op", lambda *a: calls.append(a) or split_key_forward(*a))
    q, k, v = make_inputs(1, 2, 1, 1, 4096, 64, torch.bfloat16)
    with torch.no_grad():
        out = attention(q, k, v)
        assert len(calls) == 1 and calls[0][-1] > 1, "no grad, one query row, 4096 keys: split"
        assert_close(out, float64_oracle(q, k, v), torch.bfloat16, "attention by split keys")
    attention(q, k, v)
    assert len(calls) == 1, "with gradients: the one-pass kernel"


@pytest.mark.parametrize("programs,k_len,expected", [
    (1, 100, 1),            # short context: no split
    (1, 4096, 16),          # one sequence x head, 4096 keys: 16 splits of 256
    (1, 1 << 20, 264),      # capped at two waves of 132 SMs
    (64, 8192, 5),          # 64 programs: ceil(264 / 64) splits
    (264, 1 << 20, 1),      # two waves already: no split
])
def test_split_count_fills_the_gpu_with_splits_of_at_least_the_minimum_keys(programs, k_len, expected):
    assert attention_kernels.split_count(programs, k_len, sm_count=132) == expected


@pytest.fixture
def dispatch_as_on_hopper(monkeypatch):
    """attention() dispatching as on an sm_90 GPU, also for CPU tensors under the interpreter: the TMA forward
    wherever tma_forward_applies. Returns the list of its decisions."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < attention_kernels.TMA_MIN_CAPABILITY:
        pytest.skip("this GPU has no TMA")
    decisions = []

    def loads_by_tma(q, k, v, kv_lens, packed):
        decisions.append(attention_kernels.tma_forward_applies(q, k, v, kv_lens, packed, (9, 0)))
        return decisions[-1]

    monkeypatch.setattr(attention_kernels, "_loads_by_tma", loads_by_tma)
    return decisions


@pytest.mark.parametrize("case", [
    # Query and key lengths off the blocks, grouped heads.
    targeted_case(heads=2, kv_heads=1, q_len=40, k_len=70, head_dim=64, dtype=torch.float16),
    # (B, N, H, D) storage; rows before the diagonal see no key.
    targeted_case(heads=2, q_len=33, k_len=20, head_dim=128, dtype=torch.bfloat16, causal=True, transposed=True),
    targeted_case(q_len=1, k_len=50, head_dim=64, dtype=torch.float16, causal=True, scale=30.0),  # decoding
])
def test_tma_forward_matches_float64_reference(case, dispatch_as_on_hopper):
    check_against_oracle(case, "triton", poison=True)  # the backward reads the TMA forward's LSE
    assert dispatch_as_on_hopper == [True]


def test_tma_forward_reads_no_key_past_the_last(dispatch_as_on_hopper):
    """k and v are the first 37 rows of buffers whose further rows are NaN: a key tile that reaches past them
    without the copy engine's zero fill poisons the output."""
    q, k, v = (t.detach() for t in make_inputs(1, 2, 1, 20, 37, 64, torch.bfloat16))
    nan_rows = torch.full((1, 1, 27, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    k_rows, v_rows = (torch.cat([t, nan_rows], dim=2)[:, :, :37] for t in (k, v))
    with torch.no_grad():
        out = attention(q, k_rows, v_rows, impl="triton")
    assert dispatch_as_on_hopper == [True]
    assert_close(out, float64_oracle(q, k, v), torch.bfloat16, "TMA forward beside NaN rows")


def test_tma_forward_applies_on_hopper_to_dense_16_bit_tensors_tma_can_copy(monkeypatch):
    def tensors(dtype=torch.bfloat16, head_dim=64, row_width=None):
        """q, k, v (B, H, N, head_dim), each the first head_dim columns of rows of `row_width` when given."""
        return [torch.zeros(2, 4, 8, row_width or head_dim, dtype=dtype)[..., :head_dim] for _ in range(3)]

    def applies(qkv, kv_lens=None, packed=None, capability=(9, 0)):
        return attention_kernels.tma_forward_applies(*qkv, kv_lens, packed, capability)

    aligned = tensors()
    assert applies(aligned) and applies(aligned, capability=(10, 0))
    assert applies(tensors(torch.float16, 128)) and applies(tensors(row_width=72))  # 144-byte rows
    assert not applies(aligned, capability=(8, 9))
    assert not applies(aligned, kv_lens=torch.tensor([8, 8]))
    assert not applies(aligned, packed=attention_kernels.Packed(torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8))
    assert not any(applies(tensors(*other)) for other in [(torch.float32, 64), (torch.half, 80), (torch.half, 256)])
    assert not applies(tensors(row_width=68))  # 136-byte rows
    misaligned_start = torch.zeros(2 * 4 * 8 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 8, 64)
    assert not applies([misaligned_start, *aligned[1:]])
    assert not applies([aligned[0], aligned[1].transpose(-1, -2).contiguous().transpose(-1, -2), aligned[2]])
    # Off CUDA attention() never takes it, whatever the tensors, enabled or not (by default it is not: it has never
    # run on a GPU).
    assert attention_kernels.tma_enabled == (os.environ.get("FASTLM_ATTENTION_TMA") == "1")
    for enabled in (False, True):
        monkeypatch.setattr(attention_kernels, "tma_enabled", enabled)
        assert not attention_kernels._loads_by_tma(*aligned, None, None)
    assert attention_kernels.forward_path(*aligned, impl="triton") == "pointer"
    assert attention_kernels.forward_path(*aligned) == "reference"


# Compiled for an H100/H200 by Triton's own compiler (front end, PTX, ptxas), run nowhere: in a session without a
# GPU the interpreter runs the kernels as Python, and only this catches what the compiler alone rejects.
COMPILE_FOR_SM90 = """
import itertools, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastlm.kernels.attention
kernels = sys.modules["fastlm.kernels.attention"]
types = {"LSE": "*fp32", "DELTA": "*fp32", "PARTIAL_OUT": "*fp32", "PARTIAL_MAX": "*fp32", "PARTIAL_SUM": "*fp32",
         "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32", "KV_LENS": "*i32",
         "SEED": "*i64", "qk_scale": "fp32", "sm_scale": "fp32", "dropout_p": "fp32", "dropout_scale": "fp32"}
tensors = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
padded_only = [(kernels._split_key_partial_kernel, False, {}), (kernels._split_key_combine_kernel, False, {})]
# The forward loading through TMA descriptors: the dense case it serves, at both its head dims; without dropout,
# which the pointer forward compiles and which would triple the time of these compiles.
tma = [(kernels._forward_kernel, False, dict(USE_TMA=True, HAS_KV_LENS=False, DROPOUT=False, BLOCK_D=head_dim))
       for head_dim in kernels.TMA_HEAD_DIMS]
for kernel, varlen, overrides in [*((kernel, varlen, {}) for kernel, varlen in itertools.product(
        (kernels._forward_kernel, kernels._query_block_grads_kernel, kernels._key_block_grads_kernel), (False, True))),
        *padded_only, *tma]:
    constants = dict(CAUSAL=True, HAS_KV_LENS=not varlen, VARLEN=varlen, DROPOUT=True, UPCAST=False,
                     DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, ACCUMULATE_DQ=True, USE_TMA=False)
    constants |= overrides
    constants |= {name: None for name in ("CU_SEQLENS_Q", "CU_SEQLENS_K") if not varlen}
    constants |= {"KV_LENS": None} if varlen else {}
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    signature = {name: "constexpr" if name in constants else "*bf16" if name in tensors else types.get(name, "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=2))
    assert compiled.asm["cubin"], kernel.__name__
    # Descriptors that Triton quietly lowered to pointer loads would compile as well: the PTX must copy by TMA.
    assert not overrides.get("USE_TMA") or "cp.async.bulk.tensor" in compiled.asm["ptx"], kernel.__name__
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="a GPU runs the compiled kernels in the tests above")
def test_the_padded_packed_split_key_and_tma_kernels_compile_for_sm90():
    import subprocess

    pytest.importorskip("triton.backends.nvidia")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True,
                            env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
