"""Seq2SeqLM: an encoder-decoder translation model, from scratch or merged from a pre-trained EncoderLM and DecoderLM."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import LanguageModel, ModelOutput, ignore_padding, lm_output, run_checks, token_checks
from .blocks import TransformerStack
from .config import ModelConfig
from .decoder import DecoderLM, last_token_states, output_projection
from .encoder import EncoderLM
from .kv_cache import KVCache
from .packing import paired_packing_checks

logger = logging.getLogger("fastlm.models")

# How from_pretrained initialises the decoder's new cross-attention (see its docstring).
CROSS_ATTENTION_INITS = ("random", "copy-self", "zero-out")
# Measured on ko->en (docs/RESULTS.md, section 4: tiny scale, Enc2Dec, one seed per init): copy-self made the merged
# model read its source most at both tokenizer levels. Its source gap was 0.133 against 0.111 (random) and 0.115
# (zero-out) at byte level, six to seven times the gap's seed noise there (0.003); 0.147 against 0.115 and 0.123 at
# char level, about the seed noise there (0.024). Validation loss and chrF were within noise, and BLEU at byte level;
# at char level its BLEU, 0.94 against 0.72-0.75, was above by more than BLEU's seed noise (0.08). It costs nothing
# over "random".
DEFAULT_CROSS_ATTENTION_INIT = "copy-self"


class Seq2SeqLM(LanguageModel):
    """A bidirectional encoder over the source and a causal decoder whose blocks also attend to the encoder output.

    The encoder keeps its embedding, the decoder its own (tied to the output projection when its config says so);
    share_embeddings=True makes them one matrix (the encoder's). A linear projection carries the encoder output to
    the decoder's width when the two differ.

    The decoder starts from </s> (`decoder_start_id`, BART's convention), not <s>: the causal pre-training stream
    is `sentence </s> sentence </s> ...` (CausalLMBatches), so </s> is the token a pre-trained decoder has read
    right before every sentence it learned to begin, and a merged decoder starts translating from the same state.
    Training (forward), generation and the batches (targets `sentence </s>`, no start token) all follow it."""

    def __init__(self, encoder_config: ModelConfig, decoder_config: ModelConfig, *, share_embeddings: bool = False):
        super().__init__()
        if not isinstance(share_embeddings, bool):  # a config.json may hold "yes", which would pass as true
            raise ValueError(f"share_embeddings = {share_embeddings!r}: expected true or false")
        if encoder_config.vocab_size != decoder_config.vocab_size:
            raise ValueError(f"decoder vocab_size = {decoder_config.vocab_size}: expected the encoder's, "
                             f"{encoder_config.vocab_size} (both sides must use one tokenizer)")
        if share_embeddings and encoder_config.d_model != decoder_config.d_model:
            raise ValueError(f"share_embeddings=True with encoder d_model = {encoder_config.d_model} and decoder "
                             f"d_model = {decoder_config.d_model}: expected equal widths")
        self.encoder_config, self.share_embeddings = encoder_config, share_embeddings
        self.config = decoder_config   # generation reads the special ids and max_seq_len of the decoder
        self.encoder = TransformerStack(encoder_config, causal=False)
        self.decoder = TransformerStack(decoder_config, causal=True, cross_attention=True)
        if share_embeddings:
            # One Parameter for both sides, by plain assignment (before the output projection may tie to it too).
            self.decoder.embeddings.token.weight = self.encoder.embeddings.token.weight
        self.memory_proj = None
        if encoder_config.d_model != decoder_config.d_model:
            self.memory_proj = nn.Linear(encoder_config.d_model, decoder_config.d_model)
            nn.init.normal_(self.memory_proj.weight, std=decoder_config.init_std)
            nn.init.zeros_(self.memory_proj.bias)
        self.lm_head = output_projection(decoder_config, self.decoder)

    @property
    def decoder_start_id(self) -> int:
        """The token the decoder reads before the first target token: </s> (see the class docstring)."""
        return self.config.eos_id

    def encode(self, src_ids: Tensor, src_lengths: Tensor | None, src_cu_seqlens: Tensor | None = None) -> Tensor:
        """(B, S) source ids -> (B, S, decoder d_model) memory for the decoder's cross-attention; src_cu_seqlens:
        packed source rows (see forward)."""
        memory = self.encoder(src_ids, src_lengths, cu_seqlens=src_cu_seqlens)
        return self.memory_proj(memory) if self.memory_proj is not None else memory

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        src_lengths: Tensor | None = None,
        tgt_lengths: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool = False,
        label_smoothing: float = 0.0,
        src_cu_seqlens: Tensor | None = None,
        tgt_cu_seqlens: Tensor | None = None,
    ) -> ModelOutput:
        """src_ids (B, S); tgt_ids (B, T): the target without a start token, ending with </s>. The decoder reads
        decoder_start_id followed by tgt_ids[:, :-1] (teacher forcing) and position t is scored against labels[t]
        (pass tgt_ids; positions at or beyond tgt_lengths are ignored). label_smoothing: as in F.cross_entropy (see
        EncoderLM.forward).

        src_cu_seqlens, tgt_cu_seqlens (n + 1,): packed pairs, several to a row (TranslationBatches with
        packed=True): the offsets of the n source sequences in the flattened (B * S) src_ids and of their n
        translations in the flattened (B * T) tgt_ids, each row's padding tails a pair of their own (see
        packing.py). The encoder attends within each source sequence, the decoder causally within each target
        sequence and across to the source sequence of its index, and the shift behind decoder_start_id is within
        each target sequence: every pair computes what it computes alone. Lengths still count each row's real
        tokens."""
        checks = (token_checks(self.encoder_config, src_ids, src_lengths, None, names=("src_ids", "src_lengths", ""))
                  + token_checks(self.config, tgt_ids, tgt_lengths, labels, names=("tgt_ids", "tgt_lengths", "labels")))
        if tgt_ids.shape[0] != src_ids.shape[0]:
            raise ValueError(f"tgt_ids of shape {tuple(tgt_ids.shape)}: expected {src_ids.shape[0]} rows, one per row "
                             f"of src_ids {tuple(src_ids.shape)}")
        if src_cu_seqlens is not None or tgt_cu_seqlens is not None:
            checks += paired_packing_checks(src_cu_seqlens, src_ids, tgt_cu_seqlens, tgt_ids)
        run_checks(checks)
        memory = self.encode(src_ids, src_lengths, src_cu_seqlens)           # (B, S, D)
        decoder_input = shifted_right(tgt_ids, self.decoder_start_id, tgt_cu_seqlens)
        hidden = self.decoder(decoder_input, tgt_lengths, memory=memory, memory_lengths=src_lengths,
                              cu_seqlens=tgt_cu_seqlens, memory_cu_seqlens=src_cu_seqlens)
        targets = ignore_padding(labels, tgt_lengths) if labels is not None else None
        return lm_output(hidden, self.lm_head, targets, return_logits, label_smoothing)

    @torch.no_grad()
    def next_token_logits(
        self, input_ids: Tensor, lengths: Tensor, memory: Tensor, memory_lengths: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """(B, vocab_size) logits after each row's last real decoder token, attending to `memory` (from encode).
        Inputs as for DecoderLM.next_token_logits (the decoder input starts with decoder_start_id)."""
        stepping = cache is not None and cache.filled
        hidden = self.decoder(input_ids, lengths, memory=memory, memory_lengths=memory_lengths, cache=cache)
        return self.lm_head(last_token_states(hidden, lengths, stepping))

    @classmethod
    def from_pretrained(
        cls,
        encoder: EncoderLM | str | Path,
        decoder: DecoderLM | str | Path,
        *,
        cross_attention_init: str = DEFAULT_CROSS_ATTENTION_INIT,
        share_embeddings: bool = False,
    ) -> Seq2SeqLM:
        """Merge a pre-trained EncoderLM and DecoderLM (objects or checkpoint directories).

        Every tensor of the encoder stack and the decoder stack is copied; each decoder block gains cross-attention
        (and its norm), initialised by `cross_attention_init`:
        - "random": normal(0, init_std) like a fresh layer (Rothe et al. 2020);
        - "copy-self": copied from the block's self-attention and its norm;
        - "zero-out": random, but the output projection zero, so the branch adds nothing at first: with pre-norm
          blocks the merged decoder computes exactly the pre-trained LM at step 0 (post-norm still renormalises the
          stream once more per block), and the output projection's gradient opens the branch.
        The MLM head is dropped. The new tensors and their parameter count are logged on the "fastlm.models"
        logger."""
        if cross_attention_init not in CROSS_ATTENTION_INITS:
            raise ValueError(f"cross_attention_init = {cross_attention_init!r}: expected one of {CROSS_ATTENTION_INITS}")
        encoder = EncoderLM.load(encoder) if isinstance(encoder, (str, Path)) else encoder
        decoder = DecoderLM.load(decoder) if isinstance(decoder, (str, Path)) else decoder
        if not isinstance(encoder, EncoderLM):
            raise ValueError(f"encoder of type {type(encoder).__name__}: expected an EncoderLM or its directory")
        if not isinstance(decoder, DecoderLM):
            raise ValueError(f"decoder of type {type(decoder).__name__}: expected a DecoderLM or its directory")
        model = cls(encoder.config, decoder.config, share_embeddings=share_embeddings)
        missing, unexpected = model.decoder.load_state_dict(decoder.body.state_dict(), strict=False)
        if unexpected or any(".cross_attn" not in name for name in missing):
            raise ValueError(f"decoder state does not fit: unexpected {unexpected}, missing {missing}")
        # The encoder is loaded after the decoder so that a shared embedding ends up holding the encoder's values.
        model.encoder.load_state_dict(encoder.body.state_dict())
        if not decoder.config.tie_embeddings:
            model.lm_head.load_state_dict(decoder.lm_head.state_dict())
        for block in model.decoder.blocks:
            if cross_attention_init == "copy-self":
                block.cross_attn.load_state_dict(block.self_attn.state_dict())
                block.cross_attn_norm.load_state_dict(block.self_attn_norm.state_dict())
            elif cross_attention_init == "zero-out":
                nn.init.zeros_(block.cross_attn.out_proj.weight)
                nn.init.zeros_(block.cross_attn.out_proj.bias)
        new = {f"decoder.{name}": model.decoder.get_parameter(name) for name in missing}
        if model.memory_proj is not None:
            new.update({f"memory_proj.{name}": tensor for name, tensor in model.memory_proj.named_parameters()})
        _log_new_tensors(new, cross_attention_init, share_embeddings)
        like = next(decoder.parameters())
        return model.to(device=like.device, dtype=like.dtype)

    def config_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder_config.to_dict(), "decoder": self.config.to_dict(),
                "share_embeddings": self.share_embeddings}

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> Seq2SeqLM:
        return cls(ModelConfig.from_dict(values["encoder"]), ModelConfig.from_dict(values["decoder"]),
                   share_embeddings=values["share_embeddings"])

    def attention_spans(self, length: float) -> list[tuple[int, int, float]]:
        """Per target token, with `length` source and target tokens: encoder self-attention over the source,
        decoder self-attention over the target and cross-attention over the source."""
        source, target = self.encoder_config, self.config
        return [(source.n_layers, source.d_model, length), (target.n_layers, target.d_model, length),
                (target.n_layers, target.d_model, length)]


def shifted_right(tgt_ids: Tensor, start_id: int, cu_seqlens: Tensor | None) -> Tensor:
    """(B, T) -> (B, T): every target sequence (each row, or each sequence of cu_seqlens in the flattened rows)
    moved one token right behind start_id, its last token dropped: what the decoder reads under teacher forcing.
    Within each sequence, so that no packed pair reads the end of the pair before it."""
    flat = tgt_ids.reshape(-1)
    if cu_seqlens is None:
        starts = torch.arange(0, flat.numel(), tgt_ids.shape[1], device=flat.device)
    else:
        starts = cu_seqlens[:-1].long()
    return flat.roll(1).index_fill(0, starts, start_id).view_as(tgt_ids)


def _log_new_tensors(new: dict[str, Tensor], cross_attention_init: str, share_embeddings: bool) -> None:
    total = sum(tensor.numel() for tensor in new.values())
    lines = [f"  {name} {tuple(tensor.shape)}: {tensor.numel():,}" for name, tensor in new.items()]
    logger.info("Seq2SeqLM.from_pretrained: %d new tensors, %s parameters (cross-attention init %r, any "
                "memory_proj random):\n%s", len(new), f"{total:,}", cross_attention_init, "\n".join(lines))
    if share_embeddings:
        logger.info("Seq2SeqLM.from_pretrained: the decoder's token embedding is replaced by the encoder's "
                    "(share_embeddings=True)")
