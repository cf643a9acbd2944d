"""fastlm's translation model (Seq2SeqLM) as transformers remote code.

No transformers architecture has a decoder with rotary positions and cross-attention, so `fastlm export` writes this
file beside the weights of such a translation model and names it in config.json's auto_map:

    model = AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True)

loads it, and model.generate() decodes as `fastlm translate` does (the export's generation_config.json holds fastlm's
decoding defaults). The file imports torch and transformers only, never fastlm, so it runs where fastlm is not
installed; fastlm's tests hold it to Seq2SeqLM's function (logits, loss, greedy and beam-search tokens). Its tensor
names are Seq2SeqLM's, so the weights are a Seq2SeqLM state dict as it is.

Each stack (config.encoder_stack and config.decoder_stack hold fastlm's ModelConfig of each, as a dict): token
embeddings plus learned positions, or rotary positions on the queries and keys of self-attention; blocks of
self-attention (causal in the decoder), cross-attention to the encoder's output (decoder only) and a GELU or ReLU
feed-forward layer, each a residual branch with pre- or post-norm; a final norm after a pre-norm stack. A linear
projection carries the encoder's output to the decoder's width when the two differ.

Generation recomputes the decoder over the whole prefix at every step instead of keeping a key/value cache: correct
in every generation mode whatever transformers' cache classes become, at the price of T(T+1)/2 decoder token
passes for T generated tokens instead of T (fine for sentences, slow for long outputs).

Shapes: B batch, S source tokens, T target tokens, D width, H heads, hd head width.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

IGNORE_INDEX = -100   # labels without a target, as everywhere in transformers
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}   # exact (erf) GELU, as fastlm's


class FastlmSeq2SeqConfig(PretrainedConfig):
    model_type = "fastlm-seq2seq"

    def __init__(self, encoder_stack: dict | None = None, decoder_stack: dict | None = None,
                 share_embeddings: bool = False, decoder_start_token_id: int | None = None, **kwargs):
        # None only where transformers builds a default config to compare against; a model needs both stacks.
        self.encoder_stack = encoder_stack or {}
        self.decoder_stack = decoder_stack or {}
        self.share_embeddings = share_embeddings   # the decoder reads the encoder's token embedding
        self.decoder_start_token_id = decoder_start_token_id
        kwargs["is_encoder_decoder"] = True
        # transformers ties weights only when this is true; which ones, the model says (_tied_weights_keys).
        kwargs["tie_word_embeddings"] = bool(share_embeddings or self.decoder_stack.get("tie_embeddings"))
        super().__init__(**kwargs)


def stack_settings(values: dict, role: str) -> SimpleNamespace:
    """The settings of one stack, or a ValueError naming the first one this file does not compute."""
    settings = SimpleNamespace(**values)
    problems = [("positional", settings.positional in ("learned", "rope"), "'learned' or 'rope'"),
                ("activation", settings.activation in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
                ("n_kv_heads", settings.n_kv_heads in (None, settings.n_heads), "None or n_heads"),
                ("norm_position", settings.norm_position in ("pre", "post"), "'pre' or 'post'")]
    for field, fine, expected in problems:
        if not fine:
            raise ValueError(f"{role} {field} = {getattr(settings, field)!r}: expected {expected}")
    return settings


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary positions for (B, H, T, hd) queries or keys at (B, T) positions: dimensions i and i + hd/2 form a pair
    rotated by the angle position * theta ** (-i / (hd/2)) (GPT-NeoX's rotate-half layout)."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = (positions.float()[..., None] * frequencies)[:, None]   # (B, 1, T, hd/2), the same for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def token_positions(mask: Tensor | None, length: int, device: torch.device) -> Tensor:
    """(B or 1, T) position of each token: the real tokens of a row count from 0, whichever side its padding is on."""
    if mask is None:
        return torch.arange(length, device=device)[None]
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def keys_allowed(mask: Tensor | None) -> Tensor | None:
    """(B, 1, 1, keys) True for the keys a query may attend to (not padding), from a (B, keys) 0/1 mask."""
    return None if mask is None else mask.bool()[:, None, None, :]


def layer_norm(settings: SimpleNamespace) -> nn.LayerNorm:
    return nn.LayerNorm(settings.d_model, eps=settings.layer_norm_eps)


class Attention(nn.Module):
    """Multi-head attention over the input itself (rotary positions when configured) or over a memory."""

    def __init__(self, settings: SimpleNamespace):
        super().__init__()
        self.settings = settings
        width = settings.d_model
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        heads = self.settings.n_heads
        return x.view(batch, length, heads, width // heads).transpose(1, 2)   # (B, H, T, hd)

    def forward(self, x: Tensor, allowed: Tensor | None, positions: Tensor | None = None,
                memory: Tensor | None = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). allowed: (B or 1, 1, T, keys), True where a query may attend to a key."""
        source = x if memory is None else memory
        q, k, v = (self._split_heads(projection(tensor)) for projection, tensor in
                   ((self.q_proj, x), (self.k_proj, source), (self.v_proj, source)))
        if memory is None and self.settings.positional == "rope":
            q, k = rotate(q, positions, self.settings.rope_theta), rotate(k, positions, self.settings.rope_theta)
        dropout = self.settings.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)   # scale 1/sqrt(hd)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, settings: SimpleNamespace):
        super().__init__()
        self.up_proj = nn.Linear(settings.d_model, settings.d_ff)
        self.down_proj = nn.Linear(settings.d_ff, settings.d_model)
        self.activation = ACTIVATIONS[settings.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activation(self.up_proj(x)))


class Block(nn.Module):
    """Self-attention, cross-attention (decoder), feed-forward: each a residual branch with pre- or post-norm."""

    def __init__(self, settings: SimpleNamespace, *, cross_attention: bool):
        super().__init__()
        self.pre_norm = settings.norm_position == "pre"
        self.self_attn, self.self_attn_norm = Attention(settings), layer_norm(settings)
        self.cross_attn = Attention(settings) if cross_attention else None
        self.cross_attn_norm = layer_norm(settings) if cross_attention else None
        self.ff, self.ff_norm = FeedForward(settings), layer_norm(settings)
        self.dropout = nn.Dropout(settings.dropout)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, branch) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))

    def forward(self, x: Tensor, allowed: Tensor | None, positions: Tensor, memory: Tensor | None,
                memory_allowed: Tensor | None) -> Tensor:
        x = self._residual(x, self.self_attn_norm, lambda h: self.self_attn(h, allowed, positions))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, memory_allowed, memory=memory))
        return self._residual(x, self.ff_norm, self.ff)


class Embeddings(nn.Module):
    def __init__(self, settings: SimpleNamespace):
        super().__init__()
        self.token = nn.Embedding(settings.vocab_size, settings.d_model)
        learned = settings.positional == "learned"
        self.position = nn.Embedding(settings.max_seq_len, settings.d_model) if learned else None
        # Post-norm normalises the embeddings; pre-norm leaves that to the first block's norm.
        post = settings.norm_position == "post"
        self.norm = layer_norm(settings) if post else nn.Identity()
        self.dropout = nn.Dropout(settings.dropout)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.token(input_ids)
        if self.position is not None:
            x = x + self.position(positions)
        return self.dropout(self.norm(x))


class Stack(nn.Module):
    """Embeddings, blocks and (pre-norm) the final norm: the encoder, or with causal=True and cross-attention the
    decoder."""

    main_input_name = "input_ids"   # generate() asks an encoder-decoder's encoder what its input is called

    def __init__(self, settings: SimpleNamespace, *, causal: bool, cross_attention: bool = False):
        super().__init__()
        self.causal = causal
        self.embeddings = Embeddings(settings)
        self.blocks = nn.ModuleList(Block(settings, cross_attention=cross_attention)
                                    for _ in range(settings.n_layers))
        pre = settings.norm_position == "pre"
        self.final_norm = layer_norm(settings) if pre else nn.Identity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, **unused) -> BaseModelOutput:
        """input_ids (B, T) with attention_mask (B, T), 1 for real tokens -> last_hidden_state (B, T, D). memory
        (B, S, D) with memory_mask (B, S): what cross-attention reads. `unused`: the options transformers passes to
        every encoder (return_dict, output_attentions, ...)."""
        length, device = input_ids.shape[1], input_ids.device
        positions = token_positions(attention_mask, length, device)
        allowed = keys_allowed(attention_mask)
        if self.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            allowed = causal if allowed is None else allowed & causal
        if allowed is not None:
            # Every query may attend to itself, so that no row of a padding query is empty: SDPA would return NaN
            # there, and masked keys still multiply their values by 0 (0 * NaN = NaN) in the next layer.
            allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
        x = self.embeddings(input_ids, positions)
        for block in self.blocks:
            x = block(x, allowed, positions, memory, keys_allowed(memory_mask))
        return BaseModelOutput(last_hidden_state=self.final_norm(x))


class FastlmSeq2SeqForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = FastlmSeq2SeqConfig

    def __init__(self, config: FastlmSeq2SeqConfig):
        super().__init__(config)
        source = stack_settings(config.encoder_stack, "encoder_stack")
        target = stack_settings(config.decoder_stack, "decoder_stack")
        self.encoder = Stack(source, causal=False)
        self.decoder = Stack(target, causal=True, cross_attention=True)
        widths_differ = source.d_model != target.d_model
        self.memory_proj = nn.Linear(source.d_model, target.d_model) if widths_differ else None
        self.lm_head = nn.Linear(target.d_model, target.vocab_size, bias=False)
        # fastlm's tying, declared rather than assigned: transformers then saves one copy of a tied matrix and ties
        # the names again on loading (config.tie_word_embeddings turns this on).
        decoder_embedding = "decoder.embeddings.token.weight"
        source_embedding = "encoder.embeddings.token.weight" if config.share_embeddings else decoder_embedding
        self._tied_weights_keys = {}
        if config.share_embeddings:
            self._tied_weights_keys[decoder_embedding] = source_embedding
        if target.tie_embeddings:
            self._tied_weights_keys["lm_head.weight"] = source_embedding
        self.post_init()

    def get_encoder(self) -> Stack:
        return self.encoder

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No cache for generate() to create, even with use_cache=True: the decoder is recomputed at each step."""
        return False

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                encoder_outputs: BaseModelOutput | tuple | None = None, labels: Tensor | None = None,
                **unused) -> Seq2SeqLMOutput:
        """input_ids (B, S): the source, with attention_mask (B, S); decoder_input_ids (B, T): the decoder's input,
        beginning with config.decoder_start_token_id, or else made from labels (B, T) shifted right, as
        EncoderDecoderModel does. loss: the mean cross-entropy over the labels that are not -100. `unused`: options
        of transformers' calls (return_dict, use_cache, ...)."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask)
        memory = encoder_outputs[0]                                            # (B, S, encoder D)
        if self.memory_proj is not None:
            memory = self.memory_proj(memory)
        if decoder_input_ids is None:
            start = labels.new_full((labels.shape[0], 1), self.config.decoder_start_token_id)
            shifted = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.config.pad_token_id)
            decoder_input_ids = torch.cat([start, shifted], dim=1)
        hidden = self.decoder(decoder_input_ids, decoder_attention_mask, memory=memory,
                              memory_mask=attention_mask).last_hidden_state    # (B, T, D)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoder_outputs[0])

    def prepare_inputs_for_generation(self, input_ids: Tensor, encoder_outputs=None, attention_mask=None,
                                      decoder_attention_mask=None, **unused) -> dict:
        """Every step gets the whole decoder prefix and no cache: the decoder is recomputed (see the module
        docstring), whatever the cache options say."""
        return {"decoder_input_ids": input_ids, "encoder_outputs": encoder_outputs, "attention_mask": attention_mask,
                "decoder_attention_mask": decoder_attention_mask}


# Registered so that save_pretrained copies this file beside the weights and names it in config.json's auto_map.
FastlmSeq2SeqConfig.register_for_auto_class()
FastlmSeq2SeqForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
