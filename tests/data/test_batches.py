"""Batch sources: contract keys, every item once per epoch, reproducibility, packing, bucketing, token budgets,
truncation, padding fractions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import ByteTokenizer, write_lines
from hypothesis import given
from hypothesis import strategies as st

from fastlm.data import (
    IGNORE_INDEX, CausalLMBatches, MaskedLMBatches, ParallelLines, TranslationBatches, prepare_corpus,
    prepare_parallel_corpus,
)
from fastlm.data.batches import BUCKET_CHUNK, LengthBuckets, PackedRows, padded_width, padding_fraction

TOKENIZER = ByteTokenizer()
PAD, BOS, EOS, MASK = TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.mask_id
KO = [f"{i}번 문장{'은 길다' * (i % 9)}." for i in range(61)]
EN = [f"Sentence {i}{' goes on' * (i % 13)}." for i in range(61)]


@pytest.fixture(scope="module", params=[False, True], ids=["bare", "stored-bos-eos"])
def corpora(request, tmp_path_factory):
    """The same parallel corpus prepared bare and with stored <s> ... </s>: batches must not differ."""
    root = tmp_path_factory.mktemp("corpus")
    pairs = ParallelLines(write_lines(root / "x.ko", KO), write_lines(root / "x.en", EN))
    return prepare_parallel_corpus(pairs, TOKENIZER, root / "prepared", shard_size=16, add_bos_eos=request.param,
                                   progress=False)


def mlm(corpus, **overrides) -> MaskedLMBatches:
    settings = {"batch_size": 8, "max_len": 24, "mask_id": MASK, "vocab_size": TOKENIZER.vocab_size,
                "special_ids": TOKENIZER.special_ids, "seed": 3, **overrides}
    return MaskedLMBatches(corpus, **settings)


def all_batches(source, epoch: int) -> list[dict[str, torch.Tensor]]:
    return [source.batch(epoch, index) for index in range(source.num_batches(epoch))]


def rows(ids: torch.Tensor, lengths: torch.Tensor, start: int = 0, end: int = 0) -> list[tuple[int, ...]]:
    return [tuple(row[start:length - end].tolist()) for row, length in zip(ids, lengths)]


# ---- masked LM --------------------------------------------------------------------------------------------------
def test_mlm_batches_hold_every_sentence_once_wrapped_truncated_and_padded(corpora):
    source = mlm(corpora.src)
    batches = all_batches(source, epoch=0)
    assert source.num_batches(0) == 8 and [len(b["lengths"]) for b in batches] == [8] * 7 + [5]
    originals = []
    for batch in batches:
        assert set(batch) == {"input_ids", "lengths", "labels", "target_positions"}
        assert all(t.dtype == torch.int64 for t in batch.values())
        input_ids, lengths, labels = batch["input_ids"], batch["lengths"], batch["labels"]
        assert input_ids.shape[1] <= 24 and int(lengths.max()) <= input_ids.shape[1]
        padding = torch.arange(input_ids.shape[1])[None, :] >= lengths[:, None]
        assert (input_ids[padding] == PAD).all() and (labels[padding] == IGNORE_INDEX).all()
        positions = batch["target_positions"]  # the labelled positions, flat, increasing
        assert (positions.diff() > 0).all() and len(positions) == int((labels != IGNORE_INDEX).sum())
        assert (labels.reshape(-1)[positions] != IGNORE_INDEX).all()
        original = torch.where(labels == IGNORE_INDEX, input_ids, labels)
        assert (original[:, 0] == BOS).all() and (original[torch.arange(len(lengths)), lengths - 1] == EOS).all()
        originals += rows(original, lengths, start=1, end=1)
    expected = [tuple(TOKENIZER.encode(s)[:22]) for s in KO]  # max_len 24 = <s> + 22 + </s>
    assert Counter(originals) == Counter(expected)


def test_mlm_batch_is_a_function_of_seed_epoch_index(corpora):
    source = mlm(corpora.src)
    first = source.batch(2, 5)
    assert all(torch.equal(first[k], mlm(corpora.src).batch(2, 5)[k]) for k in first), "a fresh source agrees"
    assert not torch.equal(first["labels"], source.batch(3, 5)["labels"]), "another epoch, another order and mask"
    same_order = mlm(corpora.src, shuffle=False)
    epoch0, epoch1 = same_order.batch(0, 1), same_order.batch(1, 1)
    assert torch.equal(torch.where(epoch0["labels"] == IGNORE_INDEX, epoch0["input_ids"], epoch0["labels"]),
                       torch.where(epoch1["labels"] == IGNORE_INDEX, epoch1["input_ids"], epoch1["labels"]))
    assert not torch.equal(epoch0["labels"], epoch1["labels"]), "masks are drawn anew each epoch"
    with pytest.raises(IndexError, match="batch index=8 out of range: the epoch has 8 batches"):
        source.batch(0, 8)


def test_mlm_batches_within_a_token_budget_hold_every_sentence_once(corpora):
    source = mlm(corpora.src, batch_size=None, max_tokens=64)
    originals = []
    for batch in all_batches(source, epoch=1):
        input_ids, lengths, labels = batch["input_ids"], batch["lengths"], batch["labels"]
        # max_len 24 <= 64: every sentence fits, so no batch has more padded tokens than the budget.
        assert input_ids.numel() <= 64 and input_ids.shape[1] == padded_width(int(lengths.max()), 24)
        original = torch.where(labels == IGNORE_INDEX, input_ids, labels)
        originals += rows(original, lengths, start=1, end=1)
    assert Counter(originals) == Counter(tuple(TOKENIZER.encode(s)[:22]) for s in KO)


def test_mlm_budget_batches_are_a_function_of_seed_epoch_index_and_change_every_epoch(corpora):
    source = mlm(corpora.src, batch_size=None, max_tokens=64)
    for epoch in (0, 2, 3):  # a source that has planned other epochs (its cache holds two) agrees with a fresh one
        all_batches(source, epoch)
    fresh = mlm(corpora.src, batch_size=None, max_tokens=64)
    assert all(torch.equal(source.batch(1, 4)[key], fresh.batch(1, 4)[key]) for key in fresh.batch(1, 4))
    first, second = source.epoch_plan(0), source.epoch_plan(1)
    assert [b.tolist() for b in first] != [b.tolist() for b in second]
    ordered = mlm(corpora.src, batch_size=None, max_tokens=64, shuffle=False)
    assert [b.tolist() for b in ordered.epoch_plan(0)] == [b.tolist() for b in ordered.epoch_plan(5)]
    lengths = [min(len(TOKENIZER.encode(KO[i])) + 2, 24) for batch in ordered.epoch_plan(0) for i in batch]
    assert lengths == sorted(lengths), "one chunk here: without shuffling, batches follow the length order"


@pytest.mark.parametrize("make", [
    lambda c: mlm(c.src), lambda c: mlm(c.src, batch_size=None, max_tokens=64), lambda c: mlm(c.src, packed=True),
    lambda c: translation(c, batch_size=5), lambda c: translation(c, max_tokens=120),
    lambda c: translation(c, batch_size=3, packed=True),
], ids=["mlm-batch-size", "mlm-max-tokens", "mlm-packed", "translation-batch-size", "translation-max-tokens",
        "translation-packed"])
def test_padding_fraction_is_the_padding_of_the_batches_built(corpora, make):
    source = make(corpora)
    real = padded = 0
    for batch in all_batches(source, epoch=2):
        for ids, lengths in (("input_ids", "lengths"), ("src_ids", "src_lengths"), ("tgt_ids", "tgt_lengths")):
            if ids in batch:
                real, padded = real + int(batch[lengths].sum()), padded + batch[ids].numel()
    assert padding_fraction(source, epoch=2) == pytest.approx(1 - real / padded)


@st.composite
def bucket_cases(draw):
    max_len = draw(st.integers(3, 80))
    count = draw(st.integers(0, 300))
    lengths = np.array(draw(st.lists(st.integers(1, max_len), min_size=count, max_size=count)), dtype=np.int64)
    # Widths need not follow the sort keys: a pair sorts by its longer side but costs its wider padded side.
    widths = padded_width(lengths, max_len)
    if draw(st.booleans()):
        widths = np.array(draw(st.lists(st.integers(1, max_len), min_size=count, max_size=count)), dtype=np.int64)
    by_tokens = draw(st.booleans())
    # Budgets below max_len too: the longest items then exceed it on their own.
    shape = {"max_tokens": draw(st.integers(1, 4 * max_len))} if by_tokens else {"batch_size": draw(st.integers(1, 40))}
    return dict(lengths=lengths, widths=widths, seed=draw(st.integers(0, 2**31)), epoch=draw(st.integers(0, 99)),
                **shape)


@given(case=bucket_cases(), shuffle=st.booleans())
def test_length_buckets_cover_every_item_once_within_the_budget(case, shuffle):
    lengths, widths, seed, epoch = case["lengths"], case["widths"], case["seed"], case["epoch"]
    shape = {key: case.get(key) for key in ("batch_size", "max_tokens")}
    buckets = LengthBuckets(lengths, widths, np.arange(len(lengths)), seed=seed, shuffle=shuffle, **shape)
    plan = buckets.plan(epoch)
    assert sorted(np.concatenate([[], *plan]).astype(int).tolist()) == list(range(len(lengths)))
    assert all(len(batch) > 0 for batch in plan)
    again = LengthBuckets(lengths, widths, np.arange(len(lengths)), seed=seed, shuffle=shuffle, **shape).plan(epoch)
    assert [b.tolist() for b in again] == [b.tolist() for b in plan], "a pure function of (seed, epoch)"
    if shape["batch_size"]:
        assert all(len(batch) <= shape["batch_size"] for batch in plan)
        return
    budget = shape["max_tokens"]
    for batch in plan:
        assert len(batch) * widths[batch].max() <= budget or len(batch) == 1, "only a lone item exceeds it"
    if not shuffle and len(lengths) <= BUCKET_CHUNK:
        # One chunk in length order, cut greedily: no batch could have taken the next batch's first item.
        order = np.concatenate([[], *plan]).astype(int)
        assert (np.diff(lengths[order]) >= 0).all()
        for batch, following in zip(plan, plan[1:]):
            assert (len(batch) + 1) * max(widths[batch].max(), widths[following[0]]) > budget


def sequences_of(batch) -> list[tuple[int, ...]]:
    """The original ids of each sequence that cu_seqlens marks in a packed batch (masks undone)."""
    original = torch.where(batch["labels"] == IGNORE_INDEX, batch["input_ids"], batch["labels"]).reshape(-1)
    offsets = batch["cu_seqlens"].tolist()
    return [tuple(original[start:end].tolist()) for start, end in zip(offsets, offsets[1:])]


def test_packed_mlm_rows_hold_whole_sentences_once_with_their_offsets(corpora):
    source = mlm(corpora.src, packed=True, batch_size=3, max_len=64)
    sentences = []
    for batch in all_batches(source, epoch=0):
        assert set(batch) == {"input_ids", "lengths", "labels", "target_positions", "cu_seqlens"}
        input_ids, lengths, offsets = batch["input_ids"], batch["lengths"], batch["cu_seqlens"]
        assert offsets.dtype == torch.int32 and len(input_ids) <= 3 and input_ids.shape[1] <= 64
        assert input_ids.shape[1] == padded_width(int(lengths.max()), 64)
        row_starts = set(range(0, input_ids.numel(), input_ids.shape[1]))
        assert row_starts <= set(offsets.tolist()), "no sequence crosses a row"
        assert (batch["labels"].reshape(-1)[batch["target_positions"]] != IGNORE_INDEX).all()
        for sequence in sequences_of(batch):
            if sequence[0] == PAD:  # a row's padding tail
                assert set(sequence) == {PAD}
            else:
                assert sequence[0] == BOS and sequence[-1] == EOS
                sentences.append(sequence[1:-1])
        padding = torch.arange(input_ids.shape[1])[None, :] >= lengths[:, None]
        assert (input_ids[padding] == PAD).all() and (batch["labels"][padding] == IGNORE_INDEX).all()
    assert Counter(sentences) == Counter(tuple(TOKENIZER.encode(s)[:62]) for s in KO)
    assert padding_fraction(source) < 0.5 * padding_fraction(mlm(corpora.src, batch_size=3, max_len=64))


def test_packed_mlm_batches_are_a_function_of_seed_epoch_index(corpora):
    source = mlm(corpora.src, packed=True, batch_size=None, max_tokens=100)  # 100 // 24: four rows a batch
    for epoch in (0, 2, 3):
        batches = all_batches(source, epoch)
        assert all(len(batch["input_ids"]) <= 4 for batch in batches)
    fresh = mlm(corpora.src, packed=True, batch_size=None, max_tokens=100)
    assert all(torch.equal(source.batch(1, 2)[key], fresh.batch(1, 2)[key]) for key in fresh.batch(1, 2))
    assert [b.tolist() for b in source.epoch_plan(0)] != [b.tolist() for b in source.epoch_plan(1)]
    ordered = mlm(corpora.src, packed=True, shuffle=False)
    assert [b.tolist() for b in ordered.epoch_plan(0)] == [b.tolist() for b in ordered.epoch_plan(4)]


@st.composite
def packing_cases(draw):
    """Items of one side (sentences) or two (translation pairs, their sides' lengths loosely related), each side
    within its capacity."""
    sides = draw(st.sampled_from([1, 2]))
    capacity = tuple(draw(st.integers(50, 120)) for _ in range(sides))
    lengths = draw(st.lists(st.tuples(*(st.integers(1, 50) for _ in capacity)), max_size=400))
    return np.array(lengths, dtype=np.int64).reshape(len(lengths), sides), capacity


@given(case=packing_cases(), rows_per_batch=st.integers(1, 9), shuffle=st.booleans(), seed=st.integers(0, 2**31))
def test_packed_rows_cover_every_item_once_within_capacity_nearly_full(case, rows_per_batch, shuffle, seed):
    lengths, capacity = case
    one_side = lengths.shape[1] == 1
    given_lengths = lengths[:, 0] if one_side else lengths  # one side is given as (items,), as MLM gives it

    def plan() -> list[list[np.ndarray]]:
        return PackedRows(given_lengths, np.arange(len(lengths)), capacity=capacity[0] if one_side else capacity,
                          rows_per_batch=rows_per_batch, seed=seed, shuffle=shuffle).plan(3)

    rows = [row for batch in plan() for row in batch]
    assert sorted(np.concatenate([[], *rows]).astype(int).tolist()) == list(range(len(lengths)))
    assert all(0 < len(batch) <= rows_per_batch for batch in plan())
    loads = np.array([lengths[row].sum(axis=0) for row in rows]).reshape(len(rows), len(capacity))
    assert (loads <= capacity).all()
    # Best fit never opens a row for an item an open row could take, and rooms only shrink: of two rows, the item
    # that opened the later one (its first) does not fit the earlier one on every side, even at the end.
    openers = lengths[[row[0] for row in rows]]
    fits = (openers[:, None, :] <= np.array(capacity) - loads[None, :, :]).all(axis=-1)  # [opener, row]
    assert not (fits & fits.T & ~np.eye(len(rows), dtype=bool)).any()
    if one_side:  # then at most one row is at most half full
        assert (loads[:, 0] <= capacity[0] // 2).sum() <= 1
    assert [[r.tolist() for r in b] for b in plan()] == [[r.tolist() for r in b] for b in plan()]


def test_mlm_ids_default_to_the_corpus_tokenizer_and_are_checked(corpora):
    with pytest.raises(ValueError, match="vocab_size=100: smaller than the vocab_size=260"):
        mlm(corpora.src, vocab_size=100)
    with pytest.raises(ValueError, match="max_len=2: expected an integer >= 3"):
        mlm(corpora.src, max_len=2)
    assert (mlm(corpora.src).bos_id, mlm(corpora.src).pad_id) == (BOS, PAD)


# ---- causal LM --------------------------------------------------------------------------------------------------
def test_causal_blocks_use_every_token_once_with_separators(corpora):
    source = CausalLMBatches(corpora.tgt, batch_size=4, block_len=32, eos_id=EOS, seed=1)
    stream = np.concatenate([[*TOKENIZER.encode(s), EOS] for s in EN])
    assert source.num_blocks == len(stream) // 32
    seen = []
    for batch in all_batches(source, epoch=0):
        # Unpadded blocks carry no lengths: the model then attends without a padding mask.
        assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape[1] == 32
        assert torch.equal(batch["labels"], batch["input_ids"])
        seen += [tuple(row.tolist()) for row in batch["input_ids"]]
    blocks = [tuple(stream[i:i + 32].tolist()) for i in range(0, source.num_blocks * 32, 32)]
    assert sorted(seen) == sorted(blocks) and seen != blocks, "each block once, in a shuffled order"
    other_epoch = [tuple(row.tolist()) for b in all_batches(source, epoch=1) for row in b["input_ids"]]
    assert sorted(other_epoch) == sorted(blocks) and other_epoch != seen


def test_the_seq2seq_decoder_starts_from_the_token_the_causal_stream_feeds_before_each_sentence(corpora):
    from fastlm.generation import generate
    from fastlm.models import ModelConfig, Seq2SeqLM

    source = CausalLMBatches(corpora.tgt, batch_size=4, block_len=32, eos_id=EOS, shuffle=False)
    stream = torch.cat([row for batch in all_batches(source, epoch=0) for row in batch["input_ids"]])
    sentence_starts = np.cumsum([len(TOKENIZER.encode(s)) + 1 for s in EN])[:-1]
    before_a_sentence = {int(stream[start - 1]) for start in sentence_starts if start < len(stream)}

    config = ModelConfig.preset("tiny", vocab_size=TOKENIZER.vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS,
                                n_layers=1, d_model=32, n_heads=2, d_ff=64, dropout=0.0)
    model = Seq2SeqLM(config, config).eval()
    first_decoder_inputs = []
    model.decoder.register_forward_pre_hook(lambda module, args: first_decoder_inputs.append(args[0][:, 0]))
    pairs = translation(corpora, batch_size=4).batch(0, 0)
    model(**pairs)
    generate(model, src_ids=pairs["src_ids"], src_lengths=pairs["src_lengths"], max_new_tokens=2)
    started_from = {int(token) for token in torch.cat(first_decoder_inputs[:2])}  # training, then generation
    assert started_from == before_a_sentence == {model.decoder_start_id}


def test_causal_needs_one_block(corpora):
    with pytest.raises(ValueError, match="fewer than one block"):
        CausalLMBatches(corpora.tgt, batch_size=2, block_len=10**6, eos_id=EOS)


# ---- translation ------------------------------------------------------------------------------------------------
def translation(corpora, **overrides) -> TranslationBatches:
    settings = {"max_src_len": 20, "max_tgt_len": 30, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "seed": 7,
                **overrides}
    return TranslationBatches(corpora.src, corpora.tgt, **settings)


@pytest.mark.parametrize("size", [{"batch_size": 5}, {"max_tokens": 120}], ids=["batch_size", "max_tokens"])
def test_translation_batches_hold_every_pair_once_truncated_and_padded(corpora, size):
    source = translation(corpora, **size)
    pairs = []
    for batch in all_batches(source, epoch=0):
        src_ids, src_lengths = batch["src_ids"], batch["src_lengths"]
        tgt_ids, tgt_lengths, labels = batch["tgt_ids"], batch["tgt_lengths"], batch["labels"]
        assert src_ids.shape[1] <= 20 and tgt_ids.shape[1] <= 30
        assert (src_ids[:, 0] == BOS).all() and (src_ids[torch.arange(len(src_ids)), src_lengths - 1] == EOS).all()
        assert (tgt_ids[torch.arange(len(tgt_ids)), tgt_lengths - 1] == EOS).all() and (tgt_ids[:, 0] != BOS).all()
        padding = torch.arange(tgt_ids.shape[1])[None, :] >= tgt_lengths[:, None]
        assert (labels[padding] == IGNORE_INDEX).all() and torch.equal(labels[~padding], tgt_ids[~padding])
        assert (tgt_ids[padding] == PAD).all()
        if "max_tokens" in size:
            assert len(src_ids) * max(src_ids.shape[1], tgt_ids.shape[1]) <= 120
        pairs += zip(rows(src_ids, src_lengths, start=1, end=1), rows(tgt_ids, tgt_lengths, end=1))
    expected = [(tuple(TOKENIZER.encode(ko)[:18]), tuple(TOKENIZER.encode(en)[:29])) for ko, en in zip(KO, EN)]
    assert Counter(pairs) == Counter(expected)


def test_translation_buckets_by_length_and_shuffles_batches_per_epoch(corpora):
    ordered = translation(corpora, batch_size=5, shuffle=False)
    sizes = [max(min(len(TOKENIZER.encode(KO[i])) + 2, 20), min(len(TOKENIZER.encode(EN[i])) + 1, 30))
             for batch in ordered.epoch_plan(0) for i in batch]
    assert sizes == sorted(sizes), "one chunk here: without shuffling, batches follow the length order"
    shuffled = translation(corpora, batch_size=5)
    first, second = shuffled.epoch_plan(0), shuffled.epoch_plan(1)
    assert sorted(np.concatenate(first).tolist()) == list(range(len(KO)))
    assert [b.tolist() for b in first] != [b.tolist() for b in second]
    assert all(torch.equal(a, b) for a, b in zip(shuffled.batch(1, 2).values(),
                                                 translation(corpora, batch_size=5).batch(1, 2).values()))


def served(source, epoch: int = 0) -> list[int]:
    """The indices of the items (sentences, blocks or pairs) in an epoch's batches, in batch order."""
    if isinstance(source, TranslationBatches):
        return np.concatenate(source.epoch_plan(epoch)).tolist()
    if isinstance(source, CausalLMBatches):
        source.block = lambda b: np.full(source.block_len, b)  # a block's ids name it (streams repeat windows)
        return [int(row[0]) for batch in all_batches(source, epoch) for row in batch["input_ids"]]
    index = {tuple(TOKENIZER.encode(sentence)[:source.max_len - 2]): i for i, sentence in enumerate(KO)}
    unmasked = [rows(torch.where(b["labels"] == IGNORE_INDEX, b["input_ids"], b["labels"]), b["lengths"], 1, 1)
                for b in all_batches(source, epoch)]
    return [index[row] for batch in unmasked for row in batch]


SOURCES = {
    "masked": lambda c, **kw: mlm(c.src, **kw),
    "causal": lambda c, **kw: CausalLMBatches(c.tgt, batch_size=4, block_len=16, eos_id=EOS, **kw),
    "translation": lambda c, **kw: translation(c, batch_size=5, **kw),
}


@pytest.mark.parametrize("kind", SOURCES)
def test_an_evaluation_source_serves_everything_once_or_a_fixed_random_sample(corpora, kind):
    make = SOURCES[kind]
    everything = make(corpora, shuffle=False)
    count = len(everything.items)
    assert sorted(served(everything)) == list(range(count)), "the whole split, each item once"
    sampled = make(corpora, shuffle=False, sample=10, seed=5)
    items = served(sampled)
    assert len(items) == len(set(items)) == 10 and set(items) <= set(range(count))
    assert served(make(corpora, shuffle=False, sample=10, seed=5), epoch=3) == items, "the same at every evaluation"
    assert set(served(make(corpora, shuffle=False, sample=10, seed=6))) != set(items), "drawn from the seed"
    assert set(items) != set(served(everything)[:10]), "not a prefix of the evaluation batches"
    assert sorted(served(make(corpora, shuffle=False, sample=count + 5))) == list(range(count))


def test_a_translation_sample_is_not_the_shortest_pairs(corpora):
    """Without shuffle the batches run shortest first: the first two hold the 10 shortest pairs, a sample of 10
    does not."""
    ordered = translation(corpora, batch_size=5, shuffle=False)
    shortest = set(np.concatenate(ordered.epoch_plan(0)[:2]).tolist())
    sizes = np.maximum(ordered._src_lengths, ordered._tgt_lengths)  # what the batches are sorted by
    assert max(sizes[list(shortest)]) <= min(np.delete(sizes, list(shortest)))
    assert set(served(translation(corpora, batch_size=5, shuffle=False, sample=10))) != shortest


def paired_sequences(batch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(source, target, decoder input, labels) of every pair a packed translation batch holds, its padding tails
    included, sequence i of the source offsets with sequence i of the target offsets; the decoder input as
    Seq2SeqLM.forward makes it."""
    from fastlm.models.seq2seq import shifted_right

    decoder_input = shifted_right(batch["tgt_ids"], EOS, batch["tgt_cu_seqlens"])
    sides = [(batch["src_ids"], "src_cu_seqlens"), (batch["tgt_ids"], "tgt_cu_seqlens"),
             (decoder_input, "tgt_cu_seqlens"), (batch["labels"], "tgt_cu_seqlens")]
    split = []
    for values, offsets_key in sides:
        flat, offsets = values.reshape(-1).tolist(), batch[offsets_key].tolist()
        split.append([tuple(flat[start:end]) for start, end in zip(offsets, offsets[1:])])
    assert len(split[0]) == len(split[1]), "as many sequences on both sides"
    return list(zip(*split))


def test_packed_translation_rows_hold_whole_pairs_once_paired_by_index(corpora):
    source = translation(corpora, packed=True, batch_size=3, max_src_len=64, max_tgt_len=96)
    pairs, rows = [], 0
    for batch in all_batches(source, epoch=0):
        assert set(batch) == {"src_ids", "src_lengths", "tgt_ids", "tgt_lengths", "labels", "src_cu_seqlens",
                              "tgt_cu_seqlens"}
        first_sequence_of_rows = []
        for side, max_len in (("src", 64), ("tgt", 96)):
            ids, lengths, offsets = batch[f"{side}_ids"], batch[f"{side}_lengths"], batch[f"{side}_cu_seqlens"]
            assert offsets.dtype == torch.int32 and len(ids) <= 3
            assert (lengths < ids.shape[1]).all(), "every row keeps a padding tail"
            assert ids.shape[1] == padded_width(int(lengths.max()) + 1, max_len)
            padding = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
            assert (ids[padding] == PAD).all()
            row_starts = range(0, ids.numel(), ids.shape[1])
            first_sequence_of_rows.append([offsets.tolist().index(start) for start in row_starts])
        assert first_sequence_of_rows[0] == first_sequence_of_rows[1], "each row as many sequences on both sides"
        for src, tgt, decoder_input, labels in paired_sequences(batch):
            if src[0] == PAD:  # a row's padding tails: a pair of their own, without labels
                assert set(src) == set(tgt) == {PAD} and set(labels) == {IGNORE_INDEX}
                continue
            assert src[0] == BOS and src[-1] == EOS and tgt[0] != BOS and tgt[-1] == EOS
            # Labels `target </s>`, the decoder reading </s> then the target: shifted within the pair.
            assert labels == tgt and decoder_input == (EOS, *tgt[:-1])
            pairs.append((src[1:-1], tgt[:-1]))
        rows += len(batch["src_ids"])
    # A packed side keeps max_len - 1 tokens: one for the row's padding tail.
    expected = [(tuple(TOKENIZER.encode(ko)[:61]), tuple(TOKENIZER.encode(en)[:94])) for ko, en in zip(KO, EN)]
    assert Counter(pairs) == Counter(expected)
    assert rows < 0.9 * len(KO), "rows of several pairs"


def test_packed_translation_batches_are_a_function_of_seed_epoch_index_sharded_disjointly(corpora):
    def make(**overrides) -> TranslationBatches:
        # 300 // 96: three rows a batch.
        return translation(corpora, **{"packed": True, "batch_size": None, "max_tokens": 300, "max_src_len": 64,
                                       "max_tgt_len": 96, **overrides})

    source = make()
    for epoch in (0, 2, 3):
        assert all(len(batch["src_ids"]) <= 3 for batch in all_batches(source, epoch))
    resumed = make()  # a resumed run, or another rank, builds its batches from (seed, epoch, index) alone
    assert all(torch.equal(source.batch(1, 2)[key], resumed.batch(1, 2)[key]) for key in source.batch(1, 2))
    assert [b.tolist() for b in source.epoch_plan(0)] != [b.tolist() for b in source.epoch_plan(1)]
    ordered = make(shuffle=False)
    assert [b.tolist() for b in ordered.epoch_plan(0)] == [b.tolist() for b in ordered.epoch_plan(4)]
    # DDP: rank r of 2 takes the batches of index % 2 == r, each rank from its own source.
    shards = [[int(pair) for index in range(rank_source.num_batches(1)) if index % 2 == rank
               for pair in rank_source.epoch_plan(1)[index]] for rank, rank_source in enumerate([make(), make()])]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(KO)))


def test_translation_settings_are_checked(corpora):
    with pytest.raises(ValueError, match="expected exactly one of them"):
        translation(corpora, batch_size=4, max_tokens=100)
    with pytest.raises(ValueError, match="max_tokens=0: expected an integer >= 1"):
        translation(corpora, max_tokens=0)
    with pytest.raises(ValueError, match="expected a parallel corpus"):
        TranslationBatches(corpora.src, prepare_corpus(iter(["a", "b"]), TOKENIZER, corpora.path / "other",
                                                       progress=False),
                           max_src_len=8, max_tgt_len=8, bos_id=BOS, eos_id=EOS, pad_id=PAD, batch_size=2)


@pytest.mark.parametrize("make, message", [
    (lambda c: mlm(c.src, batch_size=0), "batch_size=0: expected an integer >= 1"),
    (lambda c: mlm(c.src, batch_size=True), "batch_size=True"),
    (lambda c: mlm(c.src, pad_id=TOKENIZER.vocab_size), "pad_id=260: expected an id in \\[0, 260\\)"),
    (lambda c: CausalLMBatches(c.src, batch_size=2, block_len=8, eos_id=-1), "eos_id=-1"),
    (lambda c: translation(c, batch_size=2, bos_id=None), "bos_id=None"),
    (lambda c: mlm(c.src).batch(0, 1.5), "batch index=1.5"),
    (lambda c: translation(c, batch_size=2, sample=-1), "sample=-1: expected an integer >= 0"),
    (lambda c: translation(c, batch_size=2, packed=True, max_src_len=3), "max_src_len=3: expected an integer >= 4"),
    (lambda c: mlm(c.src).batch(0.5, 0), "random stream keys \\(3, 0.5\\): expected integers"),
], ids=["batch-size-0", "batch-size-bool", "pad-id", "eos-id", "bos-id-none", "float-index", "negative-sample",
        "packed-max-src-len", "float-epoch"])
def test_bad_batch_settings_name_the_argument(corpora, make, message):
    with pytest.raises((ValueError, IndexError), match=message):
        make(corpora)
