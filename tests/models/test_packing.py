"""Packed rows: an EncoderLM over sentences packed several to a row (cu_seqlens) computes what it computes over the
same sentences one to a padded row, with every attention implementation and position kind, loss and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import force_triton_kernels, tiny_config

from fastlm.models import EncoderLM
from fastlm.models.packing import Packing


def packed_and_padded(rows: list[list[int]], width: int, vocab_size: int, pad_id: int, seed: int = 0):
    """The sentences of `rows` (their lengths, row by row) as a packed batch (B, width) with cu_seqlens, and as a
    padded batch of one sentence per row; random ids and a random half of the tokens labelled, the same in both."""
    generator = torch.Generator().manual_seed(seed)
    sentences = [(torch.randint(4, vocab_size, (n,), generator=generator),
                  torch.rand(n, generator=generator) < 0.5) for row in rows for n in row]
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    offsets, lengths, sentence = [0], [], iter(sentences)
    for r, row in enumerate(rows):
        column = 0
        for n in row:
            tokens, labelled = next(sentence)
            ids[r, column:column + n] = tokens
            labels[r, column:column + n] = torch.where(labelled, tokens, -100)
            column += n
            offsets.append(r * width + column)
        if column < width:  # the padding tail: a sequence of its own
            offsets.append((r + 1) * width)
        lengths.append(column)
    packed = dict(input_ids=ids, lengths=torch.tensor(lengths), labels=labels,
                  cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
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
