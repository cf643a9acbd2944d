"""Batch sources: what the trainer iterates, one deterministic batch per (epoch, index).

A batch is a pure function of (seed, epoch, index): resuming needs only the position, and DDP rank r of W takes
the indices with `index % W == r`. Every sentence (or block, or pair) a source serves appears exactly once per
epoch; the last batch of an epoch may be smaller. A source serves its whole corpus, or with `sample=N` a fixed
random N of its items, drawn once from its seed (a validation subset: a prefix would be biased, by position in the
corpus or, where batches are sorted by length, by length). Batches are CPU int64 tensors whose keys are the models'
forward arguments.

Markers: corpora store bare sentences (or <s> ... </s> when prepared with add_bos_eos; those markers are stripped
here), and each source adds the markers its model expects:
- masked LM: <s> sentence </s>; a long sentence keeps its first max_len - 2 tokens and still ends with </s>;
- causal LM: sentences back to back, each followed by </s> as the separator;
- translation: source <s> sentence </s> (as the encoder saw it in pre-training), target `sentence </s>` (no start
  token: Seq2SeqLM shifts it right behind </s>, the token that precedes every sentence of the causal stream), each
  truncated to its maximum length keeping the final </s>.
Padding goes to the longest sequence of the batch, rounded up to a multiple of 8 (tensor-core friendly tiles and
few distinct shapes for torch.compile), never beyond the maximum length.

Packed masked-LM batches (packed=True) put several whole sentences in each row of up to max_len tokens (PackedRows)
and add "cu_seqlens", the offsets of the sentences (and of each row's padding tail) in the flattened rows, so that
the model attends within each sentence and restarts its positions there (fastlm.models.packing): the same
computation per sentence as one sentence per padded row, with almost no padding. Packed translation batches do the
same on both sides of whole pairs, whose sources and targets stand in the same order in a row of src_ids and the row
of tgt_ids ("src_cu_seqlens", "tgt_cu_seqlens").
"""

from __future__ import annotations

import bisect
import math
import numbers
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from fastlm.data.corpus import TokenizedCorpus
from fastlm.data.masking import IGNORE_INDEX, MaskingPolicy, target_positions
from fastlm.data.rng import numpy_generator, torch_generator

PAD_MULTIPLE = 8
# Bucketed items are sorted by length within chunks of this many items: batches of similar lengths (little padding)
# while the chunks, and the batch order, still change every epoch.
BUCKET_CHUNK = 1 << 14
# The random stream of a source's `sample`, keyed (seed, SAMPLE_STREAM): an epoch number no epoch has, so the sample
# is unrelated to every epoch's order.
SAMPLE_STREAM = -1


class BatchSource(Protocol):
    def num_batches(self, epoch: int) -> int: ...

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]: ...


def _chunked_plan(items: np.ndarray, seed: int, epoch: int, shuffle: bool, arrange) -> list:
    """The items shuffled by a permutation drawn from (seed, epoch), each chunk of BUCKET_CHUNK items turned into
    groups by `arrange(chunk)`, and the groups shuffled by the same generator. Without shuffle, corpus order."""
    generator = numpy_generator(seed, epoch)
    order = items[generator.permutation(len(items))] if shuffle else items
    groups = []
    for start in range(0, len(order), BUCKET_CHUNK):
        groups.extend(arrange(order[start:start + BUCKET_CHUNK]))
    if shuffle:
        groups = [groups[i] for i in generator.permutation(len(groups))]
    return groups


class LengthBuckets:
    """The batches of every epoch, as item indices in batch order, for items of known lengths: the items shuffled
    by a permutation drawn from (seed, epoch), each chunk of BUCKET_CHUNK items sorted by `sort_keys` and cut into
    consecutive batches of `batch_size` items or of at most `max_tokens` padded tokens (items x the largest of their
    `widths`), exactly one of the two given; then the batches shuffled by the same generator. `items` are the
    indices served (all, or a source's `sample`); sort_keys and widths are indexed by item. An item wider than
    max_tokens makes a batch of its own: nothing is dropped or truncated further. Without shuffle, chunks and
    batches keep corpus order (evaluation)."""

    def __init__(self, sort_keys: np.ndarray, widths: np.ndarray, items: np.ndarray, *, batch_size: int | None,
                 max_tokens: int | None, seed: int, shuffle: bool):
        _check_batch_shape(batch_size, max_tokens)
        self.sort_keys, self.widths, self.items = sort_keys, widths, items
        self.batch_size, self.max_tokens, self.seed, self.shuffle = batch_size, max_tokens, seed, shuffle
        # Two epochs: the prefetcher builds the next epoch's first batches while the trainer ends this one.
        self.plan = lru_cache(maxsize=2)(self._plan)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        return _chunked_plan(self.items, self.seed, epoch, self.shuffle,
                             lambda chunk: self._cut(chunk[np.argsort(self.sort_keys[chunk], kind="stable")]))

    def _cut(self, items: np.ndarray) -> list[np.ndarray]:
        """Consecutive batches of `items` (sorted by length): batch_size items, or as many as fit in max_tokens."""
        if self.batch_size is not None:
            return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        batches, start, widest = [], 0, 0
        for end, width in enumerate(self.widths[items].tolist()):
            widest = max(widest, width)
            if (end - start + 1) * widest > self.max_tokens and end > start:
                batches.append(items[start:end])
                start, widest = end, width
        batches.append(items[start:])
        return batches


class PackedRows:
    """The batches of every epoch for packed rows, as rows of item indices: the items shuffled by a permutation drawn
    from (seed, epoch), each chunk of BUCKET_CHUNK items packed into rows of at most `capacity` tokens (no item
    split: `lengths`, indexed by item, are at most capacity), the rows shuffled by the same generator and cut into
    batches of `rows_per_batch` rows. Without shuffle: corpus order, rows in packing order (evaluation).

    Items of two sides (translation pairs: a source and a target) give `lengths` (items, 2) and a capacity per side:
    a row then holds on both sides the same items (a row of sources and the row of their targets), within each
    side's capacity."""

    def __init__(self, lengths: np.ndarray, items: np.ndarray, *, capacity: int | tuple[int, ...],
                 rows_per_batch: int, seed: int, shuffle: bool):
        self.lengths = lengths[:, None] if lengths.ndim == 1 else lengths  # (items, sides)
        if self.lengths.shape[1] > 2:
            raise ValueError(f"lengths of shape {lengths.shape}: expected items of one side or two")
        self.capacity = np.broadcast_to(capacity, self.lengths.shape[1:])
        self.items, self.rows_per_batch, self.seed, self.shuffle = items, rows_per_batch, seed, shuffle
        self.plan = lru_cache(maxsize=2)(self._plan)  # two epochs, as LengthBuckets

    def _plan(self, epoch: int) -> list[list[np.ndarray]]:
        rows = _chunked_plan(self.items, self.seed, epoch, self.shuffle, self._pack)
        return [rows[i:i + self.rows_per_batch] for i in range(0, len(rows), self.rows_per_batch)]

    def _pack(self, items: np.ndarray) -> list[np.ndarray]:
        """Best-fit decreasing: largest first (by the largest share of a side's capacity an item takes), each item
        into the open row that fits it on both sides with the least room left on the first side (then the second),
        else a new row; the rows come out nearly full (the smallest items fill the gaps), and the shuffled order of
        the chunk still decides which of equally large items share a row."""
        shares = (self.lengths[items] / self.capacity).max(axis=1)
        order = items[np.argsort(-shares, kind="stable")]
        rows: list[list[int]] = []
        open_rows = _OpenRows()
        for item, sizes in zip(order.tolist(), self.lengths[order].tolist()):
            found = open_rows.take_best_fit(sizes)
            if found is None:
                found = (*self.capacity.tolist(), len(rows))
                rows.append([])
            *rooms, row = found
            rows[row].append(item)
            left = [room - size for room, size in zip(rooms, sizes)]
            if min(left) > 0:
                open_rows.add(left, row)
        return [np.array(row, dtype=np.int64) for row in rows]


class _OpenRows:
    """The rows of a packing with room left on every side, filed by their room on the first side: by_room[room]
    holds (room on the second side, if any, row) ascending. Filed by room rather than in one sorted list so that
    rows without room for an item on the second side cost its search nothing: in one list, translation pairs
    (ko-en) had the search step over 170 such rows on average."""

    def __init__(self):
        self.by_room: dict[int, list[tuple[int, ...]]] = {}
        self.rooms: list[int] = []  # the keys of by_room, ascending

    def add(self, rooms: list[int], row: int) -> None:
        if rooms[0] not in self.by_room:
            self.by_room[rooms[0]] = []
            bisect.insort(self.rooms, rooms[0])
        bisect.insort(self.by_room[rooms[0]], (*rooms[1:], row))

    def take_best_fit(self, sizes: list[int]) -> tuple[int, ...] | None:
        """Remove the row that fits an item of `sizes` on every side with the least room on the first side, then on
        the second (then the lowest row); return its (rooms on every side..., row), or None."""
        for room in self.rooms[bisect.bisect_left(self.rooms, sizes[0]):]:
            slot = bisect.bisect_left(self.by_room[room], (*sizes[1:], -1))
            if slot < len(self.by_room[room]):
                return (room, *self._pop(room, slot))
        return None

    def _pop(self, room: int, slot: int) -> tuple[int, ...]:
        candidates = self.by_room[room]
        taken = candidates.pop(slot)
        if not candidates:
            del self.by_room[room]
            self.rooms.remove(room)
        return taken


def padded_width(length, max_len: int):
    """The padded length of a batch whose longest row has `length` tokens (an int or an array of them): rounded up
    to a multiple of PAD_MULTIPLE, at most max_len."""
    return np.minimum(-(-length // PAD_MULTIPLE) * PAD_MULTIPLE, max_len)


def padding_fraction(source, epoch: int = 0) -> float:
    """The share of padding in the padded tensors of an epoch's batches (1 - real tokens / tensor elements; both
    sides of translation pairs), computed from the source's plan (`padded_rows`) without building a batch: for
    MaskedLMBatches and TranslationBatches (CausalLMBatches never pad)."""
    real = padded = 0
    for rows, width in source.padded_rows(epoch):
        real += int(rows.sum())
        padded += len(rows) * width
    return 1.0 - real / padded


class MaskedLMBatches:
    """Masked-LM batches {"input_ids", "lengths", "labels", "target_positions"}, with masks (see MaskingPolicy)
    drawn anew for every (seed, epoch, index); target_positions are the flat indices of the labelled positions, so
    the model runs its head on those rows only. With batch_size, batches of sentences in a new random order every
    epoch (the order MLM runs have always had); with max_tokens, length-bucketed batches (LengthBuckets) of
    sentences of similar lengths. Without shuffle: corpus order (or length order within chunks, with max_tokens).
    bos/eos/pad ids default to the tokenizer's, as recorded in the corpus. `sample`: see the module.

    packed=True: rows of several whole sentences, up to max_len tokens each (PackedRows), and "cu_seqlens" (int32,
    (n + 1,)): the offsets, in the flattened (B * T) input_ids, of each sentence and each row's padding tail.
    batch_size then counts rows, and max_tokens allows max_tokens // max_len rows (one at least), as for causal
    blocks; lengths count each row's real tokens."""

    def __init__(self, corpus: TokenizedCorpus, *, max_len: int, mask_id: int, vocab_size: int, special_ids,
                 batch_size: int | None = None, max_tokens: int | None = None, mask_prob: float = 0.15,
                 replace_mask: float = 0.8, replace_random: float = 0.1, seed: int = 0, shuffle: bool = True,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None, sample: int = 0,
                 packed: bool = False):
        _check_batch_shape(batch_size, max_tokens)
        _check_at_least("max_len", max_len, 3)  # <s>, one token, </s>
        _check_vocab(corpus, vocab_size)
        self.corpus, self.batch_size, self.max_len, self.seed, self.shuffle = corpus, batch_size, max_len, seed, shuffle
        self.items = _served_items(len(corpus), sample, seed)  # the sentences served
        self.bos_id = _special_id(corpus, "bos_id", bos_id, vocab_size)
        self.eos_id = _special_id(corpus, "eos_id", eos_id, vocab_size)
        self.pad_id = _special_id(corpus, "pad_id", pad_id, vocab_size)
        self.policy = MaskingPolicy(mask_id=mask_id, vocab_size=vocab_size, special_ids=frozenset(special_ids),
                                    mask_prob=mask_prob, replace_mask=replace_mask, replace_random=replace_random)
        self._lengths = np.minimum(_content_lengths(corpus) + 2, max_len)  # <s> sentence </s>, truncated
        self._buckets = None if max_tokens is None or packed else LengthBuckets(
            self._lengths, padded_width(self._lengths, max_len), self.items, batch_size=None, max_tokens=max_tokens,
            seed=seed, shuffle=shuffle)
        self._packing = None if not packed else PackedRows(
            self._lengths, self.items, capacity=max_len, seed=seed, shuffle=shuffle,
            rows_per_batch=_rows_per_batch(batch_size, max_tokens, max_len))

    def num_batches(self, epoch: int) -> int:
        if self._packing is not None:
            return len(self._packing.plan(epoch))
        if self._buckets is None:
            return math.ceil(len(self.items) / self.batch_size)
        return len(self._buckets.plan(epoch))

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        _check_index(index, self.num_batches(epoch))
        rows = [[_wrapped(_content(self.corpus, i)[:self.max_len - 2], self.bos_id, self.eos_id) for i in row]
                for row in self._rows(epoch, index)]
        input_ids, lengths = _padded([np.concatenate(row) for row in rows], self.pad_id, self.max_len)
        input_ids, labels = self.policy.apply(input_ids, lengths, torch_generator(self.seed, epoch, index))
        batch = {"input_ids": input_ids, "lengths": lengths, "labels": labels,
                 "target_positions": target_positions(labels)}
        if self._packing is not None:
            batch["cu_seqlens"] = _sequence_offsets([[len(sentence) for sentence in row] for row in rows],
                                                    input_ids.shape[1])
        return batch

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The sentence indices of every batch of the epoch, in batch order (row by row, when packed)."""
        return [np.concatenate(self._rows(epoch, index)) for index in range(self.num_batches(epoch))]

    def padded_rows(self, epoch: int):
        """(the real tokens of each row of a batch, the width its rows are padded to) for every batch of the epoch:
        what padding_fraction needs."""
        for index in range(self.num_batches(epoch)):
            rows = np.array([self._lengths[row].sum() for row in self._rows(epoch, index)])
            yield rows, int(padded_width(rows.max(), self.max_len))

    def _rows(self, epoch: int, index: int) -> list[np.ndarray]:
        """The sentence indices of each row of a batch: several when packed, else one."""
        if self._packing is not None:
            return self._packing.plan(epoch)[index]
        if self._buckets is not None:
            sentences = self._buckets.plan(epoch)[index]
        else:
            order = _epoch_order(len(self.items), self.seed, epoch, self.shuffle)
            sentences = self.items[order[index * self.batch_size:(index + 1) * self.batch_size]]
        return list(sentences[:, None])


class CausalLMBatches:
    """Causal-LM batches {"input_ids", "labels" (= input_ids; the model shifts)} of fixed-length blocks cut from the
    corpus read as one stream, `sentence </s> sentence </s> ...`; the block order changes every epoch (without
    shuffle: stream order). The stream's last partial block (< block_len tokens) is left out; `sample` counts
    blocks (see the module). No row is padded, so the batch carries no "lengths": the
    model then attends without a padding mask (causal SDPA can take its flash kernels), with no host sync to find
    out that nothing is padded."""

    def __init__(self, corpus: TokenizedCorpus, *, batch_size: int, block_len: int, eos_id: int, seed: int = 0,
                 shuffle: bool = True, sample: int = 0):
        _check_at_least("batch_size", batch_size, 1)
        _check_at_least("block_len", block_len, 2)
        _check_id("eos_id", eos_id, corpus.vocab_size)
        self.corpus, self.batch_size, self.block_len, self.eos_id = corpus, batch_size, block_len, eos_id
        self.seed, self.shuffle = seed, shuffle
        marker = int(corpus.add_bos_eos)  # a stored <s> before and </s> after each sentence
        self._content_starts = corpus.offsets[:-1] + marker
        self._content_lengths = corpus.lengths - 2 * marker
        # Sentence i fills stream positions [stream_starts[i], stream_starts[i + 1]), its separator last.
        self._stream_starts = np.concatenate([[0], np.cumsum(self._content_lengths + 1)])
        self.num_blocks = int(self._stream_starts[-1]) // block_len
        if self.num_blocks == 0:
            raise ValueError(f"block_len={block_len}: the corpus {corpus.path} has only {self._stream_starts[-1]} "
                             "tokens with separators, fewer than one block")
        self.items = _served_items(self.num_blocks, sample, seed)  # the blocks served

    def num_batches(self, epoch: int) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        _check_index(index, self.num_batches(epoch))
        order = _epoch_order(len(self.items), self.seed, epoch, self.shuffle)
        blocks = [self.block(b) for b in self.items[order[index * self.batch_size:(index + 1) * self.batch_size]]]
        input_ids = torch.from_numpy(np.stack(blocks).astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def block(self, block_index: int) -> np.ndarray:
        """Stream positions [block_index * block_len, (block_index + 1) * block_len)."""
        positions = block_index * self.block_len + np.arange(self.block_len)
        sentence = np.searchsorted(self._stream_starts, positions, side="right") - 1
        within = positions - self._stream_starts[sentence]
        is_content = within < self._content_lengths[sentence]  # else the separator after the sentence
        token = self._content_starts[sentence] + within
        values = np.full(self.block_len, self.eos_id, dtype=np.int64)
        if is_content.any():
            # The block's tokens are one contiguous range of the corpus (minus stored markers): one read.
            first, last = int(token[is_content].min()), int(token[is_content].max())
            values[is_content] = self.corpus.tokens(first, last + 1)[token[is_content] - first]
        return values


class TranslationBatches:
    """Translation batches {"src_ids", "src_lengths", "tgt_ids", "tgt_lengths", "labels"} (labels = tgt_ids with
    -100 at padding). Pairs are bucketed by length (LengthBuckets, by the longer side): batches of `batch_size`
    pairs or of at most `max_tokens` padded tokens (pairs x the wider padded side; exactly one of the two is
    given). Without shuffle (for evaluation) the pairs are still sorted by length within chunks of corpus order, and
    the batches keep that order, shortest first: a prefix of them is the shortest pairs, so evaluate them all, or
    serve a `sample` (see the module).

    packed=True: rows of several whole pairs (PackedRows over both sides), the sources of a row back to back in its
    row of src_ids and their targets in the same order in its row of tgt_ids, and "src_cu_seqlens",
    "tgt_cu_seqlens" (int32, (n + 1,)): the offsets of each side's n sequences in its flattened rows, target
    sequence i the translation of source sequence i (fastlm.models.packing). Every row keeps at least one padding
    token on each side: its two padding tails are a pair of their own, so each row holds as many sequences on both
    sides and none is empty (a query with no key to attend to would be NaN). A pair therefore keeps at most
    max_len - 1 tokens a side, one fewer than padded batches keep of a pair cut at max_len. The alternatives cost
    more: a tail only where a side has room leaves rows with one sequence more on one side, and rows one token wider
    than max_len would pass a model whose max_seq_len is max_len. batch_size counts rows, and max_tokens allows
    max_tokens // max(max_src_len, max_tgt_len) rows (one at least); lengths count each row's real tokens."""

    def __init__(self, src_corpus: TokenizedCorpus, tgt_corpus: TokenizedCorpus, *, max_src_len: int,
                 max_tgt_len: int, bos_id: int, eos_id: int, pad_id: int, max_tokens: int | None = None,
                 batch_size: int | None = None, seed: int = 0, shuffle: bool = True, sample: int = 0,
                 packed: bool = False):
        if len(src_corpus) != len(tgt_corpus):
            raise ValueError(f"src_corpus has {len(src_corpus)} sentences, tgt_corpus has {len(tgt_corpus)}: "
                             "expected a parallel corpus")
        _check_batch_shape(batch_size, max_tokens)
        self._tail = int(packed)  # padding tokens every row keeps: a packed row's padding tails pair up
        _check_at_least("max_src_len", max_src_len, 3 + self._tail)  # <s>, one token, </s>
        _check_at_least("max_tgt_len", max_tgt_len, 2 + self._tail)  # one token, </s>
        for name, special_id in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            _check_id(name, special_id, max(src_corpus.vocab_size, tgt_corpus.vocab_size))
        self.src_corpus, self.tgt_corpus = src_corpus, tgt_corpus
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_tokens, self.batch_size, self.seed, self.shuffle = max_tokens, batch_size, seed, shuffle
        # The most tokens a side of a pair keeps.
        self._src_limit, self._tgt_limit = max_src_len - self._tail, max_tgt_len - self._tail
        self._src_lengths = np.minimum(_content_lengths(src_corpus) + 2, self._src_limit)
        self._tgt_lengths = np.minimum(_content_lengths(tgt_corpus) + 1, self._tgt_limit)
        self.items = _served_items(len(src_corpus), sample, seed)  # the pairs served
        # What a pair costs in a padded batch: the wider of its two padded sides.
        widths = np.maximum(padded_width(self._src_lengths, max_src_len), padded_width(self._tgt_lengths, max_tgt_len))
        self._buckets = None if packed else LengthBuckets(
            np.maximum(self._src_lengths, self._tgt_lengths), widths, self.items, batch_size=batch_size,
            max_tokens=max_tokens, seed=seed, shuffle=shuffle)
        self._packing = None if not packed else PackedRows(
            np.stack([self._src_lengths, self._tgt_lengths], axis=1), self.items,
            capacity=(self._src_limit, self._tgt_limit), seed=seed, shuffle=shuffle,
            rows_per_batch=_rows_per_batch(batch_size, max_tokens, max(max_src_len, max_tgt_len)))

    def num_batches(self, epoch: int) -> int:
        planner = self._packing if self._packing is not None else self._buckets
        return len(planner.plan(epoch))

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        _check_index(index, self.num_batches(epoch))
        rows = self._rows(epoch, index)
        sources = [[_wrapped(_content(self.src_corpus, i)[:self._src_limit - 2], self.bos_id, self.eos_id)
                    for i in row] for row in rows]
        targets = [[_wrapped(_content(self.tgt_corpus, i)[:self._tgt_limit - 1], None, self.eos_id) for i in row]
                   for row in rows]
        src_ids, src_lengths = _padded([np.concatenate(row) for row in sources], self.pad_id, self.max_src_len,
                                       self._tail)
        tgt_ids, tgt_lengths = _padded([np.concatenate(row) for row in targets], self.pad_id, self.max_tgt_len,
                                       self._tail)
        padding = torch.arange(tgt_ids.shape[1])[None, :] >= tgt_lengths[:, None]
        batch = {"src_ids": src_ids, "src_lengths": src_lengths, "tgt_ids": tgt_ids, "tgt_lengths": tgt_lengths,
                 "labels": tgt_ids.masked_fill(padding, IGNORE_INDEX)}
        if self._packing is not None:
            for side, sequences, ids in (("src", sources, src_ids), ("tgt", targets, tgt_ids)):
                batch[f"{side}_cu_seqlens"] = _sequence_offsets([[len(s) for s in row] for row in sequences],
                                                                ids.shape[1])
        return batch

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The pair indices of every batch of the epoch, in batch order (row by row, when packed)."""
        return [np.concatenate(self._rows(epoch, index)) for index in range(self.num_batches(epoch))]

    def padded_rows(self, epoch: int):
        """(the real tokens of each row of a batch, the width its rows are padded to) for both sides of every batch
        of the epoch: what padding_fraction needs."""
        for index in range(self.num_batches(epoch)):
            rows = self._rows(epoch, index)
            for lengths, max_len in ((self._src_lengths, self.max_src_len), (self._tgt_lengths, self.max_tgt_len)):
                tokens = np.array([lengths[row].sum() for row in rows])
                yield tokens, int(padded_width(tokens.max() + self._tail, max_len))

    def _rows(self, epoch: int, index: int) -> list[np.ndarray]:
        """The pair indices of each row of a batch: several when packed, else one."""
        if self._packing is not None:
            return self._packing.plan(epoch)[index]
        return list(self._buckets.plan(epoch)[index][:, None])


def _served_items(count: int, sample: int, seed: int) -> np.ndarray:
    """The indices of the items a source serves, ascending: all `count`, or (0 < sample < count) a random `sample`
    of them drawn from `seed` alone, the same however often the source is built."""
    _check_at_least("sample", sample, 0)
    if sample == 0 or sample >= count:
        return np.arange(count)
    return np.sort(numpy_generator(seed, SAMPLE_STREAM).choice(count, size=sample, replace=False))


@lru_cache(maxsize=2)  # the training and the evaluation order
def _epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the items in an epoch: a permutation drawn from (seed, epoch), or corpus order."""
    order = numpy_generator(seed, epoch).permutation(count) if shuffle else np.arange(count)
    order.flags.writeable = False  # shared by every batch of the epoch through the cache
    return order


def _content(corpus: TokenizedCorpus, index: int) -> np.ndarray:
    """The ids of sentence `index` without the <s> ... </s> that add_bos_eos may have stored."""
    ids = corpus[int(index)]
    return ids[1:-1] if corpus.add_bos_eos else ids


def _content_lengths(corpus: TokenizedCorpus) -> np.ndarray:
    return corpus.lengths - 2 * int(corpus.add_bos_eos)


def _wrapped(content: np.ndarray, bos_id: int | None, eos_id: int) -> np.ndarray:
    head = [] if bos_id is None else [bos_id]
    return np.concatenate([np.asarray(head, dtype=np.int64), content.astype(np.int64), [eos_id]])


def _padded(sequences: list[np.ndarray], pad_id: int, max_len: int, tail: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) int64 padded with pad_id, lengths (B,) int64); T = padded_width of the longest length plus `tail`,
    the padding every row keeps (see TranslationBatches, packed)."""
    lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)
    width = int(padded_width(int(lengths.max()) + tail, max_len))
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = sequence
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def _sequence_offsets(rows: list[list[int]], width: int) -> torch.Tensor:
    """cu_seqlens (int32) of packed rows of `width` tokens, given the sequence lengths of each row: where each
    sequence starts in the flattened rows, then where each row's padding tail does (a sequence of its own), and the
    end."""
    offsets = [0]
    for row, lengths in enumerate(rows):
        offsets.extend(row * width + np.cumsum(lengths))
        if offsets[-1] < (row + 1) * width:
            offsets.append((row + 1) * width)
    return torch.tensor(offsets, dtype=torch.int32)


def _rows_per_batch(batch_size: int | None, max_tokens: int | None, width: int) -> int:
    """The rows of a batch of packed rows `width` tokens wide: batch_size, or as many as max_tokens pays for (one at
    least, as a too-long item makes a batch of its own)."""
    return max(1, max_tokens // width) if max_tokens is not None else batch_size


def _special_id(corpus: TokenizedCorpus, name: str, given: int | None, vocab_size: int) -> int:
    special_id = given if given is not None else getattr(corpus, name)
    if special_id is None:
        raise ValueError(f"{name}=None: not given, and the tokenizer of {corpus.path} has no such special token")
    _check_id(name, special_id, vocab_size)
    return special_id


def _check_id(name: str, value: int, vocab_size: int) -> None:
    """An id the batches will hold must be one the model can embed."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value!r}: expected an id in [0, {vocab_size})")


def _check_vocab(corpus: TokenizedCorpus, vocab_size: int) -> None:
    if vocab_size < corpus.vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: smaller than the vocab_size={corpus.vocab_size} of {corpus.path}")


def _check_batch_shape(batch_size: int | None, max_tokens: int | None) -> None:
    """Exactly one of batch_size (items per batch) and max_tokens (padded tokens per batch) decides a batch."""
    if (max_tokens is None) == (batch_size is None):
        raise ValueError(f"max_tokens={max_tokens}, batch_size={batch_size}: expected exactly one of them")
    if batch_size is not None:
        _check_at_least("batch_size", batch_size, 1)
    else:
        _check_at_least("max_tokens", max_tokens, 1)


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


def _check_index(index: int, num_batches: int) -> None:
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < num_batches:
        raise IndexError(f"batch index={index!r} out of range: the epoch has {num_batches} batches "
                         f"(expected an integer in [0, {num_batches}))")
