"""Models that leave fastlm and come back: export to Hugging Face `transformers` directories and import from them.

Each model maps onto the transformers architecture that computes the same function (same logits, same loss):

- EncoderLM, post-norm -> BertForMaskedLM ("bert"), with a token-type embedding of one zero row;
- EncoderLM, pre-norm -> XLMRobertaXLForMaskedLM ("xlm-roberta-xl"), the same, and positions from pad_id + 1;
- EncoderLM, pre-norm with rotary positions -> EsmForMaskedLM ("esm"), rope_theta 10000 only;
- DecoderLM (pre-norm) -> GPT2LMHeadModel ("gpt2"), whose Conv1D weights are (in, out) with q/k/v fused;
- DecoderLM with rotary positions -> GPTNeoXForCausalLM ("gpt_neox"), sequential residual, q/k/v fused per head;
- Seq2SeqLM -> EncoderDecoderModel ("encoder-decoder") of one of the learned-position encoders above (as BertModel
  or XLMRobertaXLModel) and GPT-2 with cross-attention; memory_proj becomes enc_to_dec_proj;
- Seq2SeqLM with rotary positions (either stack) -> remote code ("fastlm-seq2seq"): no transformers architecture has
  a decoder with rotary positions and cross-attention (GPT-NeoX has no cross-attention; ESM's would rotate the
  encoder's keys by the decoder's positions), so the export carries its own model file, fastlm/hf_remote/
  modeling_fastlm.py, loaded with trust_remote_code=True. Its tensors keep fastlm's names.

Pre-norm encoders go to XLM-RoBERTa-XL rather than RoBERTa-PreLayerNorm because the latter normalises its
embeddings and fastlm's pre-norm stack does not. Training-only differences remain there: XLM-RoBERTa-XL has no
dropout on the feed-forward branch, ESM none on the embeddings. ESM's rotary base was fixed at 10000 before recent
transformers versions, which would read another rope_theta as 10000 without a word: it is refused. What no
architecture expresses (sinusoidal positions, SwiGLU, grouped-query attention, a post-norm GPT-2, rotary positions
in a post-norm encoder) is refused with the field that says so, never approximated.

An export carries fastlm's decoding defaults in generation_config.json, so that transformers' generate() without
options returns fastlm's beam-search tokens; only the filler after </s> may differ (transformers fills with
pad_token_id, or with </s> when pad_token_id is 0).

`transformers` is an optional dependency (`pip install -e ".[hf]"`), imported only when a function here needs it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastlm.files import respect_umask
from fastlm.generation import GENERATION_DEFAULTS
from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM
from fastlm.models.base import LanguageModel
from fastlm.tokenizer import Tokenizer

logger = logging.getLogger("fastlm.hf")

REMOTE_SEQ2SEQ = "fastlm-seq2seq"   # the model_type of fastlm/hf_remote/modeling_fastlm.py
# The model_type of a transformers config.json that fastlm exports and `import_model` reads: the transformers class
# of such a model (named: transformers is imported on demand) and the fastlm model it becomes.
MODEL_TYPES = {"bert": ("BertForMaskedLM", EncoderLM), "xlm-roberta-xl": ("XLMRobertaXLForMaskedLM", EncoderLM),
               "esm": ("EsmForMaskedLM", EncoderLM), "gpt2": ("GPT2LMHeadModel", DecoderLM),
               "gpt_neox": ("GPTNeoXForCausalLM", DecoderLM), "encoder-decoder": ("EncoderDecoderModel", Seq2SeqLM),
               REMOTE_SEQ2SEQ: ("FastlmSeq2SeqForConditionalGeneration", Seq2SeqLM)}

# ModelConfig field -> the transformers config field that holds it, per family (max_seq_len is handled apart).
_BERT_FIELDS = dict(vocab_size="vocab_size", d_model="hidden_size", n_layers="num_hidden_layers",
                    n_heads="num_attention_heads", d_ff="intermediate_size", activation="hidden_act",
                    dropout="hidden_dropout_prob", attn_dropout="attention_probs_dropout_prob",
                    init_std="initializer_range", layer_norm_eps="layer_norm_eps", pad_id="pad_token_id",
                    bos_id="bos_token_id", eos_id="eos_token_id", tie_embeddings="tie_word_embeddings")
# ESM has BERT's names; its activation is always exact GELU (no hidden_act), its rotary base rope_theta.
_ESM_FIELDS = {**{ours: theirs for ours, theirs in _BERT_FIELDS.items() if ours != "activation"},
               "rope_theta": "rope_theta"}
_GPT2_FIELDS = dict(vocab_size="vocab_size", d_model="n_embd", n_layers="n_layer", n_heads="n_head", d_ff="n_inner",
                    activation="activation_function", dropout="resid_pdrop", attn_dropout="attn_pdrop",
                    init_std="initializer_range", layer_norm_eps="layer_norm_epsilon", pad_id="pad_token_id",
                    bos_id="bos_token_id", eos_id="eos_token_id", tie_embeddings="tie_word_embeddings")
# GPT-NeoX keeps rope_theta inside rope_parameters (handled apart).
_NEOX_FIELDS = dict(vocab_size="vocab_size", d_model="hidden_size", n_layers="num_hidden_layers",
                    n_heads="num_attention_heads", d_ff="intermediate_size", activation="hidden_act",
                    dropout="hidden_dropout", attn_dropout="attention_dropout", init_std="initializer_range",
                    layer_norm_eps="layer_norm_eps", pad_id="pad_token_id", bos_id="bos_token_id",
                    eos_id="eos_token_id", tie_embeddings="tie_word_embeddings")
_FIELDS = {"bert": _BERT_FIELDS, "xlm-roberta-xl": _BERT_FIELDS, "esm": _ESM_FIELDS, "gpt2": _GPT2_FIELDS,
           "gpt_neox": _NEOX_FIELDS}
ESM_ROPE_THETA = 10000.0   # the only rotary base every transformers version's ESM computes
_ACTIVATIONS = ("gelu", "relu")   # exact GELU and ReLU: the names mean the same function on both sides


def transformers_module():
    """The `transformers` package, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError('Hugging Face export/import needs the transformers package: pip install -e ".[hf]"') from None
    return transformers


def _remote_code():
    """fastlm/hf_remote/modeling_fastlm.py, the model file an export of REMOTE_SEQ2SEQ carries (it needs
    transformers)."""
    transformers_module()
    from fastlm.hf_remote import modeling_fastlm
    return modeling_fastlm


def export_model_type(model: LanguageModel) -> str:
    """The model_type of the transformers architecture `model` is exported as; REMOTE_SEQ2SEQ is fastlm's own model
    file, which transformers loads with trust_remote_code=True."""
    if isinstance(model, EncoderLM):
        return _encoder_type(model.config)
    if isinstance(model, DecoderLM):
        return "gpt_neox" if model.config.positional == "rope" else "gpt2"
    if isinstance(model, Seq2SeqLM):
        rotary = "rope" in (model.encoder_config.positional, model.config.positional)
        return REMOTE_SEQ2SEQ if rotary else "encoder-decoder"
    raise ValueError(f"model of type {type(model).__name__}: expected an EncoderLM, DecoderLM or Seq2SeqLM")


def _encoder_type(config: ModelConfig) -> str:
    """The encoder family of a bidirectional stack (a rotary post-norm one is refused by BERT's checks)."""
    if config.norm_position == "post":
        return "bert"
    return "esm" if config.positional == "rope" else "xlm-roberta-xl"


# ----- weights: one table per architecture, read in both directions -----

@dataclasses.dataclass(frozen=True)
class _Link:
    """The fastlm tensors `ours` stored as the transformers tensor `theirs`.

    layout "same": one tensor as it is. "conv1d": GPT-2's Conv1D keeps weights as (in, out), the transpose of
    nn.Linear's, and fuses several projections (q, k, v) side by side along `out`. "per_head": GPT-NeoX fuses
    q, k and v along nn.Linear's out dimension head by head (q, k, v of head 0, then of head 1, ...), `heads` of
    them. "offset": a position table whose first `offset` rows are never read (RoBERTa numbers positions from
    pad_id + 1; they are written as zeros)."""
    ours: tuple[str, ...]
    theirs: str
    layout: str = "same"
    offset: int = 0
    heads: int = 1

    def to_theirs(self, tensors: list[Tensor]) -> Tensor:
        if self.layout == "conv1d":
            return torch.cat([tensor.t() if tensor.dim() == 2 else tensor for tensor in tensors], dim=-1)
        if self.layout == "per_head":
            stacked = torch.stack(tensors).unflatten(1, (self.heads, -1))   # (3, H, hd, ...)
            return stacked.transpose(0, 1).flatten(0, 2)                    # (H * 3 * hd, ...)
        (tensor,) = tensors
        if self.layout == "offset":
            return torch.cat([tensor.new_zeros(self.offset, tensor.shape[1]), tensor])
        return tensor

    def to_ours(self, tensor: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
        if self.layout == "conv1d":
            widths = [shape[0] for shape in shapes]   # the out width of each fused projection
            return [piece.t() if piece.dim() == 2 else piece for piece in tensor.split(widths, dim=-1)]
        if self.layout == "per_head":
            by_head = tensor.unflatten(0, (self.heads, len(shapes), -1))    # (H, 3, hd, ...)
            return list(by_head.transpose(0, 1).flatten(1, 2).unbind(0))
        if self.layout == "offset":
            return [tensor[self.offset:self.offset + shapes[0][0]]]
        return [tensor]


def _pair(ours: str, theirs: str, layout: str = "same") -> list[_Link]:
    """Weight and bias of a Linear, LayerNorm or Conv1D."""
    return [_Link((f"{ours}.{name}",), f"{theirs}.{name}", layout) for name in ("weight", "bias")]


def _fused(ours: list[str], theirs: str, layout: str = "conv1d", heads: int = 1) -> list[_Link]:
    return [_Link(tuple(f"{name}.{part}" for name in ours), f"{theirs}.{part}", layout, heads=heads)
            for part in ("weight", "bias")]


# The encoder families' names for the two norms of a block; their Linears share BERT's names.
_ENCODER_BLOCK_NORMS = {"bert": ("attention.output.LayerNorm", "output.LayerNorm"),
                        "xlm-roberta-xl": ("attention.self_attn_layer_norm", "LayerNorm"),
                        "esm": ("attention.LayerNorm", "LayerNorm")}


def _encoder_links(config: ModelConfig, ours: str, theirs: str) -> list[_Link]:
    """A bidirectional stack as BERT (post-norm), XLM-RoBERTa-XL (pre-norm) or ESM (pre-norm, rotary)."""
    family = _encoder_type(config)
    links = [_Link((f"{ours}embeddings.token.weight",), f"{theirs}embeddings.word_embeddings.weight")]
    position = ((f"{ours}embeddings.position.weight",), f"{theirs}embeddings.position_embeddings.weight")
    if family == "bert":
        links += [_Link(*position), *_pair(f"{ours}embeddings.norm", f"{theirs}embeddings.LayerNorm")]
    elif family == "xlm-roberta-xl":
        links += [_Link(*position, "offset", config.pad_id + 1),
                  *_pair(f"{ours}final_norm", f"{theirs}encoder.LayerNorm")]
    else:   # ESM: rotary positions, no table
        links += _pair(f"{ours}final_norm", f"{theirs}encoder.emb_layer_norm_after")
    self_attn_norm, ff_norm = _ENCODER_BLOCK_NORMS[family]
    names = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "ff.up_proj": "intermediate.dense", "ff.down_proj": "output.dense",
             "self_attn_norm": self_attn_norm, "ff_norm": ff_norm}
    for layer in range(config.n_layers):
        for our_name, their_name in names.items():
            links += _pair(f"{ours}blocks.{layer}.{our_name}", f"{theirs}encoder.layer.{layer}.{their_name}")
    return links


def _masked_lm_head_links(config: ModelConfig) -> list[_Link]:
    family = _encoder_type(config)
    bert = family == "bert"
    head = "cls.predictions." if bert else "lm_head."
    transform = "cls.predictions.transform." if bert else "lm_head."
    norm = "LayerNorm" if bert else "layer_norm"
    links = [*_pair("head.dense", f"{transform}dense"), *_pair("head.norm", f"{transform}{norm}"),
             _Link(("head.output.weight",), f"{head}decoder.weight"), _Link(("head.output.bias",), f"{head}bias")]
    if family != "esm":   # ESM adds its bias after a decoder Linear without one
        # transformers keeps the output bias twice (the head's and the decoder Linear's, tied): both are written.
        links.append(_Link(("head.output.bias",), f"{head}decoder.bias"))
    return links


def _gpt2_links(config: ModelConfig, ours: str, theirs: str, *, cross_attention: bool) -> list[_Link]:
    links = [_Link((f"{ours}embeddings.token.weight",), f"{theirs}wte.weight"),
             _Link((f"{ours}embeddings.position.weight",), f"{theirs}wpe.weight"),
             *_pair(f"{ours}final_norm", f"{theirs}ln_f")]
    for layer in range(config.n_layers):
        block, h = f"{ours}blocks.{layer}.", f"{theirs}h.{layer}."
        links += [*_pair(f"{block}self_attn_norm", f"{h}ln_1"),
                  *_fused([f"{block}self_attn.{p}_proj" for p in "qkv"], f"{h}attn.c_attn"),
                  *_pair(f"{block}self_attn.out_proj", f"{h}attn.c_proj", "conv1d"),
                  *_pair(f"{block}ff_norm", f"{h}ln_2"),
                  *_pair(f"{block}ff.up_proj", f"{h}mlp.c_fc", "conv1d"),
                  *_pair(f"{block}ff.down_proj", f"{h}mlp.c_proj", "conv1d")]
        if cross_attention:
            links += [*_pair(f"{block}cross_attn_norm", f"{h}ln_cross_attn"),
                      *_pair(f"{block}cross_attn.q_proj", f"{h}crossattention.q_attn", "conv1d"),
                      *_fused([f"{block}cross_attn.{p}_proj" for p in "kv"], f"{h}crossattention.c_attn"),
                      *_pair(f"{block}cross_attn.out_proj", f"{h}crossattention.c_proj", "conv1d")]
    return links


def _neox_links(config: ModelConfig, ours: str, theirs: str) -> list[_Link]:
    links = [_Link((f"{ours}embeddings.token.weight",), f"{theirs}embed_in.weight"),
             *_pair(f"{ours}final_norm", f"{theirs}final_layer_norm")]
    for layer in range(config.n_layers):
        block, h = f"{ours}blocks.{layer}.", f"{theirs}layers.{layer}."
        links += [*_pair(f"{block}self_attn_norm", f"{h}input_layernorm"),
                  *_fused([f"{block}self_attn.{p}_proj" for p in "qkv"], f"{h}attention.query_key_value",
                          "per_head", config.n_heads),
                  *_pair(f"{block}self_attn.out_proj", f"{h}attention.dense"),
                  *_pair(f"{block}ff_norm", f"{h}post_attention_layernorm"),
                  *_pair(f"{block}ff.up_proj", f"{h}mlp.dense_h_to_4h"),
                  *_pair(f"{block}ff.down_proj", f"{h}mlp.dense_4h_to_h")]
    return links


def _links(model: LanguageModel) -> list[_Link]:
    model_type = export_model_type(model)
    if model_type == REMOTE_SEQ2SEQ:   # fastlm's own model file keeps fastlm's names
        return [_Link((name,), name) for name in model.state_dict()]
    if isinstance(model, EncoderLM):
        prefix = {"bert": "bert.", "xlm-roberta-xl": "roberta.", "esm": "esm."}[model_type]
        return _encoder_links(model.config, "body.", prefix) + _masked_lm_head_links(model.config)
    if isinstance(model, DecoderLM):
        body = (_neox_links(model.config, "body.", "gpt_neox.") if model_type == "gpt_neox"
                else _gpt2_links(model.config, "body.", "transformer.", cross_attention=False))
        return body + [_Link(("lm_head.weight",), "lm_head.weight")]
    links = _encoder_links(model.encoder_config, "encoder.", "encoder.") + _gpt2_links(
        model.config, "decoder.", "decoder.transformer.", cross_attention=True) + [
        _Link(("lm_head.weight",), "decoder.lm_head.weight")]
    if model.memory_proj is not None:
        links += _pair("memory_proj", "enc_to_dec_proj")
    return links


def _unused_by_fastlm(name: str) -> bool:
    """transformers tensors with no fastlm counterpart: written as zeros (token types are read back only to fold
    into positions), except those its model computes from its config (_computed_from_config)."""
    return (name.endswith("token_type_embeddings.weight") or ".pooler." in name or name.startswith("pooler.")
            or ".contact_head." in name or _computed_from_config(name))


def _computed_from_config(name: str) -> bool:
    """ESM's rotary frequencies, a buffer it saves: written as the model computes them from rope_theta."""
    return name.endswith("rotary_embeddings.inv_freq")


# ----- configs -----

def _refuse_unsupported(config: ModelConfig, role: str, architecture: str, norm_positions: tuple[str, ...],
                        activations: tuple[str, ...], positionals: tuple[str, ...] = ("learned",)) -> None:
    """ValueError naming the first field of `config` that `architecture` cannot express."""
    problems = [
        ("positional", config.positional, config.positional in positionals, f"one of {list(positionals)}"),
        ("activation", config.activation, config.activation in activations, f"one of {list(activations)}"),
        ("n_kv_heads", config.n_kv_heads, config.n_kv_heads in (None, config.n_heads),
         f"None or n_heads = {config.n_heads} (no grouped-query attention)"),
        ("norm_position", config.norm_position, config.norm_position in norm_positions,
         f"one of {list(norm_positions)}"),
    ]
    for field, value, fine, expected in problems:
        if not fine:
            raise ValueError(f"{role} ModelConfig.{field} = {value!r} has no equivalent in {architecture}: "
                             f"expected {expected}")


def _encoder_config(transformers, config: ModelConfig, role: str, *, with_head: bool):
    """BertConfig (post-norm), XLMRobertaXLConfig (pre-norm) or EsmConfig (pre-norm, rotary) for an encoder stack."""
    family = _encoder_type(config)
    if family == "esm":
        return _esm_config(transformers, config, role)
    post = family == "bert"
    # BERT's MLM head applies hidden_act, fastlm's always GELU; XLM-RoBERTa-XL's head is GELU like ours.
    activations = ("gelu",) if post and with_head else _ACTIVATIONS
    _refuse_unsupported(config, role, "BERT" if post else "XLM-RoBERTa-XL", (config.norm_position,), activations)
    values = {theirs: getattr(config, ours) for ours, theirs in _BERT_FIELDS.items()}
    # One token type whose embedding is zero: adding it changes nothing. RoBERTa's positions start at pad_id + 1.
    values.update(type_vocab_size=1, max_position_embeddings=config.max_seq_len + (0 if post else config.pad_id + 1))
    return (transformers.BertConfig if post else transformers.XLMRobertaXLConfig)(**values)


def _esm_config(transformers, config: ModelConfig, role: str):
    # ESM's layers and head apply exact GELU, whatever the config says.
    _refuse_unsupported(config, role, "ESM", ("pre",), ("gelu",), positionals=("rope",))
    if config.rope_theta != ESM_ROPE_THETA:
        raise ValueError(f"{role} ModelConfig.rope_theta = {config.rope_theta} has no portable equivalent in ESM: "
                         f"expected {ESM_ROPE_THETA} (transformers versions before ESM's rope_theta fix the rotary "
                         "base there and would read another without a word)")
    values = {theirs: getattr(config, ours) for ours, theirs in _ESM_FIELDS.items()}
    # No embedding norm (pre-norm stacks normalise in the blocks) and no rescaling of the embeddings by the share of
    # <mask> tokens in a row (ESM-2's token_dropout): the embeddings are the token rows, as fastlm's.
    values.update(position_embedding_type="rotary", max_position_embeddings=config.max_seq_len,
                  emb_layer_norm_before=False, token_dropout=False)
    return transformers.EsmConfig(**values)


def _gpt2_config(transformers, config: ModelConfig, role: str, *, cross_attention: bool):
    _refuse_unsupported(config, role, "GPT-2", ("pre",), _ACTIVATIONS)
    values = {theirs: getattr(config, ours) for ours, theirs in _GPT2_FIELDS.items()}
    values.update(n_positions=config.max_seq_len, embd_pdrop=config.dropout, add_cross_attention=cross_attention,
                  is_decoder=cross_attention)
    return transformers.GPT2Config(**values)


def _neox_config(transformers, config: ModelConfig, role: str):
    _refuse_unsupported(config, role, "GPT-NeoX", ("pre",), _ACTIVATIONS, positionals=("rope",))
    values = {theirs: getattr(config, ours) for ours, theirs in _NEOX_FIELDS.items()}
    # Every dimension of a head rotated (GPT-NeoX rotates a quarter by default), and the feed-forward layer reading
    # the attention's output (use_parallel_residual=False) instead of running beside it on the same input.
    values.update(max_position_embeddings=config.max_seq_len, use_parallel_residual=False, attention_bias=True,
                  rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta,
                                   "partial_rotary_factor": 1.0})
    return transformers.GPTNeoXConfig(**values)


def _remote_seq2seq_config(remote, model: Seq2SeqLM):
    """The config of fastlm's own model file: both ModelConfigs as they are, within what that file computes."""
    for config, role in ((model.encoder_config, "Seq2SeqLM encoder"), (model.config, "Seq2SeqLM decoder")):
        _refuse_unsupported(config, role, "fastlm's remote code", ("pre", "post"), _ACTIVATIONS,
                            positionals=("learned", "rope"))
    decoder = model.config
    return remote.FastlmSeq2SeqConfig(encoder_stack=model.encoder_config.to_dict(), decoder_stack=decoder.to_dict(),
                                      share_embeddings=model.share_embeddings,
                                      decoder_start_token_id=model.decoder_start_id, pad_token_id=decoder.pad_id,
                                      bos_token_id=decoder.bos_id, eos_token_id=decoder.eos_id)


def _required(hf_config, field: str) -> Any:
    value = getattr(hf_config, field, None)
    if value is None:
        raise ValueError(f"{hf_config.model_type} config {field} = None: fastlm needs it (set it in config.json to "
                         f"the id your tokenizer uses)")
    return value


def _config_from_transformers(hf_config, *, with_head: bool = True) -> ModelConfig:
    """The ModelConfig of a BERT, XLM-RoBERTa-XL, ESM, GPT-2 or GPT-NeoX transformers config; ValueError naming a
    field that has no fastlm equivalent."""
    model_type = hf_config.model_type
    fields = _FIELDS[model_type]
    values = {ours: _required(hf_config, theirs) if ours.endswith("_id") else getattr(hf_config, theirs)
              for ours, theirs in fields.items()}
    checks = []
    if "activation" in fields:
        activations = ("gelu",) if model_type == "bert" and with_head else _ACTIVATIONS
        checks.append((fields["activation"], values["activation"] in activations, f"one of {list(activations)} "
                       "(exact GELU: fastlm has no tanh-approximated 'gelu_new')"))
    decoder = model_type in ("gpt2", "gpt_neox")
    if model_type == "gpt2":
        values.update(max_seq_len=hf_config.n_positions, norm_position="pre",
                      d_ff=hf_config.n_inner or 4 * hf_config.n_embd)   # GPT-2's None means 4 x width
        checks += [("scale_attn_weights", hf_config.scale_attn_weights, "True"),
                   ("scale_attn_by_inverse_layer_idx", not hf_config.scale_attn_by_inverse_layer_idx, "False")]
    elif model_type == "gpt_neox":
        rope = hf_config.rope_parameters
        values.update(max_seq_len=hf_config.max_position_embeddings, norm_position="pre", positional="rope",
                      rope_theta=rope["rope_theta"])
        whole_heads = rope.get("rope_type", "default") == "default" and rope.get("partial_rotary_factor", 1.0) == 1.0
        checks += [("use_parallel_residual", not hf_config.use_parallel_residual, "False"),
                   ("attention_bias", hf_config.attention_bias, "True"),
                   ("rope_parameters", whole_heads, "rope_type 'default' with partial_rotary_factor 1.0")]
    elif model_type == "esm":
        values.update(activation="gelu", max_seq_len=hf_config.max_position_embeddings, norm_position="pre",
                      positional="rope")
        checks += [("position_embedding_type", hf_config.position_embedding_type == "rotary", "'rotary'"),
                   ("emb_layer_norm_before", not hf_config.emb_layer_norm_before, "False"),
                   ("token_dropout", not hf_config.token_dropout, "False")]
    else:
        post = model_type == "bert"
        offset = 0 if post else values["pad_id"] + 1
        values.update(max_seq_len=hf_config.max_position_embeddings - offset, norm_position="post" if post else "pre")
        position_type = getattr(hf_config, "position_embedding_type", None)
        checks += [("position_embedding_type", position_type in (None, "absolute"), "'absolute'"),
                   ("max_position_embeddings", values["max_seq_len"] > 0, f"more than pad_token_id + 1 = {offset}")]
    if with_head:
        checks.append(("is_decoder", not getattr(hf_config, "is_decoder", False) or decoder, "False"))
    for field, fine, expected in checks:
        if not fine:
            raise ValueError(f"{model_type} config {field} = {getattr(hf_config, field, None)!r} has no fastlm "
                             f"equivalent: expected {expected}")
    return ModelConfig(**values)


# ----- models -----

def _model_class(transformers, model_type: str):
    """The transformers class of a model_type of MODEL_TYPES."""
    class_name, _ = MODEL_TYPES[model_type]
    if model_type == REMOTE_SEQ2SEQ:   # fastlm's own copy of the file: nothing from an export directory runs
        return getattr(_remote_code(), class_name)
    return getattr(transformers, class_name)


def to_transformers(model: LanguageModel):
    """The transformers model (in memory) that computes what `model` computes, holding copies of its weights."""
    transformers = transformers_module()
    model_type = export_model_type(model)
    if model_type == REMOTE_SEQ2SEQ:
        config = _remote_seq2seq_config(_remote_code(), model)
    elif isinstance(model, EncoderLM):
        config = _encoder_config(transformers, model.config, "EncoderLM", with_head=True)
    elif isinstance(model, DecoderLM):
        config = (_neox_config(transformers, model.config, "DecoderLM") if model_type == "gpt_neox"
                  else _gpt2_config(transformers, model.config, "DecoderLM", cross_attention=False))
    else:
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
            _encoder_config(transformers, model.encoder_config, "Seq2SeqLM encoder", with_head=False),
            _gpt2_config(transformers, model.config, "Seq2SeqLM decoder", cross_attention=True))
        config.decoder_start_token_id, config.pad_token_id = model.decoder_start_id, model.config.pad_id
        config.eos_token_id = model.config.eos_id
    hf_model = _model_class(transformers, model_type)(config)
    ours = model.state_dict()
    theirs = {link.theirs: link.to_theirs([ours[name] for name in link.ours]) for link in _links(model)}
    expected = {name for name in hf_model.state_dict() if not _unused_by_fastlm(name)}
    if set(theirs) != expected:   # a transformers version that renamed something: better to stop than to guess
        raise ValueError(f"the {type(hf_model).__name__} of this transformers version does not match fastlm's map: "
                         f"unmapped {sorted(expected - set(theirs))[:5]}, unknown {sorted(set(theirs) - expected)[:5]}")
    state = hf_model.state_dict()
    theirs.update({name: state[name] if _computed_from_config(name) else torch.zeros_like(state[name])
                   for name in state if _unused_by_fastlm(name)})
    hf_model.load_state_dict(theirs, strict=True)
    if not isinstance(model, EncoderLM):
        config = model.config
        start = model.decoder_start_id if isinstance(model, Seq2SeqLM) else None
        hf_model.generation_config.update(decoder_start_token_id=start, bos_token_id=config.bos_id,
                                          eos_token_id=config.eos_id, pad_token_id=config.pad_id,
                                          **_generation_settings(config))
    like = next(model.parameters())
    return hf_model.to(device=like.device, dtype=like.dtype).train(model.training)


def _generation_settings(decoder_config: ModelConfig) -> dict[str, Any]:
    """fastlm's decoding defaults as GenerationConfig fields: transformers' generate() without options then decodes
    as `fastlm translate` (a decoder: as generate(strategy="beam")) does, with the same beam width, length penalty
    and early stopping. Both divide a finished hypothesis' summed log-probability by its generated length, </s>
    included, the start token or prompt not.

    max_new_tokens is capped at the decoder's max_seq_len, the most fastlm generates after a one-token prompt (a
    translator's start token): past it transformers would index beyond the position table where fastlm refuses."""
    settings = dataclasses.asdict(GENERATION_DEFAULTS)
    settings["max_new_tokens"] = min(settings["max_new_tokens"], decoder_config.max_seq_len)
    return settings


def from_transformers(hf_model) -> LanguageModel:
    """The fastlm model that computes what a transformers model of MODEL_TYPES computes, holding copies of its
    weights. A token-type embedding is folded into the positions (fastlm has no segments: every token is type 0);
    identical encoder and decoder token embeddings of an EncoderDecoderModel come back as share_embeddings=True."""
    model_type = getattr(hf_model.config, "model_type", None)
    class_name, kind = MODEL_TYPES.get(model_type, (None, None))
    if type(hf_model).__name__ != class_name:
        raise ValueError(f"model of type {type(hf_model).__name__}: expected one of "
                         f"{[name for name, _ in MODEL_TYPES.values()]}")
    theirs = dict(hf_model.state_dict())
    _fold_token_types(theirs)
    if model_type == "encoder-decoder":
        model = _seq2seq_of_encoder_decoder(hf_model.config, theirs)
    elif model_type == REMOTE_SEQ2SEQ:
        config = hf_model.config
        model = Seq2SeqLM(ModelConfig.from_dict(config.encoder_stack), ModelConfig.from_dict(config.decoder_stack),
                          share_embeddings=config.share_embeddings)
    else:
        model = kind(_config_from_transformers(hf_model.config))
    if isinstance(model, Seq2SeqLM) and hf_model.config.decoder_start_token_id != model.decoder_start_id:
        raise ValueError(f"{model_type} config decoder_start_token_id = {hf_model.config.decoder_start_token_id!r}: "
                         f"fastlm's decoder starts from {model.decoder_start_id}")
    links = _links(model)
    unread = sorted(name for name in set(theirs) - {link.theirs for link in links} if not _unused_by_fastlm(name))
    if unread:
        raise ValueError(f"{type(hf_model).__name__} holds {len(unread)} tensors fastlm has no place for, e.g. "
                         f"{unread[:3]}: its config enables something fastlm does not have")
    ours = model.state_dict()
    values: dict[str, Tensor] = {}
    for link in links:
        if link.ours[0] in values:   # a tensor transformers keeps twice: read the first
            continue
        if link.theirs not in theirs:
            raise ValueError(f"{type(hf_model).__name__} has no tensor {link.theirs}: its config lacks something "
                             f"fastlm's {type(model).__name__} has (e.g. add_cross_attention for a decoder)")
        pieces = link.to_ours(theirs[link.theirs], [ours[name].shape for name in link.ours])
        for name, piece in zip(link.ours, pieces):
            if piece.shape != ours[name].shape:
                raise ValueError(f"{link.theirs} of shape {tuple(theirs[link.theirs].shape)} does not give fastlm's "
                                 f"{name} of shape {tuple(ours[name].shape)}")
            values[name] = piece
    model.load_state_dict(values, strict=True)
    like = next(hf_model.parameters())
    return model.to(device=like.device, dtype=like.dtype).train(hf_model.training)


def _seq2seq_of_encoder_decoder(config, theirs: dict[str, Tensor]) -> Seq2SeqLM:
    """The (untrained) Seq2SeqLM of an EncoderDecoderModel's config and state."""
    encoder_type, decoder_type = config.encoder.model_type, config.decoder.model_type
    if encoder_type not in ("bert", "xlm-roberta-xl"):
        raise ValueError(f"encoder-decoder config encoder.model_type = {encoder_type!r}: expected 'bert' or "
                         f"'xlm-roberta-xl'")
    if decoder_type != "gpt2":
        raise ValueError(f"encoder-decoder config decoder.model_type = {decoder_type!r}: expected 'gpt2'")
    encoder_config = _config_from_transformers(config.encoder, with_head=False)
    decoder_config = _config_from_transformers(config.decoder, with_head=False)
    source, target = theirs["encoder.embeddings.word_embeddings.weight"], theirs["decoder.transformer.wte.weight"]
    shared = source.shape == target.shape and torch.equal(source, target)
    return Seq2SeqLM(encoder_config, decoder_config, share_embeddings=shared)


def _fold_token_types(state: dict[str, Tensor]) -> None:
    """Add the type-0 token-type embedding to every position: fastlm reads positions only, and every token of
    ours is of type 0. A zero row (what export writes) is left out so that the round trip stays bitwise exact."""
    for name in [name for name in state if name.endswith("embeddings.token_type_embeddings.weight")]:
        type_zero = state[name][0]
        if bool(type_zero.any()):
            positions = name.replace("token_type_embeddings", "position_embeddings")
            state[positions] = state[positions] + type_zero


# ----- directories -----

def export_model(model: LanguageModel, tokenizer: Tokenizer, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` and `tokenizer` as a directory that transformers loads with AutoModelForMaskedLM /
    AutoModelForCausalLM / AutoModelForSeq2SeqLM and AutoTokenizer; a translation model with rotary positions brings
    its model file (export_model_type gives REMOTE_SEQ2SEQ), loaded with trust_remote_code=True. A non-empty `output`
    is replaced only with overwrite=True; the directory appears whole or not at all (it is written beside it, then
    renamed)."""
    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output {str(output)!r} exists and is not empty: choose another directory or "
                              "replace it with --overwrite")
    _check_tokenizer_fits(model, tokenizer)
    hf_model = to_transformers(model)
    staging = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hf_model.save_pretrained(staging)
        for weights in staging.glob("*.safetensors"):   # safetensors writes them owner-only, whatever the umask
            respect_umask(weights)
        _save_tokenizer(model, tokenizer, staging)
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def import_model(directory: str | Path) -> LanguageModel:
    """The fastlm model of a local transformers directory of a model_type in MODEL_TYPES; nothing is downloaded, and
    no code from the directory runs (a fastlm-seq2seq export is read by fastlm's own copy of its model file).
    Tensors the checkpoint lacks are a ValueError, except an MLM head, which is left randomly initialised with a
    warning (fine-tuning into a Seq2SeqLM drops it)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing, expected a transformers model directory")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{config_path}: not a JSON object ({error})") from None
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_path} has model_type = {model_type!r}: expected one of {list(MODEL_TYPES)}")
    model_class = _model_class(transformers_module(), model_type)
    hf_model, info = model_class.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    missing = sorted(name for name in info["missing_keys"] if not _unused_by_fastlm(name))
    body = [name for name in missing if not name.startswith(("cls.", "lm_head."))]
    if body:
        raise ValueError(f"{directory}: the checkpoint lacks {len(body)} tensors of the model, e.g. {body[:3]}")
    if missing:
        logger.warning("%s: no MLM head in the checkpoint (%s): it is initialised at random", directory,
                       ", ".join(missing))
    return from_transformers(hf_model.eval())


def _check_tokenizer_fits(model: LanguageModel, tokenizer: Tokenizer) -> None:
    for config in ([model.encoder_config, model.config] if isinstance(model, Seq2SeqLM) else [model.config]):
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the model's vocab_size = {config.vocab_size} differs from the tokenizer's "
                             f"{tokenizer.vocab_size}: export with the tokenizer the model was trained with")
        for field, token_id in (("pad_id", tokenizer.pad_id), ("bos_id", tokenizer.bos_id),
                                ("eos_id", tokenizer.eos_id)):
            if getattr(config, field) != token_id:
                raise ValueError(f"the model's {field} = {getattr(config, field)} differs from the tokenizer's "
                                 f"{token_id}: export with the tokenizer the model was trained with")


def _save_tokenizer(model: LanguageModel, tokenizer: Tokenizer, directory: Path) -> None:
    """tokenizer.json plus the special tokens, so that AutoTokenizer.from_pretrained(directory) encodes as fastlm.

    Encoder inputs (MLM and translation sources) are wrapped as in training, <s> text </s>, by a post-processor;
    a decoder's prompt is left as it is and padded on the left, as transformers' generate expects."""
    path = directory / "tokenizer.json"
    tokenizer.save_huggingface(path)
    decoder_only = isinstance(model, DecoderLM)
    if not decoder_only:
        document = json.loads(path.read_text(encoding="utf-8"))
        bos, eos = tokenizer.id_to_token(tokenizer.bos_id), tokenizer.id_to_token(tokenizer.eos_id)
        document["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}
                               for token, token_id in ((bos, tokenizer.bos_id), (eos, tokenizer.eos_id))},
        }
        path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    specials = {role: tokenizer.id_to_token(token_id) for role, token_id in (
        ("pad_token", tokenizer.pad_id), ("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
        ("mask_token", tokenizer.mask_id)) if token_id is not None}
    max_length = (model.encoder_config if isinstance(model, Seq2SeqLM) else model.config).max_seq_len
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": max_length,
                "padding_side": "left" if decoder_only else "right", "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
