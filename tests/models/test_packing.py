"""Packed rows compute what their sequences compute alone, with every attention implementation and position kind:
an EncoderLM over sentences packed several to a row (cu_seqlens) against one sentence to a padded row, and a
Seq2SeqLM over translation pairs packed several to a pair of rows (src_cu_seqlens, tgt_cu_seqlens) against each
pair alone; loss, logits and gradients."""

import functools
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import force_triton_kernels, tiny_config

from fastlm.models import EncoderLM, Seq2SeqLM
from fastlm.models import blocks as models_blocks
from fastlm.models.kv_cache import KVCache
from fastlm.models.packing import Packing


def pack_rows(rows: list[list[torch.Tensor]], width: int, fill: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1-d tensors of each row back to back in a (B, width) tensor of `fill`: (it, the tokens each row holds,
    cu_seqlens of the tensors and of each row's padding tail, a sequence of its own)."""
    packed = torch.full((len(rows), width), fill, dtype=torch.long)
    offsets, lengths = [0], []
    for r, row in enumerate(rows):
        column = 0
        for tensor in row:
            packed[r, column:column + len(tensor)] = tensor
            column += len(tensor)
            offsets.append(r * width + column)
        if column < width:
            offsets.append((r + 1) * width)
        lengths.append(column)
    return packed, torch.tensor(lengths), torch.tensor(offsets, dtype=torch.int32)


def packed_and_padded(rows: list[list[int]], width: int, vocab_size: int, pad_id: int, seed: int = 0):
    """The sentences of `rows` (their lengths, row by row) as a packed batch (B, width) with cu_seqlens, and as a
    padded batch of one sentence per row; random ids and a random half of the tokens labelled, the same in both."""
    generator = torch.Generator().manual_seed(seed)
    sentence_rows = [[(torch.randint(4, vocab_size, (n,), generator=generator),
                       torch.rand(n, generator=generator) < 0.5) for n in row] for row in rows]
    sentences = [sentence for row in sentence_rows for sentence in row]
    ids, lengths, offsets = pack_rows([[tokens for tokens, _ in row] for row in sentence_rows], width, pad_id)
    labels, _, _ = pack_rows([[torch.where(labelled, tokens, -100) for tokens, labelled in row]
                              for row in sentence_rows], width, -100)
    packed = dict(input_ids=ids, lengths=lengths, labels=labels, cu_seqlens=offsets)
    longest = max(len(tokens) for tokens, _ in sentences)
    padded_ids = torch.full((len(sentences), longest), pad_id)
    padded_labels = torch.full((len(sentences), longest), -100)
    for i, (tokens, labelled) in enumerate(sentences):
        padded_ids[i, :len(tokens)] = tokens
        padded_labels[i, :len(tokens)] = torch.where(labelled, tokens, -100)
    padded = dict(input_ids=padded_ids, lengths=torch.tensor([len(t) for t, _ in sentences]), labels=padded_labels)
    return packed, padded


def loss_and_gradients(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@st.composite
def packings(draw):
    """Rows of 1..4 sentences of 1..20 tokens (length 1 often), each row at most `width` tokens."""
    width = draw(st.sampled_from([24, 40]))
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        row, room = [], width
        for _ in range(draw(st.integers(1, 4))):
            n = draw(st.one_of(st.just(1), st.integers(1, 20)))
            if n <= room:
                row.append(n)
                room -= n
        rows.append(row)
    return rows, width


VARIANTS = [
    dict(attn_impl="sdpa"),
    dict(attn_impl="eager", positional="sinusoidal", n_kv_heads=1),
    dict(attn_impl="sdpa", positional="rope", n_kv_heads=2, norm_position="post"),
]


@settings(max_examples=10)
@given(case=packings(), variant=st.sampled_from(VARIANTS))
def test_packed_rows_compute_what_padded_rows_compute(case, variant):
    rows, width = case
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(n_layers=2, **variant))
    packed, padded = packed_and_padded(rows, width, model.config.vocab_size, model.config.pad_id)
    if not (packed["labels"] != -100).any():
        return
    packed_out, packed_grads = loss_and_gradients(model, packed)
    padded_out, padded_grads = loss_and_gradients(model, padded)
    assert packed_out.n_targets == padded_out.n_targets
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_packed_rows_through_the_triton_kernel(positional, monkeypatch):
    """attn_impl="fastlm" takes the varlen kernel (here interpreted) for packed rows: the same loss and gradients."""
    force_triton_kernels(monkeypatch)
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(n_layers=1, attn_impl="fastlm", positional=positional, n_kv_heads=2))
    packed, padded = packed_and_padded([[7, 1, 13], [20], [2, 2]], 24, model.config.vocab_size, model.config.pad_id)
    packed_out, packed_grads = loss_and_gradients(model, packed)
    padded_out, padded_grads = loss_and_gradients(model, padded)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_positions_restart_and_sequence_ids_follow_the_offsets():
    packing = Packing.from_offsets(torch.tensor([0, 3, 4, 6, 8, 12], dtype=torch.int32), rows=2, width=6)
    assert packing.positions.tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]]
    assert packing.sequence_ids.tolist() == [[0, 0, 0, 1, 2, 2], [3, 3, 4, 4, 4, 4]]
    assert packing.same_sequence().shape == (2, 1, 6, 6)
    assert packing.same_sequence()[0, 0, 0].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("offsets,message", [
    ([1, 4, 8], "cu_seqlens starts at 1: expected 0"),
    ([0, 4, 7], "cu_seqlens ends at 7: expected 8"),
    ([0, 4, 4, 8], "cu_seqlens has 1 steps that do not increase"),
    ([0, 3, 8], "cu_seqlens: 1 rows of input_ids do not start a sequence"),
])
def test_bad_offsets_are_named(offsets, message):
    model = EncoderLM(tiny_config())
    ids = torch.randint(4, 90, (2, 4))
    with pytest.raises(ValueError, match=message):
        model(ids, cu_seqlens=torch.tensor(offsets))
    with pytest.raises(ValueError, match="cu_seqlens of dtype torch.float32"):
        model(ids, cu_seqlens=torch.tensor(offsets, dtype=torch.float32))


@pytest.mark.parametrize("attn_impl", ["fastlm", "sdpa"])
def test_packed_forward_and_loss_compile_into_one_graph(attn_impl, monkeypatch):
    """The offsets become positions and masks on the device: no host sync, no graph break (fastlm: the kernel)."""
    if attn_impl == "fastlm":
        force_triton_kernels(monkeypatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(n_layers=1, d_model=32, n_heads=2, d_ff=64, attn_impl=attn_impl, positional="rope"))
    packed, _ = packed_and_padded([[5, 9], [3, 1, 1]], 16, model.config.vocab_size, model.config.pad_id)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    out = compiled(**packed)
    out.loss.backward()
    torch.testing.assert_close(out.loss, model(**packed).loss)


# ---- packed translation pairs (Seq2SeqLM) ---------------------------------------------------------------------------


def packed_pairs_and_each_alone(rows: list[list[tuple[int, int]]], widths: tuple[int, int], vocab_size: int,
                                pad_id: int, seed: int = 0):
    """The pairs of `rows` ((source length, target length), row by row) as a packed translation batch of rows
    `widths` wide (source, target), every target token labelled as TranslationBatches labels them; and each pair
    alone, as a batch of one row, with where its target lies in the packed batch: (row, first column, end)."""
    generator = torch.Generator().manual_seed(seed)
    pair_rows = [[tuple(torch.randint(4, vocab_size, (n,), generator=generator) for n in pair) for pair in row]
                 for row in rows]
    src_ids, src_lengths, src_offsets = pack_rows([[src for src, _ in row] for row in pair_rows], widths[0], pad_id)
    tgt_ids, tgt_lengths, tgt_offsets = pack_rows([[tgt for _, tgt in row] for row in pair_rows], widths[1], pad_id)
    labels, _, _ = pack_rows([[tgt for _, tgt in row] for row in pair_rows], widths[1], -100)
    packed = dict(src_ids=src_ids, src_lengths=src_lengths, tgt_ids=tgt_ids, tgt_lengths=tgt_lengths, labels=labels,
                  src_cu_seqlens=src_offsets, tgt_cu_seqlens=tgt_offsets)
    alone = []
    for r, row in enumerate(pair_rows):
        column = 0
        for src, tgt in row:
            batch = dict(src_ids=src[None], tgt_ids=tgt[None], labels=tgt[None])
            alone.append(((r, column, column + len(tgt)), batch))
            column += len(tgt)
    return packed, alone


def seq2seq(dtype: torch.dtype, **overrides) -> Seq2SeqLM:
    torch.manual_seed(0)
    config = tiny_config(n_layers=1, d_model=32, n_heads=2, d_ff=64, **overrides)
    return Seq2SeqLM(config, config).to(dtype).eval()


def check_packed_pairs_compute_each_pair_alone(model: Seq2SeqLM, rows, widths, tolerance: float) -> None:
    """Logits of every target token as for its pair alone; loss (the mean over every target) and its gradients
    those of the pairs' losses weighted by their targets."""
    packed, alone = packed_pairs_and_each_alone(rows, widths, model.config.vocab_size, model.config.pad_id)
    logits_close = functools.partial(torch.testing.assert_close, atol=tolerance, rtol=tolerance)
    # linear_cross_entropy takes the mean with 1 / targets in fp32, whatever the dtype: a relative 6e-8.
    close = functools.partial(torch.testing.assert_close, atol=max(tolerance, 1e-6), rtol=max(tolerance, 1e-6))
    model.zero_grad()
    packed_out = model(**packed, return_logits=True)
    packed_out.loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    weighted, targets = 0.0, 0
    for (row, start, end), batch in alone:
        out = model(**batch, return_logits=True)
        logits_close(packed_out.logits[row, start:end], out.logits[0], msg=f"row {row}, targets {start}:{end}")
        weighted, targets = weighted + out.loss * out.n_targets, targets + int(out.n_targets)
    assert int(packed_out.n_targets) == targets
    close(packed_out.loss, weighted / targets)
    (weighted / targets).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            close(packed_grads[name], p.grad, msg=name)


@st.composite
def pair_packings(draw):
    """Rows of 1 to 3 pairs of 1..7 tokens a side (1 often) in rows of two widths, odd and even, each row keeping
    one token of each side for its padding tails (a pair of their own)."""
    widths = draw(st.sampled_from([(9, 16), (23, 8), (16, 17)]))
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        row, rooms = [], [width - 1 for width in widths]
        for _ in range(draw(st.integers(1, 3))):
            pair = tuple(draw(st.one_of(st.just(1), st.integers(1, 7))) for _ in widths)
            if all(n <= room for n, room in zip(pair, rooms)):
                row.append(pair)
                rooms = [room - n for n, room in zip(pair, rooms)]
        rows.append(row)
    return rows, widths


SEQ2SEQ_VARIANTS = [
    dict(attn_impl="sdpa"),
    dict(attn_impl="eager", positional="sinusoidal", n_kv_heads=1),
    dict(attn_impl="sdpa", positional="rope", norm_position="post"),
    dict(attn_impl="eager", positional="rope", n_kv_heads=1),
]


@settings(max_examples=12)
@given(case=pair_packings(), variant=st.sampled_from(SEQ2SEQ_VARIANTS))
def test_packed_pairs_compute_what_each_pair_computes_alone(case, variant):
    """SDPA and eager attention (the CPU's), float64: the block-diagonal masks, cross-attention's included."""
    check_packed_pairs_compute_each_pair_alone(seq2seq(torch.float64, **variant), *case, tolerance=1e-10)


@settings(max_examples=6)
@given(case=pair_packings(), positional=st.sampled_from(["learned", "rope"]))
def test_packed_pairs_through_the_varlen_kernels_reference_path(case, positional):
    """attn_impl="fastlm" on a kernel device takes attention_varlen, here its plain-torch reference (float32: the
    kernels' widest dtype): cross-attention with the target offsets as cu_seqlens_q, the source's as cu_seqlens_k."""
    with mock.patch.object(models_blocks, "KERNEL_DEVICE_TYPES", ("cuda", "cpu")):
        model = seq2seq(torch.float32, attn_impl="fastlm", positional=positional)
        check_packed_pairs_compute_each_pair_alone(model, *case, tolerance=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_packed_pairs_through_the_triton_kernels(positional, monkeypatch):
    """The varlen Triton kernel (interpreted here) for all three attentions of packed pairs, odd lengths."""
    force_triton_kernels(monkeypatch)
    model = seq2seq(torch.float32, attn_impl="fastlm", positional=positional, n_kv_heads=1)
    check_packed_pairs_compute_each_pair_alone(model, [[(3, 5), (1, 1)], [(7, 2)]], (9, 8), tolerance=1e-5)


def test_packed_pairs_that_do_not_pair_up_are_named():
    model = seq2seq(torch.float32)
    rows, widths = [[(3, 2), (1, 1)], [(4, 3)]], (8, 8)
    packed, _ = packed_pairs_and_each_alone(rows, widths, model.config.vocab_size, model.config.pad_id)
    assert torch.isfinite(model(**packed).loss)
    src_offsets = packed["src_cu_seqlens"]
    with pytest.raises(ValueError, match="tgt_cu_seqlens alone: packed pairs need the offsets of both sides"):
        model(**packed | dict(src_cu_seqlens=None))
    with pytest.raises(ValueError, match="src_cu_seqlens holds 4 sequences, tgt_cu_seqlens 5"):
        model(**packed | dict(src_cu_seqlens=src_offsets[[0, 1, 3, 4, 5]]))
    # Rows of 3 and 2 sources against 2 and 3 targets: as many sequences in all, not in each row.
    uneven = torch.tensor([0, 3, 4, 8, 12, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="1 rows start another sequence on the source side than on the target"):
        model(**packed | dict(src_cu_seqlens=torch.tensor([0, 2, 3, 4, 8, 16], dtype=torch.int32),
                              tgt_cu_seqlens=uneven))
    with pytest.raises(ValueError, match="src_cu_seqlens: 1 rows of src_ids do not start a sequence"):
        model(**packed | dict(src_cu_seqlens=torch.tensor([0, 3, 4, 9, 12, 16], dtype=torch.int32)))
    with pytest.raises(ValueError, match="tgt_cu_seqlens ends at 15: expected 16, the tokens of tgt_ids"):
        model(**packed | dict(tgt_cu_seqlens=packed["tgt_cu_seqlens"].clone().index_fill(0, torch.tensor([5]), 15)))


def test_generation_and_half_packed_cross_attention_are_refused():
    model = seq2seq(torch.float32)
    ids, offsets = torch.full((1, 4), 5), torch.tensor([0, 1, 4], dtype=torch.int32)
    memory = model.encode(ids, None, offsets)
    with pytest.raises(ValueError, match="cu_seqlens with a KV cache: packed rows are for training"):
        model.decoder(ids, None, memory=memory, cache=KVCache(8), cu_seqlens=offsets, memory_cu_seqlens=offsets)
    with pytest.raises(ValueError, match="cu_seqlens with a memory but no memory_cu_seqlens"):
        model.decoder(ids, None, memory=memory, cu_seqlens=offsets)
    with pytest.raises(ValueError, match="memory_cu_seqlens without cu_seqlens"):
        model.decoder(ids, None, memory=memory, memory_cu_seqlens=offsets)
