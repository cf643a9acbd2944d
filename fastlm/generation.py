"""Text generation for DecoderLM and Seq2SeqLM: greedy, sampling (temperature, top-k, top-p) and beam search.

Batched with padding at the right (`lengths`), per-row end-of-sequence and length limits, and a KV cache: each step
feeds one token per row, self-attention keys/values accumulate in the cache and the cross-attention ones are computed
once. Every strategy can forbid repeated n-grams (transformers' `no_repeat_ngram_size`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastlm.models import DecoderLM, KVCache, Seq2SeqLM
from fastlm.models.base import run_checks, token_checks

STRATEGIES = ("greedy", "sample", "beam")


@dataclass(frozen=True)
class GenerationDefaults:
    """How fastlm decodes unless told otherwise, in one place: generate(), `fastlm translate`, BLEU at evaluation and
    `fastlm export` (which writes these into generation_config.json, so that transformers' generate() decodes an
    exported model as fastlm does) all read them from here. Field names are transformers' GenerationConfig names."""

    max_new_tokens: int = 64       # longest output, </s> included
    num_beams: int = 4             # beam width (translation decodes by beam search; generate()'s default is greedy)
    # A finished hypothesis scores sum(log p) / generated_length ** length_penalty: 1.0 (fairseq's and transformers'
    # default) compares mean log-probabilities, so short outputs win no bonus.
    length_penalty: float = 1.0
    early_stopping: bool = True    # end an input once it has num_beams finished hypotheses (False: once none can win)
    # Size of the n-grams that may not repeat in an output; 0 (any may repeat): 17% of the English sentences of
    # ko-en's training pairs repeat a run of 3 tokens (char-level 8k tokenizer), which a ban of 3 would forbid.
    no_repeat_ngram_size: int = 0


GENERATION_DEFAULTS = GenerationDefaults()


@torch.no_grad()
def generate(
    model: DecoderLM | Seq2SeqLM,
    input_ids: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    src_ids: Tensor | None = None,
    src_lengths: Tensor | None = None,
    max_new_tokens: int = GENERATION_DEFAULTS.max_new_tokens,
    strategy: str = "greedy",
    num_beams: int = GENERATION_DEFAULTS.num_beams,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    length_penalty: float = GENERATION_DEFAULTS.length_penalty,
    early_stopping: bool = GENERATION_DEFAULTS.early_stopping,
    no_repeat_ngram_size: int = GENERATION_DEFAULTS.no_repeat_ngram_size,
    max_len_a: float = 0.0,
    max_len_b: int | None = None,
    num_return_sequences: int = 1,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt (DecoderLM: input_ids (B, T) with lengths) or translate each source (Seq2SeqLM: src_ids
    (B, S) with src_lengths; the decoder starts from its decoder_start_id, </s>).

    strategy: "greedy" (argmax), "sample" (softmax of logits / temperature, restricted to the top_k tokens when
    top_k > 0 and to the smallest set of probability >= top_p, drawn with `generator`), or "beam" (num_beams beams;
    a finished hypothesis scores sum(log p) / generated_length ** length_penalty; early_stopping=True ends an input
    as soon as it has num_beams finished hypotheses, False once no running beam can beat the worst of them).

    no_repeat_ngram_size: when n > 0, no n tokens in a row occur twice in a sequence: a token that would complete an
    n-gram the sequence already holds gets probability 0. As in transformers, the sequence is everything the decoder
    reads: a DecoderLM's prompt counts (a continuation repeats none of its prompt's n-grams either), and so does a
    Seq2SeqLM's start token (</s>: with n = 1 a translation ends only once every other token is used). A row whose
    every token is forbidden may end with eos all the same.

    max_len_a, max_len_b: when max_len_b is given (None: no such limit), row i generates at most
    int(max_len_a * source_length_i + max_len_b) tokens (fairseq's rule, per row; at least 1), never more than
    max_new_tokens. source_length is the row's src_lengths for a Seq2SeqLM, its prompt length for a DecoderLM. A row
    that reaches its limit stops there as every row does at max_new_tokens: its beams compete as they are, no eos.

    Returns int64 (B * num_return_sequences, L): the generated tokens only (the prompt is not repeated). Row
    b * num_return_sequences + i is the i-th sequence of input b (beam search: best score first). A row ends with
    eos_id where one was generated, then pad_id up to L, the longest row (L <= max_new_tokens).

    Generation never runs past the model's positions: the longest prompt (for Seq2SeqLM, the start token) plus max_new_tokens - 1
    must fit max_seq_len, else a ValueError before any step. NaN logits (a diverged model) are a ValueError too.
    """
    _check_options(strategy, max_new_tokens, num_beams, temperature, top_k, top_p, length_penalty,
                   no_repeat_ngram_size, max_len_a, max_len_b, num_return_sequences)
    model_was_training = model.training
    model.eval()
    try:
        prompt, prompt_lengths, source_lengths, next_logits = _decoding_problem(
            model, input_ids, lengths, src_ids, src_lengths, max_new_tokens, strategy, num_beams, num_return_sequences)
        config = model.config
        # The last new token is returned, never fed back: the rows need room for one token fewer.
        width = prompt.shape[1] + max_new_tokens - 1
        ids = prompt.new_full((prompt.shape[0], width), config.pad_id)
        ids[:, : prompt.shape[1]] = prompt
        state = _Rows(ids, prompt_lengths.clone(), KVCache(width) if use_cache else None, next_logits,
                      prompt.shape[1], no_repeat_ngram_size, config.eos_id)
        limits = _length_limits(source_lengths, max_new_tokens, max_len_a, max_len_b)
        if strategy == "beam":
            return _beam_search(state, limits, num_beams, length_penalty, early_stopping, num_return_sequences,
                                config.eos_id, config.pad_id)
        choose = (lambda logits: logits.argmax(dim=-1)) if strategy == "greedy" else (
            lambda logits: _sample(logits, temperature, top_k, top_p, generator))
        return _step_by_step(state, limits, choose, config.eos_id, config.pad_id)
    finally:
        model.train(model_was_training)


def _check_options(strategy, max_new_tokens, num_beams, temperature, top_k, top_p, length_penalty,
                   no_repeat_ngram_size, max_len_a, max_len_b, num_return_sequences) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy = {strategy!r}: expected one of {STRATEGIES}")
    counts = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, top_k=top_k,
                  no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_return_sequences,
                  **({} if max_len_b is None else dict(max_len_b=max_len_b)))
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} = {value!r}: expected an integer")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: expected >= 1")
    if num_beams < 1:
        raise ValueError(f"num_beams = {num_beams}: expected >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature}: expected > 0")
    if top_k < 0:
        raise ValueError(f"top_k = {top_k}: expected >= 0 (0 = no top-k filter)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p = {top_p}: expected a probability in (0, 1]")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty = {length_penalty}: expected a finite number")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size = {no_repeat_ngram_size}: expected >= 0 (0 = repeats allowed)")
    if not (isinstance(max_len_a, numbers.Real) and math.isfinite(max_len_a) and max_len_a >= 0):
        raise ValueError(f"max_len_a = {max_len_a!r}: expected a finite number >= 0")
    if max_len_b is None and max_len_a != 0:
        raise ValueError(f"max_len_a = {max_len_a} needs max_len_b: a row's limit is int(max_len_a * source_length "
                         "+ max_len_b)")
    if max_len_b is not None and max_len_b < 0:
        raise ValueError(f"max_len_b = {max_len_b}: expected >= 0")
    most = {"greedy": 1, "sample": None, "beam": num_beams}[strategy]
    if num_return_sequences < 1 or (most is not None and num_return_sequences > most):
        raise ValueError(f"num_return_sequences = {num_return_sequences}: expected between 1 and "
                         f"{most if most is not None else 'any number'} for strategy {strategy!r}")


def _decoding_problem(model, input_ids, lengths, src_ids, src_lengths, max_new_tokens, strategy, num_beams,
                      num_return_sequences) -> tuple[Tensor, Tensor, Tensor, Callable]:
    """The (R, T) prompt rows, their lengths, the (R,) lengths of their sources (a DecoderLM's: its prompt) and a
    `next_logits(ids, lengths, cache)` function, R being the batch times the rows each input needs (its beams, or
    its samples)."""
    copies = num_beams if strategy == "beam" else num_return_sequences
    config = model.config
    if isinstance(model, Seq2SeqLM):
        if src_ids is None or input_ids is not None:
            raise ValueError("Seq2SeqLM generation takes src_ids (and src_lengths), not input_ids: "
                             "the decoder always starts from its decoder_start_id")
        run_checks(token_checks(model.encoder_config, src_ids, src_lengths, None, names=("src_ids", "src_lengths", "")))
        _check_room(1, max_new_tokens, config.max_seq_len)
        memory = model.encode(src_ids, src_lengths).repeat_interleave(copies, dim=0)
        memory_lengths = src_lengths.repeat_interleave(copies, dim=0) if src_lengths is not None else None
        prompt = src_ids.new_full((src_ids.shape[0] * copies, 1), model.decoder_start_id)
        prompt_lengths = torch.ones(prompt.shape[0], dtype=torch.int64, device=prompt.device)
        source_lengths = memory_lengths if memory_lengths is not None else torch.full_like(
            prompt_lengths, src_ids.shape[1])
        return prompt, prompt_lengths, source_lengths, lambda ids, lengths, cache: model.next_token_logits(
            ids, lengths, memory, memory_lengths, cache)
    if not isinstance(model, DecoderLM):
        raise ValueError(f"model of type {type(model).__name__}: expected a DecoderLM or a Seq2SeqLM")
    if input_ids is None or src_ids is not None:
        raise ValueError("DecoderLM generation takes input_ids (and lengths), not src_ids")
    run_checks(token_checks(config, input_ids, lengths, None))
    if lengths is None:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.int64, device=input_ids.device)
    # Trim the padding every row has, so the buffer holds the longest prompt plus the new tokens.
    longest = int(lengths.max())
    _check_room(longest, max_new_tokens, config.max_seq_len)
    prompt = input_ids[:, :longest].repeat_interleave(copies, dim=0)
    prompt_lengths = lengths.repeat_interleave(copies, dim=0)
    return prompt, prompt_lengths, prompt_lengths, model.next_token_logits


def _check_room(prompt_length: int, max_new_tokens: int, max_seq_len: int) -> None:
    """The model reads the prompt and every new token but the last: together they must fit max_seq_len."""
    if prompt_length + max_new_tokens - 1 > max_seq_len:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: the longest prompt ({prompt_length} tokens) plus the "
                         f"new tokens but the last must fit max_seq_len = {max_seq_len}")


def _length_limits(source_lengths: Tensor, max_new_tokens: int, max_len_a: float, max_len_b: int | None) -> Tensor:
    """(R,) the most tokens each row may generate (see generate's max_len_a and max_len_b)."""
    if max_len_b is None:
        return torch.full_like(source_lengths, max_new_tokens)
    # In Python floats, as fairseq computes it (a float32 tensor product could round a limit down by one).
    limits = [min(max(int(max_len_a * length + max_len_b), 1), max_new_tokens) for length in source_lengths.tolist()]
    return torch.tensor(limits, device=source_lengths.device)


def repeated_ngram_bans(ids: Tensor, lengths: Tensor, size: int, vocab_size: int) -> Tensor:
    """(R, vocab_size) bool: True for each token that, written after row r's tokens ids[r, :lengths[r]], would
    complete an n-gram of `size` tokens that the row already holds (transformers' NoRepeatNGramLogitsProcessor)."""
    rows, width = ids.shape
    bans = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=ids.device)
    if width < size:
        return bans[:, :vocab_size]
    windows = ids.unfold(1, size, 1)                                                # (R, W - size + 1, size)
    starts = torch.arange(windows.shape[1], device=ids.device)
    complete = starts[None, :] + size <= lengths[:, None]                           # n-grams inside the row
    # The row's last size - 1 tokens (clamped positions where the row is shorter: no complete n-gram there anyway).
    suffix_positions = lengths[:, None] - (size - 1) + torch.arange(size - 1, device=ids.device)
    suffix = ids.gather(1, suffix_positions.clamp(min=0))                           # (R, size - 1)
    repeats = complete & (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)       # (R, W - size + 1)
    # An n-gram that does not start with the suffix bans the extra last column, dropped after: no masked scatter.
    bans.scatter_(1, windows[..., -1].masked_fill(~repeats, vocab_size), True)
    return bans[:, :vocab_size]


class _Rows:
    """The growing token rows (R, prompt + new) with their lengths, and how to get the scores of their next token."""

    def __init__(self, ids: Tensor, lengths: Tensor, cache: KVCache | None, next_logits: Callable, prompt_width: int,
                 no_repeat_ngram_size: int, eos_id: int):
        self.ids, self.lengths, self.cache = ids, lengths, cache
        self._next_logits, self._prompt_width = next_logits, prompt_width
        self._no_repeat_ngram_size, self._eos_id = no_repeat_ngram_size, eos_id

    def logits(self) -> Tensor:
        """(R, vocab) fp32 logits of the next token of every row."""
        if self.cache is None:
            inputs = self.ids                                          # recompute every row from scratch
        elif not self.cache.filled:
            inputs = self.ids[:, : self._prompt_width]                 # the prompt fills the cache
        else:
            inputs = self.ids.gather(1, (self.lengths - 1)[:, None])   # only the newest token; the rest is cached
        logits = self._next_logits(inputs, self.lengths, self.cache).float()
        # argmax and beam scores would quietly turn NaN into tokens, and sampling would fail inside multinomial.
        # Decoding syncs every step anyway (to stop at eos), so this check costs no extra stall.
        if bool(logits.isnan().any()):
            raise ValueError("the model's next-token logits contain NaN: its weights or activations are not finite")
        return logits

    def without_repeats(self, scores: Tensor) -> Tensor:
        """(R, vocab) logits or log-probabilities, -inf for the tokens that would repeat an n-gram of the row."""
        if not self._no_repeat_ngram_size:
            return scores
        bans = repeated_ngram_bans(self.ids, self.lengths, self._no_repeat_ngram_size, scores.shape[-1])
        # A row with nothing left to say may still stop: an all -inf row has no argmax or distribution to draw from.
        bans[:, self._eos_id] &= ~bans.all(dim=1)
        return scores.masked_fill(bans, float("-inf"))

    def append(self, tokens: Tensor) -> None:
        """Write (R,) tokens after each row's last one. Finished rows keep growing (with pad) so shapes stay even."""
        self.ids.scatter_(1, self.lengths[:, None], tokens[:, None])
        self.lengths += 1

    def reorder(self, rows: Tensor) -> None:
        self.ids, self.lengths = self.ids[rows], self.lengths[rows]
        if self.cache is not None:
            self.cache.reorder(rows)


def _step_by_step(state: _Rows, limits: Tensor, choose: Callable, eos_id: int, pad_id: int) -> Tensor:
    """Greedy or sampled decoding: one token per row per step until every row has produced eos or reached its limit
    of new tokens."""
    rows, max_new_tokens = state.ids.shape[0], int(limits.max())
    generated = state.ids.new_full((rows, max_new_tokens), pad_id)
    finished = torch.zeros(rows, dtype=torch.bool, device=state.ids.device)
    for step in range(max_new_tokens):
        tokens = choose(state.without_repeats(state.logits())).masked_fill(finished, pad_id)
        generated[:, step] = tokens
        finished |= (tokens == eos_id) | (limits == step + 1)
        if bool(finished.all()):     # at the latest at the largest limit
            break
        state.append(tokens)
    return generated[:, : step + 1]


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float, generator) -> Tensor:
    """Draw one token per row from softmax(logits / temperature), cut to the top_k tokens and to the top_p nucleus."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probabilities = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely token always stays.
        drop_sorted = probabilities.cumsum(dim=-1) - probabilities >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


class _Hypotheses:
    """The best finished sequences of one input, at most num_beams, with their length-penalised scores."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.entries: list[tuple[float, Tensor]] = []

    def score(self, sum_log_probs: float, length: int) -> float:
        return sum_log_probs / length ** self.length_penalty

    def add(self, sum_log_probs: float, tokens: Tensor) -> None:
        self.entries.append((self.score(sum_log_probs, tokens.shape[0]), tokens))
        self.entries.sort(key=lambda entry: entry[0], reverse=True)
        del self.entries[self.num_beams:]

    def is_done(self, best_running_sum: float, length: int, early_stopping: bool) -> bool:
        if len(self.entries) < self.num_beams:
            return False
        # With early stopping the beam is full, so stop; otherwise stop once the best running beam, scored at its
        # current length, cannot beat the worst finished hypothesis any more.
        return early_stopping or self.entries[-1][0] >= self.score(best_running_sum, length)


def _beam_search(state: _Rows, limits: Tensor, num_beams: int, length_penalty: float, early_stopping: bool,
                 num_return_sequences: int, eos_id: int, pad_id: int) -> Tensor:
    """Beam search over rows laid out (B * num_beams): input b owns rows b * num_beams ... + num_beams - 1."""
    rows, device = state.ids.shape[0], state.ids.device
    batch = rows // num_beams
    item_limits = limits[::num_beams].tolist()      # the beams of one input share its source, so its limit
    max_new_tokens = max(item_limits)
    beam_sums = torch.zeros(batch, num_beams, device=device)
    beam_sums[:, 1:] = float("-inf")       # all beams start equal: expand only the first one at step 0
    beam_tokens = state.ids.new_full((rows, max_new_tokens), pad_id)
    finished = [_Hypotheses(num_beams, length_penalty) for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        # Forbidden after the softmax, as transformers does: the other tokens keep their log-probabilities.
        log_probs = state.without_repeats(state.logits().log_softmax(dim=-1))       # (R, V)
        vocab = log_probs.shape[-1]
        candidates = (beam_sums.view(rows, 1) + log_probs).view(batch, num_beams * vocab)
        # 2 * num_beams candidates leave num_beams that do not end, however many of the best ones do.
        top_sums, top_index = candidates.topk(2 * num_beams, dim=1)
        top_sums_list, top_index_list = top_sums.tolist(), top_index.tolist()
        parents, tokens, sums = [], [], []
        for item in range(batch):
            first_row = item * num_beams
            if done[item]:
                # Finished inputs keep num_beams dummy rows (pad, score -inf) so the batch stays rectangular.
                parents += range(first_row, first_row + num_beams)
                tokens += [pad_id] * num_beams
                sums += [float("-inf")] * num_beams
                continue
            kept = 0
            for rank, (total, index) in enumerate(zip(top_sums_list[item], top_index_list[item])):
                parent, token = first_row + index // vocab, index % vocab
                if token == eos_id:
                    # Only an eos among the num_beams best is a hypothesis; a worse one would not be a beam either,
                    # nor one of score -inf (forbidden, or after a beam that never started).
                    if rank < num_beams and total != float("-inf"):
                        ended = torch.cat([beam_tokens[parent, :step], beam_tokens.new_tensor([eos_id])])
                        finished[item].add(total, ended)
                    continue
                parents.append(parent)
                tokens.append(token)
                sums.append(total)
                kept += 1
                if kept == num_beams:
                    break
            done[item] = finished[item].is_done(max(sums[-num_beams:]), step + 1, early_stopping)
        rows_kept = torch.tensor(parents, device=device)
        new_tokens = torch.tensor(tokens, device=device, dtype=state.ids.dtype)
        beam_tokens = beam_tokens[rows_kept]
        beam_tokens[:, step] = new_tokens
        beam_sums = torch.tensor(sums, device=device).view(batch, num_beams)
        for item in range(batch):
            if not done[item] and item_limits[item] == step + 1:
                # Out of steps: the running beams compete with the finished hypotheses as they are.
                for beam in range(num_beams):
                    finished[item].add(sums[item * num_beams + beam], beam_tokens[item * num_beams + beam, :step + 1])
                done[item] = True
        if all(done):
            break
        state.reorder(rows_kept)
        state.append(new_tokens)
    best = [tokens for item in range(batch) for _, tokens in finished[item].entries[:num_return_sequences]]
    return torch.nn.utils.rnn.pad_sequence(best, batch_first=True, padding_value=pad_id)
