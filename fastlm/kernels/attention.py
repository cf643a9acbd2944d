"""Fused softmax attention: Triton forward and backward kernels, their launchers, the torch custom op with its
autograd, and the plain-torch reference path.

    o = softmax(q k^T * sm_scale + mask) v        q: (B, H, Nq, D)   k, v: (B, Hkv, Nk, D)   H % Hkv == 0

Query head h reads key/value head h // (H // Hkv) (grouped-query / multi-query attention). The causal mask is
aligned to the bottom right: query i sees key j iff j <= i + Nk - Nq, so prefill and KV-cache decoding (Nq = 1)
are one call. `kv_lens[b]` keys are valid in sequence b. A query row that sees no key outputs zeros.

`attention_varlen` takes packed batches in flash-attn's varlen layout: q (total_q, H, D), k and v (total_k, Hkv, D),
the sequences back to back with their offsets in `cu_seqlens_q/k`; each sequence attends within itself only, so a
batch of sentences of many lengths costs no padding. The same kernels serve it, viewed as B = 1 with the N axis cut
into sequences (the VARLEN flag; see the host launchers for the grid).

The forward is FlashAttention-2's online softmax in base 2 (log2(e) folded into the scale so the loop uses exp2):
per query block it keeps the running row max, row sum and an fp32 accumulator, and saves the row's log-sum-exp
(base 2, +inf for rows that see no key) for the backward. The backward is deterministic: one kernel owns each
key block and sums dK, dV over its queries (and over the query heads of its group), another owns each query
block and sums dQ over its keys; nothing is added atomically. `deterministic=False` instead adds dQ atomically
from the key-block kernel, saving the second pass at the price of bitwise reproducibility.

On Hopper (sm_90+) the one-pass forward loads its q, k, v tiles through TMA tensor descriptors (the USE_TMA flag
of the same kernel) where `tma_forward_applies`; `forward_path` names the forward `attention` takes.

`split_key_attention` (flash-decoding) is a forward-only path for KV-cache decoding: the keys are also cut into
ranges attended in parallel, whose partial results a second kernel combines; `attention` takes it on CUDA when
`split_count` says it pays and no gradient is needed.

Dropout draws keep/drop from Philox keyed by a per-call seed, counter = (batch*H + head, query, key): the
backward regenerates exactly the forward's mask; `dropout_keep_mask` returns it for tests and debugging.
"""

import contextvars
import itertools
import math
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import (
    check_same_device,
    check_tensor,
    debug_checks_enabled,
    dot_precision,
    next_power_of_2,
    select_impl,
    tuning_configs,
    upcast_under_interpreter,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2_E = 1.4426950408889634


# Arguments the tuned kernels take only for the autotuner's key: never read, so Triton need not specialise on them.
_TUNING_ONLY_ARGS = ["Q_BUCKET", "K_BUCKET"]


def _tuning_buckets(q_len: int, k_len: int) -> dict:
    """The lengths as the autotuner sees them: rounded up to a power of two, so that a new length re-tunes only when
    it enters a new bucket (padding to multiples of 8, cross-attention's source x target pairs and KV-cache decoding,
    whose Nk grows by one per token, would otherwise tune at almost every call). Every config is valid for every
    length of its bucket: the kernels mask rows and keys beyond Nq and Nk."""
    return {"Q_BUCKET": next_power_of_2(q_len), "K_BUCKET": next_power_of_2(k_len)}


# ----------------------------------------------------------------------------------------------------------------
# Triton device functions shared by the kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols, UPCAST: tl.constexpr):
    """Load base[rows, cols] (zeros outside n_rows x n_cols), in fp32 when the interpreter cannot do bf16."""
    tile = tl.load(
        base + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _tile_source(base, n_rows, n_cols, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """What _load_rows reads tiles of base[:n_rows, :n_cols] from: with USE_TMA a tensor descriptor, so that
    Hopper's copy engine (TMA) fetches each tile asynchronously and zero-fills what lies outside; else the pointer."""
    if USE_TMA:
        source = tl.make_tensor_descriptor(base, shape=[n_rows, n_cols], strides=[stride_row, 1],
                                           block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        source = base
    return source


@triton.jit
def _load_rows(source, first_row, rows, cols, stride_row, stride_col, n_rows, n_cols, UPCAST: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Rows `rows` (first_row onwards) of a _tile_source, as _load_tile loads them."""
    if USE_TMA:
        tile = source.load([first_row, 0])
        if UPCAST:
            tile = tile.to(tl.float32)
    else:
        tile = _load_tile(source, rows, cols, stride_row, stride_col, n_rows, n_cols, UPCAST)
    return tile


@triton.jit
def _store_tile(base, tile, rows, cols, stride_row, stride_col, n_rows, n_cols):
    tl.store(
        base + rows[:, None] * stride_row + cols[None, :] * stride_col,
        tile.to(base.dtype.element_ty),
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
    )


@triton.jit
def _query_block_program(H, group_size, BLOCK_M: tl.constexpr):
    """What a program of a query-block grid (query block, sequence x head) works on."""
    start_m = tl.program_id(0) * BLOCK_M
    sequence_head = tl.program_id(1)
    head = sequence_head % H
    return start_m, sequence_head // H, head, head // group_size, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, sequence, Nq, Nk, VARLEN: tl.constexpr):
    """(batch, first query row, query rows, first key row, key rows) of sequence `sequence`. Padded layout: the
    whole of batch `sequence`. Packed (VARLEN): rows cu_seqlens[sequence] : cu_seqlens[sequence + 1] of batch 0.
    First rows are 64-bit: a packed batch's row x stride can pass 2^31 elements."""
    if VARLEN:
        first_query = tl.load(CU_SEQLENS_Q + sequence).to(tl.int64)
        first_key = tl.load(CU_SEQLENS_K + sequence).to(tl.int64)
        query_rows = tl.load(CU_SEQLENS_Q + sequence + 1) - first_query
        key_rows = tl.load(CU_SEQLENS_K + sequence + 1) - first_key
        return sequence * 0, first_query, query_rows, first_key, key_rows
    else:
        return sequence, 0, Nq, 0, Nk


@triton.jit
def _head_start(base, batch, head, first_row, stride_batch, stride_head, stride_row):
    """Pointer to tensor[batch, head, first_row]; 64-bit, since batch x stride can pass 2^31 elements."""
    return base + batch.to(tl.int64) * stride_batch + head * stride_head + first_row * stride_row


@triton.jit
def _query_block_start(K, V, CU_SEQLENS_Q, CU_SEQLENS_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                       stride_vn, H, Nq, Nk, group_size, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Where a program of a query-block grid works: its first row and rows, its head, batch and (batch, head) plane
    (of LSE and the dropout stream), its sequence's first query row, query rows, first key row and key rows, and
    the start of its key and value heads."""
    start_m, sequence, head, kv_head, offs_m = _query_block_program(H, group_size, BLOCK_M)
    batch, first_query, q_len, first_key, k_len = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, sequence, Nq, Nk, VARLEN)
    K_head = _head_start(K, batch, kv_head, first_key, stride_kb, stride_kh, stride_kn)
    V_head = _head_start(V, batch, kv_head, first_key, stride_vb, stride_vh, stride_vn)
    return start_m, offs_m, head, batch, batch * H + head, first_query, q_len, first_key, k_len, K_head, V_head


@triton.jit
def _valid_key_count(KV_LENS, batch, Nk, HAS_KV_LENS: tl.constexpr):
    if HAS_KV_LENS:
        # Clamped: on a GPU the range of kv_lens is checked only in debug mode, and a bad length must never make a
        # kernel read outside k and v.
        return tl.minimum(tl.maximum(tl.load(KV_LENS + batch).to(tl.int32), 0), Nk)
    else:
        return Nk


@triton.jit
def _visible(query_rows, key_cols, valid_keys, causal_shift, CAUSAL: tl.constexpr):
    """Which (query, key) pairs attend: key < valid_keys and, when causal, key <= query + causal_shift."""
    visible = key_cols < valid_keys
    if CAUSAL:
        visible = visible & (key_cols <= query_rows + causal_shift)
    return visible


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    seed = 0  # unused without dropout, when SEED is None
    if DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _dropout_keep(seed, batch_head, query_rows, key_cols, Nq, Nk, dropout_p):
    """Keep (True) or drop each (query, key) pair: one Philox draw per pair, the same in forward and backward.
    Rows and columns count from the start of the (batch, head) plane, Nq x Nk: a packed batch draws the entries
    of one Nq x Nk matrix that fall inside its sequences, which dropout_keep_mask returns whole."""
    counter = (batch_head.to(tl.int64) * Nq + query_rows) * Nk + key_cols
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _key_blocks(start_m, valid_keys, causal_shift, q_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """Key range of the query block starting at start_m: blocks in [0, unmasked_end) are wholly visible,
    [unmasked_end, end) need the mask, keys >= end are seen by no row of the block and are skipped."""
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, q_len) - 1
        end = tl.minimum(valid_keys, tl.maximum(last_row + causal_shift + 1, 0))
        unmasked_end = tl.minimum(valid_keys, tl.maximum(start_m + causal_shift + 1, 0))
    else:
        end = valid_keys
        unmasked_end = valid_keys
    # A block of no rows (past the end of a short sequence of a packed batch, whose grid spans the longest one)
    # visits no key.
    end = tl.where(start_m < q_len, end, 0)
    unmasked_end = tl.minimum(unmasked_end, end)
    return (unmasked_end // BLOCK_N) * BLOCK_N, end


@triton.jit
def _query_blocks(start_n, valid_keys, causal_shift, q_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """Query range of the key block starting at start_n: [begin, masked_end) need the mask, [masked_end, end) see
    the whole block, rows before begin see none of it. A block wholly past valid_keys gets an empty range."""
    end = tl.where(start_n < valid_keys, q_len, 0)
    if CAUSAL:
        first_row = tl.maximum(start_n - causal_shift, 0)
        begin = tl.minimum((first_row // BLOCK_M) * BLOCK_M, end)
        first_full_row = tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0)
        masked_end = tl.minimum(tl.cdiv(first_full_row, BLOCK_M) * BLOCK_M, end)
    else:
        begin = 0
        masked_end = 0
    # A block that crosses valid_keys has padding columns: every query block needs the mask.
    masked_end = tl.where(start_n + BLOCK_N > valid_keys, end, masked_end)
    return begin, masked_end, end


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _finite_shift(row_max):
    """What exp2's argument is shifted by: the row max, or 0 for a row that has seen only masked keys (max -inf),
    so that exp2 gives 0 there rather than NaN."""
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _forward_step(acc, row_sum, row_max, q, K_tiles, V_tiles, stride_kn, stride_kd, stride_vn, stride_vd,
                  start_n, offs_m, offs_d, valid_keys, causal_shift, D, qk_scale, seed, batch_head, first_query,
                  first_key, Nq, Nk, dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                  USE_TMA: tl.constexpr):
    """Fold one key block into the running (acc, row_sum, row_max) of the online softmax. K_tiles, V_tiles: the
    head's keys and values as _tile_source gives them (TMA descriptors with USE_TMA, else pointers)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K_tiles, start_n, offs_n, offs_d, stride_kn, stride_kd, valid_keys, D, UPCAST, USE_TMA)
    v = _load_rows(V_tiles, start_n, offs_n, offs_d, stride_vn, stride_vd, valid_keys, D, UPCAST, USE_TMA)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
    if MASKED:
        visible = _visible(offs_m[:, None], offs_n[None, :], valid_keys, causal_shift, CAUSAL)
        scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    shift = _finite_shift(new_max)
    probs = tl.math.exp2(scores - shift[:, None])
    rescale = tl.math.exp2(row_max - shift)
    row_sum = row_sum * rescale + tl.sum(probs, 1)  # the softmax denominator counts dropped keys too
    if DROPOUT:
        keep = _dropout_keep(seed, batch_head, first_query + offs_m[:, None], first_key + offs_n[None, :], Nq, Nk,
                             dropout_p)
        probs = tl.where(keep, probs, 0.0)  # the 1 / (1 - p) rescale is applied once, at the end
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, row_sum, new_max


@triton.jit(do_not_specialize=_TUNING_ONLY_ARGS)
def _forward_kernel(
    Q, K, V, O, LSE, KV_LENS, CU_SEQLENS_Q, CU_SEQLENS_K, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Nq, Nk, D, group_size, qk_scale, dropout_p, dropout_scale, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr,
):
    """USE_TMA: the q, k and v tiles come through TMA descriptors, one per (sequence, head) whose rows end at q_len
    or at the valid keys, so that the copy engine's zero fill is the pointer path's mask (the launcher checks TMA's
    alignment rules: tma_forward_applies). The rest of the kernel is the same."""
    start_m, offs_m, head, batch, batch_head, first_query, q_len, first_key, k_len, K_head, V_head = \
        _query_block_start(K, V, CU_SEQLENS_Q, CU_SEQLENS_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                           stride_vn, H, Nq, Nk, group_size, VARLEN, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q_head = _head_start(Q, batch, head, first_query, stride_qb, stride_qh, stride_qm)
    seed = _dropout_seed(SEED, DROPOUT)

    q_tiles = _tile_source(Q_head, q_len, D, stride_qm, BLOCK_M, BLOCK_D, USE_TMA)
    q = _load_rows(q_tiles, start_m, offs_m, offs_d, stride_qm, stride_qd, q_len, D, UPCAST, USE_TMA)
    valid_keys = _valid_key_count(KV_LENS, batch, k_len, HAS_KV_LENS)
    K_tiles = _tile_source(K_head, valid_keys, D, stride_kn, BLOCK_N, BLOCK_D, USE_TMA)
    V_tiles = _tile_source(V_head, valid_keys, D, stride_vn, BLOCK_N, BLOCK_D, USE_TMA)
    causal_shift = k_len - q_len
    unmasked_end, end = _key_blocks(start_m, valid_keys, causal_shift, q_len, BLOCK_M, BLOCK_N, CAUSAL)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, row_sum, row_max = _forward_step(
            acc, row_sum, row_max, q, K_tiles, V_tiles, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
            offs_d, valid_keys, causal_shift, D, qk_scale, seed, batch_head, first_query, first_key, Nq, Nk,
            dropout_p, False, CAUSAL, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, USE_TMA)
    for start_n in range(unmasked_end, end, BLOCK_N):
        acc, row_sum, row_max = _forward_step(
            acc, row_sum, row_max, q, K_tiles, V_tiles, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
            offs_d, valid_keys, causal_shift, D, qk_scale, seed, batch_head, first_query, first_key, Nq, Nk,
            dropout_p, True, CAUSAL, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, USE_TMA)

    sees_keys = row_sum > 0.0
    out = acc * (dropout_scale / tl.where(sees_keys, row_sum, 1.0))[:, None]
    O_head = _head_start(O, batch, head, first_query, stride_ob, stride_oh, stride_om)
    _store_tile(O_head, out, offs_m, offs_d, stride_om, stride_od, q_len, D)
    # +inf for rows that see no key: the backward's exp2(score - lse) is then 0 there, never NaN.
    lse = tl.where(sees_keys, row_max + tl.math.log2(tl.where(sees_keys, row_sum, 1.0)), float("inf"))
    tl.store(LSE + batch_head.to(tl.int64) * Nq + first_query + offs_m, lse, mask=offs_m < q_len)


def _gpu_configs(shapes: Sequence[Tuple[int, int, int, int]]) -> list:
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages): a short curated list, since every candidate costs a
    compile on the first call of each new shape."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in shapes]


def _fits_shared_memory(config: triton.Config, block_d: int, outer_block: str, inner_block: str,
                        resident_tiles: int) -> bool:
    """Rough shared memory of the resident outer tiles plus two pipelined inner tiles (k and v, or q and dO) per
    stage, in 16-bit elements, against the ~227 KiB one block may use on an H100/H200."""
    outer = resident_tiles * config.kwargs[outer_block] * block_d
    inner = 2 * config.num_stages * config.kwargs[inner_block] * block_d
    return 2 * (outer + inner) <= 200 * 1024


def _prune_configs(outer_block: str, inner_block: str, resident_tiles: int, rows_arg: str):
    """Drop configs that cannot fit in shared memory, and size the outer block to tiny row counts (decoding)."""

    def prune(configs, named_args, **kwargs):
        block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D"))
        fitting = [c for c in configs if _fits_shared_memory(c, block_d, outer_block, inner_block, resident_tiles)]
        small = [c for c in fitting if c.kwargs[outer_block] <= 16]
        if named_args.get(rows_arg, kwargs.get(rows_arg)) <= 16 and small:
            return small
        return [c for c in fitting if c.kwargs[outer_block] > 16] or fitting or configs[-1:]

    return prune


_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})  # unequal blocks exercise the range logic
# The tuner also keys on the dtype of every tensor argument (Triton adds those itself).
_TUNING_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "CAUSAL", "HAS_KV_LENS", "VARLEN", "DROPOUT", "DOT_PRECISION"]

# The last three suit head dim 64 on Hopper, where a tile holds half the bytes it does at 128: key blocks of 128 with
# 3 stages (shared memory lets them through at d <= 64 only) and a 4-stage pipeline of 64-key blocks (d <= 128).
_FORWARD_GPU_CONFIGS = _gpu_configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 4),
                                     (64, 64, 4, 3), (64, 32, 4, 4), (16, 64, 4, 3), (16, 128, 4, 2),
                                     (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)])
_prune_forward = _prune_configs("BLOCK_M", "BLOCK_N", 1, "Q_BUCKET")

_forward = triton.autotune(
    configs=tuning_configs(_FORWARD_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=[*_TUNING_KEY, "USE_TMA"],
    prune_configs_by={"early_config_prune": _prune_forward},
)(_forward_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Split-key forward for decoding (flash-decoding)
# ----------------------------------------------------------------------------------------------------------------
# The forward above gives each program all the keys of one (query block, sequence x head). Decoding has one query
# row per sequence, so it launches batch x heads programs: at long contexts and small batches most of the GPU's SMs
# sit idle while each program walks thousands of keys. Here the keys are cut into `splits` ranges as well: a
# partial kernel runs the same online softmax over one range and saves its unnormalised output, row max and row
# sum; a combine kernel rescales the partials to their common max and normalises. Forward only (no LSE saved, no
# dropout): the inference path.


@triton.jit(do_not_specialize=_TUNING_ONLY_ARGS)
def _split_key_partial_kernel(
    Q, K, V, PARTIAL_OUT, PARTIAL_MAX, PARTIAL_SUM, KV_LENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, Nq, Nk, D, group_size, qk_scale, keys_per_split, splits, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(acc, row max, row sum) of one query block over keys [split * keys_per_split, + keys_per_split)."""
    start_m, batch, head, kv_head, offs_m = _query_block_program(H, group_size, BLOCK_M)
    split = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_head_start(Q, batch, head, 0, stride_qb, stride_qh, stride_qm), offs_m, offs_d, stride_qm,
                   stride_qd, Nq, D, UPCAST)
    K_head = _head_start(K, batch, kv_head, 0, stride_kb, stride_kh, stride_kn)
    V_head = _head_start(V, batch, kv_head, 0, stride_vb, stride_vh, stride_vn)
    valid_keys = _valid_key_count(KV_LENS, batch, Nk, HAS_KV_LENS)
    causal_shift = Nk - Nq
    unmasked_end, end = _key_blocks(start_m, valid_keys, causal_shift, Nq, BLOCK_M, BLOCK_N, CAUSAL)
    # The split's keys that some row sees; empty (last <= first) for a split past them, which then saves
    # max -inf and sum 0. Split bounds need not fall on blocks: `last` bounds the loads and the mask.
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, end)
    unmasked_last = first + (tl.maximum(tl.minimum(last, unmasked_end) - first, 0) // BLOCK_N) * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(first, unmasked_last, BLOCK_N):
        acc, row_sum, row_max = _forward_step(
            acc, row_sum, row_max, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
            offs_d, last, causal_shift, D, qk_scale, 0, 0, 0, 0, Nq, Nk, 0.0, False, CAUSAL, False, UPCAST,
            DOT_PRECISION, BLOCK_N, False)
    for start_n in range(unmasked_last, last, BLOCK_N):
        acc, row_sum, row_max = _forward_step(
            acc, row_sum, row_max, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
            offs_d, last, causal_shift, D, qk_scale, 0, 0, 0, 0, Nq, Nk, 0.0, True, CAUSAL, False, UPCAST,
            DOT_PRECISION, BLOCK_N, False)

    # Partials are (B * H, splits, Nq) rows, each of D values for the output.
    rows = ((batch * H + head).to(tl.int64) * splits + split) * Nq
    tl.store(PARTIAL_MAX + rows + offs_m, row_max, mask=offs_m < Nq)
    tl.store(PARTIAL_SUM + rows + offs_m, row_sum, mask=offs_m < Nq)
    _store_tile(PARTIAL_OUT + rows * D, acc, offs_m, offs_d, D, 1, Nq, D)


@triton.jit
def _split_key_combine_kernel(PARTIAL_OUT, PARTIAL_MAX, PARTIAL_SUM, O, stride_ob, stride_oh, stride_om, stride_od,
                              H, Nq, D, splits, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """softmax(all keys) v from the partials: each rescaled by exp2(its max - the common max), summed, normalised."""
    _, batch, head, _, offs_m = _query_block_program(H, 1, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(0, splits):
        rows = ((batch * H + head).to(tl.int64) * splits + split) * Nq
        split_max = tl.load(PARTIAL_MAX + rows + offs_m, mask=offs_m < Nq, other=float("-inf"))
        split_sum = tl.load(PARTIAL_SUM + rows + offs_m, mask=offs_m < Nq, other=0.0)
        split_out = _load_tile(PARTIAL_OUT + rows * D, offs_m, offs_d, D, 1, Nq, D, False)
        new_max = tl.maximum(row_max, split_max)
        shift = _finite_shift(new_max)
        rescale, split_scale = tl.math.exp2(row_max - shift), tl.math.exp2(split_max - shift)
        row_sum = row_sum * rescale + split_sum * split_scale
        acc = acc * rescale[:, None] + split_out * split_scale[:, None]
        row_max = new_max
    out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]  # rows that see no key: zeros
    _store_tile(_head_start(O, batch, head, 0, stride_ob, stride_oh, stride_om), out, offs_m, offs_d, stride_om,
                stride_od, Nq, D)


# One query row per sequence is the case this path is for: every config holds 16 query rows (the smallest tl.dot
# tile), and only the key block and pipelining vary.
SPLIT_KEY_BLOCK_M = 16
_split_key_partial = triton.autotune(
    configs=tuning_configs(_gpu_configs([(16, 64, 4, 3), (16, 128, 4, 2), (16, 32, 4, 4)]),
                           triton.Config({"BLOCK_M": SPLIT_KEY_BLOCK_M, "BLOCK_N": 16})),
    key=["Q_BUCKET", "K_BUCKET", "BLOCK_D", "CAUSAL", "HAS_KV_LENS", "DOT_PRECISION", "splits"],
)(_split_key_partial_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_dot_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                    stride_dob, stride_doh, stride_dom, stride_dod, H, Nq, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O): the softmax backward's correction term, computed once rather than per key block."""
    # Row by row, blind to sequences: a packed batch is one plane of Nq rows here.
    _, batch, head, _, offs_m = _query_block_program(H, 1, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(_head_start(O, batch, head, 0, stride_ob, stride_oh, stride_om), offs_m, offs_d, stride_om,
                   stride_od, Nq, D, True)
    do = _load_tile(_head_start(DO, batch, head, 0, stride_dob, stride_doh, stride_dom), offs_m, offs_d, stride_dom,
                    stride_dod, Nq, D, True)
    tl.store(DELTA + (batch * H + head).to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _key_block_grads_step(dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head,
                          stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
                          start_m, offs_n, offs_d, q_len, valid_keys, causal_shift, D, qk_scale, sm_scale, seed,
                          batch_head, first_query, first_key, Nq, Nk, dropout_p, dropout_scale, MASKED: tl.constexpr,
                          CAUSAL: tl.constexpr,
                          DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ACCUMULATE_DQ: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Add one query block's share of dK and dV (tiles transposed: keys along rows, queries along columns)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q_head, offs_m, offs_d, stride_qm, stride_qd, q_len, D, UPCAST)
    do = _load_tile(DO_head, offs_m, offs_d, stride_dom, stride_dod, q_len, D, UPCAST)
    # Rows past q_len get lse = +inf, hence probability 0.
    lse = tl.load(LSE_head + offs_m, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA_head + offs_m, mask=offs_m < q_len, other=0.0)
    scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    if MASKED:  # masked before exp2: a hidden score may exceed the row's lse and overflow
        visible = _visible(offs_m[None, :], offs_n[:, None], valid_keys, causal_shift, CAUSAL)
        scores_t = tl.where(visible, scores_t, float("-inf"))
    probs_t = tl.math.exp2(scores_t - lse[None, :])
    dprobs_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep_t = _dropout_keep(seed, batch_head, first_query + offs_m[None, :], first_key + offs_n[:, None], Nq, Nk,
                               dropout_p)
        dropped_probs_t = tl.where(keep_t, probs_t * dropout_scale, 0.0)
        dprobs_t = tl.where(keep_t, dprobs_t * dropout_scale, 0.0)
    else:
        dropped_probs_t = probs_t
    dv += tl.dot(dropped_probs_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dscores_t = probs_t * (dprobs_t - delta[None, :])
    dk += tl.dot(dscores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    if ACCUMULATE_DQ:
        dq = tl.dot(tl.trans(dscores_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
        tl.atomic_add(DQ_head + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                      mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D))
    return dk, dv


@triton.jit(do_not_specialize=_TUNING_ONLY_ARGS)
def _key_block_grads_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KV_LENS, CU_SEQLENS_Q, CU_SEQLENS_K, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Hkv, Nq, Nk, D, group_size, qk_scale, sm_scale, dropout_p, dropout_scale, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, ACCUMULATE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block, summed over every query head of its group: one writer per element, no atomics."""
    start_n = tl.program_id(0) * BLOCK_N
    sequence_kv_head = tl.program_id(1)
    kv_head = sequence_kv_head % Hkv
    batch, first_query, q_len, first_key, k_len = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, sequence_kv_head // Hkv,
                                                            Nq, Nk, VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    seed = _dropout_seed(SEED, DROPOUT)

    valid_keys = _valid_key_count(KV_LENS, batch, k_len, HAS_KV_LENS)
    k = _load_tile(_head_start(K, batch, kv_head, first_key, stride_kb, stride_kh, stride_kn), offs_n, offs_d,
                   stride_kn, stride_kd, valid_keys, D, UPCAST)
    v = _load_tile(_head_start(V, batch, kv_head, first_key, stride_vb, stride_vh, stride_vn), offs_n, offs_d,
                   stride_vn, stride_vd, valid_keys, D, UPCAST)
    causal_shift = k_len - q_len
    begin, masked_end, end = _query_blocks(start_n, valid_keys, causal_shift, q_len, BLOCK_M, BLOCK_N, CAUSAL)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for head in range(kv_head * group_size, (kv_head + 1) * group_size):
        batch_head = batch * H + head
        Q_head = _head_start(Q, batch, head, first_query, stride_qb, stride_qh, stride_qm)
        DO_head = _head_start(DO, batch, head, first_query, stride_dob, stride_doh, stride_dom)
        DQ_head = _head_start(DQ, batch, head, first_query, stride_dqb, stride_dqh, stride_dqm)
        LSE_head = LSE + batch_head.to(tl.int64) * Nq + first_query
        DELTA_head = DELTA + batch_head.to(tl.int64) * Nq + first_query
        for start_m in range(begin, masked_end, BLOCK_M):
            dk, dv = _key_block_grads_step(
                dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, stride_qm, stride_qd, stride_dom,
                stride_dod, stride_dqm, stride_dqd, start_m, offs_n, offs_d, q_len, valid_keys, causal_shift, D,
                qk_scale, sm_scale, seed, batch_head, first_query, first_key, Nq, Nk, dropout_p, dropout_scale,
                True, CAUSAL, DROPOUT, UPCAST, ACCUMULATE_DQ, DOT_PRECISION, BLOCK_M)
        for start_m in range(masked_end, end, BLOCK_M):
            dk, dv = _key_block_grads_step(
                dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, stride_qm, stride_qd, stride_dom,
                stride_dod, stride_dqm, stride_dqd, start_m, offs_n, offs_d, q_len, valid_keys, causal_shift, D,
                qk_scale, sm_scale, seed, batch_head, first_query, first_key, Nq, Nk, dropout_p, dropout_scale,
                False, CAUSAL, DROPOUT, UPCAST, ACCUMULATE_DQ, DOT_PRECISION, BLOCK_M)

    _store_tile(_head_start(DK, batch, kv_head, first_key, stride_dkb, stride_dkh, stride_dkn), dk * sm_scale,
                offs_n, offs_d, stride_dkn, stride_dkd, k_len, D)
    _store_tile(_head_start(DV, batch, kv_head, first_key, stride_dvb, stride_dvh, stride_dvn), dv, offs_n, offs_d,
                stride_dvn, stride_dvd, k_len, D)


@triton.jit
def _query_block_grads_step(dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                            start_n, offs_m, offs_d, valid_keys, causal_shift, D, qk_scale, seed, batch_head,
                            first_query, first_key, Nq, Nk, dropout_p, dropout_scale, MASKED: tl.constexpr,
                            CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add one key block's share of dQ."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K_head, offs_n, offs_d, stride_kn, stride_kd, valid_keys, D, UPCAST)
    v = _load_tile(V_head, offs_n, offs_d, stride_vn, stride_vd, valid_keys, D, UPCAST)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:  # masked before exp2: a hidden score may exceed the row's lse and overflow
        scores = tl.where(_visible(offs_m[:, None], offs_n[None, :], valid_keys, causal_shift, CAUSAL), scores,
                          float("-inf"))
    probs = tl.math.exp2(scores - lse[:, None])
    dprobs = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, batch_head, first_query + offs_m[:, None], first_key + offs_n[None, :], Nq, Nk,
                             dropout_p)
        dprobs = tl.where(keep, dprobs * dropout_scale, 0.0)
    dscores = probs * (dprobs - delta[:, None])
    return dq + tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=_TUNING_ONLY_ARGS)
def _query_block_grads_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LENS, CU_SEQLENS_Q, CU_SEQLENS_K, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Nq, Nk, D, group_size, qk_scale, sm_scale, dropout_p, dropout_scale, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of one query block: walks the same key blocks as the forward."""
    start_m, offs_m, head, batch, batch_head, first_query, q_len, first_key, k_len, K_head, V_head = \
        _query_block_start(K, V, CU_SEQLENS_Q, CU_SEQLENS_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                           stride_vn, H, Nq, Nk, group_size, VARLEN, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    seed = _dropout_seed(SEED, DROPOUT)

    q = _load_tile(_head_start(Q, batch, head, first_query, stride_qb, stride_qh, stride_qm), offs_m, offs_d,
                   stride_qm, stride_qd, q_len, D, UPCAST)
    do = _load_tile(_head_start(DO, batch, head, first_query, stride_dob, stride_doh, stride_dom), offs_m, offs_d,
                    stride_dom, stride_dod, q_len, D, UPCAST)
    row_stats = batch_head.to(tl.int64) * Nq + first_query + offs_m
    lse = tl.load(LSE + row_stats, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + row_stats, mask=offs_m < q_len, other=0.0)
    valid_keys = _valid_key_count(KV_LENS, batch, k_len, HAS_KV_LENS)
    causal_shift = k_len - q_len
    unmasked_end, end = _key_blocks(start_m, valid_keys, causal_shift, q_len, BLOCK_M, BLOCK_N, CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, unmasked_end, BLOCK_N):
        dq = _query_block_grads_step(
            dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
            offs_d, valid_keys, causal_shift, D, qk_scale, seed, batch_head, first_query, first_key, Nq, Nk,
            dropout_p, dropout_scale, False, CAUSAL, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N)
    for start_n in range(unmasked_end, end, BLOCK_N):
        dq = _query_block_grads_step(
            dq, q, do, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
            offs_d, valid_keys, causal_shift, D, qk_scale, seed, batch_head, first_query, first_key, Nq, Nk,
            dropout_p, dropout_scale, True, CAUSAL, DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N)
    _store_tile(_head_start(DQ, batch, head, first_query, stride_dqb, stride_dqh, stride_dqm), dq * sm_scale,
                offs_m, offs_d, stride_dqm, stride_dqd, q_len, D)


# Key-block kernels: BLOCK_N keys stay resident while BLOCK_M query rows stream past. The last two are for head dim
# 64, as in the forward: query blocks of 128 with 3 stages (d <= 64 only) and one more stage for (64, 128).
_KEY_BLOCK_GPU_CONFIGS = _gpu_configs([(64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 2), (32, 64, 4, 3),
                                       (32, 32, 4, 1), (128, 128, 8, 3), (64, 128, 8, 3)])
_prune_key_block = _prune_configs("BLOCK_N", "BLOCK_M", 2, "K_BUCKET")

_key_block_grads = triton.autotune(
    configs=tuning_configs(_KEY_BLOCK_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_key_block},
)(_key_block_grads_kernel)

# The same kernel adding dQ atomically: autotuning reruns it, so the dQ buffer must be zeroed before each trial.
_key_block_grads_accumulating_dq = triton.autotune(
    configs=tuning_configs(_KEY_BLOCK_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_key_block},
    reset_to_zero=["DQ"],
)(_key_block_grads_kernel)

# The last two are for head dim 64: key blocks of 128 with 3 stages (d <= 64 only) and one more stage for (128, 64).
_QUERY_BLOCK_GPU_CONFIGS = _gpu_configs([(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                                         (128, 128, 8, 3), (128, 64, 8, 3)])
_prune_query_block = _prune_configs("BLOCK_M", "BLOCK_N", 2, "Q_BUCKET")

_query_block_grads = triton.autotune(
    configs=tuning_configs(_QUERY_BLOCK_GPU_CONFIGS, _INTERPRETER_CONFIG),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_query_block},
)(_query_block_grads_kernel)


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, Nq, Nk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch_head = tl.program_id(2)
    keep = _dropout_keep(tl.load(SEED), batch_head, offs_m[:, None], offs_n[None, :], Nq, Nk, dropout_p)
    tl.store(KEEP + (batch_head.to(tl.int64) * Nq + offs_m[:, None]) * Nk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))


# ----------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------
# The launchers take the (B, H, N, D) layout. A packed batch comes as B = 1 with `cu_seqlens` cutting the N axis into
# sequences (Packed, below). The grid then runs over (query or key block, sequence x head) and is sized by the
# longest sequence, so programs past the end of a shorter one find no rows and stop after a few loads. A flat grid
# of the blocks that exist, each program looking up its (sequence, block), would launch no idle program, but its
# table must be built per batch: on the device (a prefix sum over the sequences, one more launch) or on the host
# (a sync to read cu_seqlens). Packed rows of short sentences leave few idle programs, and one grid serves both
# layouts, the sequence being one constexpr branch (_sequence) away from the padded batch.


class Packed(NamedTuple):
    """Where the sequences of a packed batch lie on the N axis: sequence s holds query rows
    cu_seqlens_q[s] : cu_seqlens_q[s + 1] and key rows cu_seqlens_k[s] : cu_seqlens_k[s + 1]; max_seqlen_q/k bound
    their lengths (host integers, as in flash-attn: reading them from cu_seqlens would cost a host sync)."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _grid_extent(q: torch.Tensor, k: torch.Tensor, packed: Optional[Packed]) -> Tuple[int, int, int]:
    """(sequences, longest query sequence, longest key sequence): what the grid spans."""
    if packed is None:
        return q.shape[0], q.shape[2], k.shape[2]
    return packed.cu_seqlens_q.shape[0] - 1, packed.max_seqlen_q, packed.max_seqlen_k


def _common_meta(q: torch.Tensor, k: torch.Tensor, kv_lens: Optional[torch.Tensor], packed: Optional[Packed],
                 causal: bool, dropout_p: float) -> dict:
    """Compile-time flags and scalars every tuned kernel of one call shares, with the tuning buckets."""
    _, longest_q, longest_k = _grid_extent(q, k, packed)
    return dict(
        **_tuning_buckets(longest_q, longest_k),
        CAUSAL=causal,
        HAS_KV_LENS=kv_lens is not None,
        VARLEN=packed is not None,
        DROPOUT=dropout_p > 0.0,
        UPCAST=upcast_under_interpreter(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=next_power_of_2(q.shape[-1], minimum=16),
    )


# Where the one-pass forward loads through TMA: on Hopper or later, in the case it was written and compiled for (dense:
# no kv_lens, not packed; 16-bit; the head dims of the common models) and where TMA can copy the tensors.
TMA_DTYPES = (torch.float16, torch.bfloat16)
TMA_HEAD_DIMS = (64, 128)
TMA_MIN_CAPABILITY = (9, 0)  # Hopper
# The TMA forward is compiled for sm_90 and checked under the interpreter, but it has never run on a GPU: until a GPU
# run has shown it correct and fast there, attention() takes it only when asked, by FASTLM_ATTENTION_TMA=1 in the
# environment or by setting this flag (the benchmarks time both paths).
tma_enabled = os.environ.get("FASTLM_ATTENTION_TMA") == "1"


def _tma_can_copy(tensor: torch.Tensor) -> bool:
    """TMA's rules for a tensor it copies tiles of: a 16-byte aligned start and strides, a contiguous last dim."""
    return (tensor.stride(-1) == 1 and tensor.data_ptr() % 16 == 0
            and all(stride * tensor.element_size() % 16 == 0 for stride in tensor.stride()[:-1]))


def tma_forward_applies(q, k, v, kv_lens: Optional[torch.Tensor], packed: Optional[Packed],
                        capability: Tuple[int, int]) -> bool:
    """Whether the one-pass forward loads its q, k, v tiles through TMA on a GPU of compute `capability`."""
    return (tuple(capability) >= TMA_MIN_CAPABILITY and kv_lens is None and packed is None
            and q.dtype in TMA_DTYPES and q.shape[-1] in TMA_HEAD_DIMS and all(map(_tma_can_copy, (q, k, v))))


def _loads_by_tma(q, k, v, kv_lens: Optional[torch.Tensor], packed: Optional[Packed]) -> bool:
    """tma_forward_applies for these tensors' own GPU, where the TMA forward is enabled; never off CUDA."""
    return tma_enabled and q.is_cuda and tma_forward_applies(q, k, v, kv_lens, packed, torch.cuda.get_device_capability(q.device))


def _run_with_tma_scratch(device: torch.device, launch) -> None:
    """Run `launch` where Triton can allocate the global scratch it builds device-side TMA descriptors in; inside a
    copy of the caller's context, so that an allocator the caller set stays theirs."""

    def allocate(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)  # torch's blocks are 512-byte aligned

    def run() -> None:
        triton.set_allocator(allocate)
        launch()

    contextvars.copy_context().run(run)


def _launch_forward(q, k, v, kv_lens, packed: Optional[Packed], seed, causal: bool, sm_scale: float,
                    dropout_p: float):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    sequences, longest_q, _ = _grid_extent(q, k, packed)
    cu_seqlens_q, cu_seqlens_k = packed[:2] if packed is not None else (None, None)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32)
    use_tma = _loads_by_tma(q, k, v, kv_lens, packed)
    grid = lambda meta: (triton.cdiv(longest_q, meta["BLOCK_M"]), sequences * heads)  # noqa: E731

    def launch() -> None:
        _forward[grid](
            q, k, v, out, lse, kv_lens, cu_seqlens_q, cu_seqlens_k, seed,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, q_len, k_len, head_dim, heads // kv_heads, sm_scale * LOG2_E, dropout_p, 1.0 / (1.0 - dropout_p),
            USE_TMA=use_tma, **_common_meta(q, k, kv_lens, packed, causal, dropout_p),
        )

    if use_tma:
        _run_with_tma_scratch(q.device, launch)
    else:
        launch()
    return out, lse


def _launch_backward(grad_out, q, k, v, out, lse, kv_lens, packed: Optional[Packed], seed, causal: bool,
                     sm_scale: float, dropout_p: float, deterministic: bool):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    sequences, longest_q, longest_k = _grid_extent(q, k, packed)
    cu_seqlens_q, cu_seqlens_k = packed[:2] if packed is not None else (None, None)
    meta = _common_meta(q, k, kv_lens, packed, causal, dropout_p)
    delta = torch.empty_like(lse)
    _row_dot_kernel[(triton.cdiv(q_len, 32), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, q_len, head_dim,
        BLOCK_M=32, BLOCK_D=meta["BLOCK_D"],
    )
    grad_k = torch.empty_like(k)
    grad_v = torch.empty_like(v)
    # Non-deterministic mode adds dQ atomically in fp32, so it needs a zeroed fp32 buffer.
    grad_q = torch.empty_like(q) if deterministic else torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    scalars = (sm_scale * LOG2_E, sm_scale, dropout_p, 1.0 / (1.0 - dropout_p))
    key_kernel = _key_block_grads if deterministic else _key_block_grads_accumulating_dq
    key_kernel[lambda m: (triton.cdiv(longest_k, m["BLOCK_N"]), sequences * kv_heads)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, grad_q, kv_lens, cu_seqlens_q, cu_seqlens_k, seed,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_k.stride(), *grad_v.stride(),
        *grad_q.stride(), heads, kv_heads, q_len, k_len, head_dim, heads // kv_heads, *scalars,
        ACCUMULATE_DQ=not deterministic, **meta,
    )
    if not deterministic:
        return grad_q.to(q.dtype), grad_k, grad_v
    _query_block_grads[lambda m: (triton.cdiv(longest_q, m["BLOCK_M"]), sequences * heads)](
        q, k, v, grad_out, lse, delta, grad_q, kv_lens, cu_seqlens_q, cu_seqlens_k, seed,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *grad_q.stride(),
        heads, q_len, k_len, head_dim, heads // kv_heads, *scalars, **meta,
    )
    return grad_q, grad_k, grad_v


# Untuned guesses (no GPU has measured them): enough programs for about two waves of an H100/H200's 132 SMs, and
# splits no shorter than a few key blocks, below which the partials cost more to write and combine than they save.
ASSUMED_SM_COUNT = 132
MIN_KEYS_PER_SPLIT = 256
# Longer queries fill the GPU with query blocks: the one-pass forward serves them.
MAX_SPLIT_KEY_QUERIES = SPLIT_KEY_BLOCK_M


def split_count(programs: int, k_len: int, sm_count: int = ASSUMED_SM_COUNT) -> int:
    """How many key ranges the split-key forward cuts Nk into when the one-pass forward would launch `programs`
    (query blocks x batch x heads): 1 (no split) once those fill two waves of `sm_count` SMs or Nk is short;
    otherwise enough to, each split keeping at least MIN_KEYS_PER_SPLIT keys. A heuristic, not yet measured."""
    return max(1, min(triton.cdiv(2 * sm_count, programs), k_len // MIN_KEYS_PER_SPLIT))


def _launch_split_key_forward(q, k, v, kv_lens, causal: bool, sm_scale: float, splits: int) -> torch.Tensor:
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    meta = _common_meta(q, k, kv_lens, None, causal, 0.0)
    # The partials, fp32 whatever the inputs: one (acc, max, sum) per (sequence x head, split, query row).
    partial_out = torch.empty((batch * heads, splits, q_len, head_dim), device=q.device, dtype=torch.float32)
    partial_max = torch.empty((batch * heads, splits, q_len), device=q.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    query_blocks = triton.cdiv(q_len, SPLIT_KEY_BLOCK_M)
    _split_key_partial[(query_blocks, batch * heads, splits)](
        q, k, v, partial_out, partial_max, partial_sum, kv_lens, *q.stride(), *k.stride(), *v.stride(),
        heads, q_len, k_len, head_dim, heads // kv_heads, sm_scale * LOG2_E, triton.cdiv(k_len, splits), splits,
        Q_BUCKET=meta["Q_BUCKET"], K_BUCKET=meta["K_BUCKET"], CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
        UPCAST=meta["UPCAST"], DOT_PRECISION=meta["DOT_PRECISION"], BLOCK_D=meta["BLOCK_D"],
    )
    out = torch.empty_like(q)
    _split_key_combine_kernel[(query_blocks, batch * heads)](
        partial_out, partial_max, partial_sum, out, *out.stride(), heads, q_len, head_dim, splits,
        BLOCK_M=SPLIT_KEY_BLOCK_M, BLOCK_D=meta["BLOCK_D"],
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# The custom op (torch.compile sees one opaque node) and its autograd
# ----------------------------------------------------------------------------------------------------------------
# Signatures use typing.Optional/Tuple, not `X | None` / `tuple[...]`: torch 2.4's schema inference reads only those.
# A custom op takes tensors and scalars, not a Packed: its four fields travel one by one (None / 0 when padded).


def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> Optional[Packed]:
    return None if cu_seqlens_q is None else Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor],
                          cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                          max_seqlen_q: int, max_seqlen_k: int, seed: Optional[torch.Tensor], causal: bool,
                          sm_scale: float, dropout_p: float,
                          deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # `deterministic` does not change the forward: it is an input only so the backward can read it.
    packed = _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _launch_forward(q, k, v, kv_lens, packed, seed, causal, sm_scale, dropout_p)


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, kv_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                            sm_scale, dropout_p, deterministic):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, kv_lens: Optional[torch.Tensor],
                           cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                           max_seqlen_q: int, max_seqlen_k: int, seed: Optional[torch.Tensor], causal: bool,
                           sm_scale: float, dropout_p: float,
                           deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _launch_backward(grad_out, q, k, v, out, lse, kv_lens, packed, seed, causal, sm_scale, dropout_p,
                            deterministic)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, kv_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, seed, causal, sm_scale, dropout_p, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, *flags = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.flags = flags  # causal, sm_scale, dropout_p, deterministic


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, kv_lens, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_backward_op(grad_out, q, k, v, out, lse, kv_lens, cu_seqlens_q, cu_seqlens_k,
                                                    *ctx.max_seqlens, seed, *ctx.flags)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None, None, None


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


# Forward only: no autograd is registered, so the public function refuses inputs that require grad.
@torch.library.custom_op("fastlm::attention_split_key_fwd", mutates_args=())
def _split_key_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor],
                          causal: bool, sm_scale: float, splits: int) -> torch.Tensor:
    return _launch_split_key_forward(q, k, v, kv_lens, causal, sm_scale, splits)


@_split_key_forward_op.register_fake
def _split_key_forward_fake(q, k, v, kv_lens, causal, sm_scale, splits):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------------------------------------------
# The reference path and the public API
# ----------------------------------------------------------------------------------------------------------------


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                        kv_lens: Optional[torch.Tensor], sm_scale: float,
                        dropout_keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        packed: Optional[Packed] = None) -> torch.Tensor:
    """Plain-torch attention with the kernel's semantics, differentiable by autograd; computes in at least fp32.

    `dropout_keep` (bool, (B, H, Nq, Nk)) are the kept attention weights, rescaled by 1 / (1 - dropout_p).
    `packed`: B = 1 and each sequence attends within itself, computed one sequence at a time (the offsets are read
    on the host: a reference, not a kernel).
    """
    if packed is not None:
        pieces = []
        for (q_start, q_end), (k_start, k_end) in zip(itertools.pairwise(packed.cu_seqlens_q.tolist()),
                                                       itertools.pairwise(packed.cu_seqlens_k.tolist())):
            keep = None if dropout_keep is None else dropout_keep[:, :, q_start:q_end, k_start:k_end]
            pieces.append(attention_reference(
                q[:, :, q_start:q_end], k[:, :, k_start:k_end], v[:, :, k_start:k_end], causal=causal,
                kv_lens=None, sm_scale=sm_scale, dropout_keep=keep, dropout_p=dropout_p))
        return torch.cat(pieces, dim=2)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    compute = torch.promote_types(q.dtype, torch.float32)
    # Query heads grouped under their key/value head, so k and v broadcast instead of being repeated.
    queries = q.to(compute).reshape(batch, kv_heads, group, q_len, head_dim)
    keys = k.to(compute).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    values = v.to(compute).unsqueeze(2)
    scores = queries @ keys.transpose(-1, -2) * sm_scale  # (B, Hkv, G, Nq, Nk)

    key_index = torch.arange(k_len, device=q.device)
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device)
    if causal:
        query_index = torch.arange(q_len, device=q.device)
        visible = key_index[None, :] <= query_index[:, None] + (k_len - q_len)
    visible = visible.expand(batch, 1, 1, q_len, k_len)
    if kv_lens is not None:
        visible = visible & (key_index < kv_lens.view(batch, 1, 1, 1, 1))
    scores = scores.masked_fill(~visible, float("-inf"))

    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)  # rows that see no key: exp gives 0, not NaN
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(row_sum > 0, row_sum, 1.0)
    if dropout_keep is not None:
        probs = probs * dropout_keep.view(batch, kv_heads, group, q_len, k_len) / (1.0 - dropout_p)
    return (probs @ values).reshape(batch, heads, q_len, head_dim).to(q.dtype)


def _validate_qkv(q, k, v, ndim: int, sm_scale, dropout_p) -> None:
    """The checks both layouts share: (B, H, N, D) tensors when ndim = 4, packed (N, H, D) ones when ndim = 3."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=ndim, dtypes=SUPPORTED_DTYPES)
    check_same_device("q", q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"every dimension must be >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads != 0:
        raise ValueError(f"k.shape[1]={kv_heads}: expected a divisor of the number of query heads, {heads}")
    last = ndim - 1
    if k.shape[last] != q.shape[last]:
        raise ValueError(f"k.shape[{last}]={k.shape[last]}: expected the head dim of q, {q.shape[last]}")
    if q.shape[last] > MAX_HEAD_DIM:
        raise ValueError(f"q.shape[{last}]={q.shape[last]}: head dims up to {MAX_HEAD_DIM} are supported")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p={dropout_p!r}: expected a number in [0, 1)")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale={sm_scale!r}: expected a finite number or None")


def _values_checked(tensor: torch.Tensor) -> bool:
    """Reading GPU values costs a host sync (and breaks a torch.compile graph), so there only in debug mode; the
    kernels clamp what they read anyway."""
    return not (tensor.is_cuda or torch.compiler.is_compiling()) or debug_checks_enabled()


def _validate(q, k, v, kv_lens, sm_scale, dropout_p) -> None:
    _validate_qkv(q, k, v, 4, sm_scale, dropout_p)
    if kv_lens is not None:
        check_tensor("kv_lens", kv_lens, ndim=1, dtypes=(torch.int32, torch.int64))
        check_same_device("q", q, kv_lens=kv_lens)
    batch, k_len = q.shape[0], k.shape[2]
    if k.shape[0] != batch:
        raise ValueError(f"k.shape[0]={k.shape[0]}: expected the batch size of q, {batch}")
    if kv_lens is not None:
        if kv_lens.shape[0] != batch:
            raise ValueError(f"kv_lens.shape={tuple(kv_lens.shape)}: expected ({batch},), one length per sequence")
        if _values_checked(kv_lens):
            low, high = int(kv_lens.min()), int(kv_lens.max())
            if low < 0 or high > k_len:
                raise ValueError(f"kv_lens has values in [{low}, {high}]: expected lengths in [0, {k_len}]")


# CUDA launches at most 65535 programs along the grid's second axis, sequences x heads for a packed batch.
MAX_SEQUENCES_X_HEADS = 65535


def _validate_packed(q, k, v, packed: Packed, sm_scale, dropout_p) -> None:
    _validate_qkv(q, k, v, 3, sm_scale, dropout_p)
    offsets = (("cu_seqlens_q", packed.cu_seqlens_q, "max_seqlen_q", packed.max_seqlen_q, q),
               ("cu_seqlens_k", packed.cu_seqlens_k, "max_seqlen_k", packed.max_seqlen_k, k))
    for name, cu_seqlens, max_name, max_seqlen, rows in offsets:
        check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        check_same_device("q", q, **{name: cu_seqlens})
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"{name} has shape {tuple(cu_seqlens.shape)}: expected (n + 1,) offsets of n >= 1 "
                             "sequences")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"{max_name}={max_seqlen!r}: expected an integer >= 1")
        if _values_checked(cu_seqlens):
            bounds, lengths = cu_seqlens[[0, -1]].tolist(), cu_seqlens.diff()
            if bounds != [0, rows.shape[0]] or int(lengths.min()) < 1:
                raise ValueError(f"{name} = {cu_seqlens.tolist()}: expected offsets increasing from 0 to "
                                 f"{rows.shape[0]} (the rows of {name[-1]}), every sequence at least one row")
            if int(lengths.max()) > max_seqlen:
                raise ValueError(f"{max_name}={max_seqlen}: a sequence of {name} has {int(lengths.max())} rows")
    sequences = packed.cu_seqlens_q.shape[0] - 1
    if packed.cu_seqlens_k.shape[0] - 1 != sequences:
        raise ValueError(f"cu_seqlens_k holds {packed.cu_seqlens_k.shape[0] - 1} sequences, cu_seqlens_q "
                         f"{sequences}: expected one key sequence per query sequence")
    if sequences * q.shape[1] > MAX_SEQUENCES_X_HEADS:
        raise ValueError(f"{sequences} sequences x {q.shape[1]} heads: expected at most {MAX_SEQUENCES_X_HEADS} "
                         "(the grid's second axis); split the batch")


def _draw_dropout_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One Philox key per call, from `generator` or torch's default generator of `device`: no host sync."""
    seed_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=seed_device, generator=generator)
    return seed.to(device)


def dropout_keep_mask(batch: int, heads: int, q_len: int, k_len: int, dropout_p: float, *,
                      generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bool (B, H, Nq, Nk) keep mask the Triton kernels use when `generator` is in the same state as at the
    `attention` call: for tests and debugging. A packed call (`attention_varlen`) uses the entries of
    dropout_keep_mask(1, H, total_q, total_k) that lie within its sequences."""
    seed = _draw_dropout_seed(generator, torch.device(device))
    keep = torch.empty((batch, heads, q_len, k_len), dtype=torch.int8, device=device)
    block = 32
    _dropout_mask_kernel[(triton.cdiv(q_len, block), triton.cdiv(k_len, block), batch * heads)](
        keep, seed, q_len, k_len, dropout_p, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _default_splits(q: torch.Tensor, k: torch.Tensor) -> int:
    """split_count for these tensors, with the SM count of their GPU (ASSUMED_SM_COUNT off a GPU)."""
    programs = triton.cdiv(q.shape[2], SPLIT_KEY_BLOCK_M) * q.shape[0] * q.shape[1]
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else ASSUMED_SM_COUNT
    return split_count(programs, k.shape[2], sm_count)


def _automatic_splits(q, k, v, packed: Optional[Packed], dropout_p: float) -> int:
    """How many key ranges `attention` cuts these inputs into by itself: more than one only on CUDA, for a few
    query rows without gradients or dropout, where split_count says it pays."""
    if not q.is_cuda or packed is not None or dropout_p > 0.0 or _needs_grad(q, k, v):
        return 1
    return _default_splits(q, k) if q.shape[2] <= MAX_SPLIT_KEY_QUERIES else 1


def forward_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_lens: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, impl: str = "auto") -> str:
    """Which forward `attention` runs on these inputs, for benchmarks and debugging: "reference" (the plain-torch
    path), "split-key" (split_key_attention's kernels), "tma" or "pointer" (the one-pass kernel, loading its tiles
    through TMA descriptors or by pointers)."""
    if select_impl(impl, q, k, v) == "torch":
        return "reference"
    if _automatic_splits(q, k, v, None, dropout_p) > 1:
        return "split-key"
    return "tma" if _loads_by_tma(q, k, v, kv_lens, None) else "pointer"


def _attend(q, k, v, kv_lens, packed: Optional[Packed], *, causal: bool, sm_scale: Optional[float],
            dropout_p: float, generator: Optional[torch.Generator], impl: str, deterministic: bool) -> torch.Tensor:
    """Both public functions past their checks, in the (B, H, N, D) layout."""
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dropout_p = float(dropout_p)
    if select_impl(impl, q, k, v) == "torch":
        dropout_keep = None
        if dropout_p > 0.0:
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            seed_device = generator.device if generator is not None else q.device
            dropout_keep = (torch.rand(shape, device=seed_device, generator=generator) >= dropout_p).to(q.device)
        return attention_reference(q, k, v, causal=causal, kv_lens=kv_lens, sm_scale=sm_scale,
                                   dropout_keep=dropout_keep, dropout_p=dropout_p, packed=packed)
    splits = _automatic_splits(q, k, v, packed, dropout_p)
    if splits > 1:
        return _split_key_forward_op(q, k, v, kv_lens, causal, sm_scale, splits)
    seed = _draw_dropout_seed(generator, q.device) if dropout_p > 0.0 else None
    out, _ = _attention_forward_op(q, k, v, kv_lens, *(packed or (None, None, 0, 0)), seed, causal, sm_scale,
                                   dropout_p, deterministic)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              kv_lens: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None, dropout_p: float = 0.0,
              generator: Optional[torch.Generator] = None, impl: str = "auto",
              deterministic: bool = True) -> torch.Tensor:
    """Softmax attention, the drop-in of `F.scaled_dot_product_attention` for the layout (B, H, N, D).

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H % Hkv == 0; fp16, bf16 or fp32 (fp32 accumulation); D <= 256.
    causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned). kv_lens: int (B,), valid keys per sequence.
    sm_scale: defaults to 1 / sqrt(D). dropout_p: attention dropout, its mask drawn from `generator`.
    impl: "auto" | "triton" | "torch" (see fastlm.kernels.utils). deterministic: bitwise-reproducible gradients;
    False adds dQ atomically instead (one backward pass fewer).
    Returns (B, H, Nq, D); rows that see no key are zeros, with zero gradient.
    Differences from SDPA: every dimension must be >= 1 (SDPA returns an empty tensor for B, H or Nq = 0; here it is
    a ValueError); a row that sees no key gives zeros (SDPA: NaN); kv_lens outside [0, Nk] is a ValueError for CPU
    lengths, while CUDA lengths are clamped unless FASTLM_DEBUG=1 (checking costs a host sync). A NaN in q, k or v
    is not hidden: it reaches the output rows that attend to it, as in SDPA.
    """
    _validate(q, k, v, kv_lens, sm_scale, dropout_p)
    return _attend(q, k, v, kv_lens, None, causal=causal, sm_scale=sm_scale, dropout_p=dropout_p,
                   generator=generator, impl=impl, deterministic=deterministic)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     sm_scale: Optional[float] = None, dropout_p: float = 0.0,
                     generator: Optional[torch.Generator] = None, impl: str = "auto",
                     deterministic: bool = True) -> torch.Tensor:
    """Softmax attention within each sequence of a packed batch, in flash-attn's varlen layout
    (`flash_attn_varlen_func`): no padding, no attention across sequences.

    q: (total_q, H, D); k, v: (total_k, Hkv, D): the sequences back to back. Sequence s holds query rows
    cu_seqlens_q[s] : cu_seqlens_q[s + 1] and key rows cu_seqlens_k[s] : cu_seqlens_k[s + 1] (int32 or int64,
    (n + 1,), increasing from 0 to total, every sequence at least one row; checked for CPU offsets, or with
    FASTLM_DEBUG=1). max_seqlen_q/k: the longest sequence, or any bound above it (a host int: it sizes the grid).
    causal: bottom-right aligned within each sequence (top-left too where q and k lengths agree, self-attention).
    The rest as in `attention`; dropout draws the entries of dropout_keep_mask(1, H, total_q, total_k) inside the
    sequences. Returns (total_q, H, D).
    """
    packed = Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _validate_packed(q, k, v, packed, sm_scale, dropout_p)
    # (total, H, D) -> (1, H, total, D): a view, the kernels take any strides.
    q, k, v = (tensor.transpose(0, 1).unsqueeze(0) for tensor in (q, k, v))
    out = _attend(q, k, v, None, packed, causal=causal, sm_scale=sm_scale, dropout_p=dropout_p,
                  generator=generator, impl=impl, deterministic=deterministic)
    return out[0].transpose(0, 1)


def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        kv_lens: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None,
                        splits: Optional[int] = None, impl: str = "auto") -> torch.Tensor:
    """`attention` without dropout or gradients, its keys cut into `splits` ranges attended in parallel and then
    combined (flash-decoding): for KV-cache decoding, whose few query rows leave most of a GPU idle otherwise.

    `attention` takes this path by itself on CUDA when split_count says it pays (Nq <= MAX_SPLIT_KEY_QUERIES,
    Nk long, few batch x heads, no gradient, no dropout); calling it directly forces it, e.g. in tests and
    benchmarks. Any Nq is computed correctly (causal bottom-right aligned as in `attention`), though only a few
    rows gain. splits: None picks split_count's count; any count >= 1 is valid, splits past the keys (or past
    kv_lens) adding nothing. Raises a ValueError when a gradient would be needed: call it under torch.no_grad().
    """
    _validate(q, k, v, kv_lens, sm_scale, 0.0)
    if _needs_grad(q, k, v):
        raise ValueError("split_key_attention is forward-only, but q, k or v requires grad: call it under "
                         "torch.no_grad() or use attention()")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits={splits!r}: expected an integer >= 1 or None")
    sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if select_impl(impl, q, k, v) == "torch":
        return attention_reference(q, k, v, causal=causal, kv_lens=kv_lens, sm_scale=sm_scale)
    splits = splits or _default_splits(q, k)
    return _split_key_forward_op(q, k, v, kv_lens, causal, sm_scale, splits)
