"""Models that leave fastlm and come back: export to Hugging Face `transformers` directories and import from them.

Each model maps onto the transformers architecture that computes the same function (same logits, same loss):

- EncoderLM, post-norm -> BertForMaskedLM ("bert"), with a token-type embedding of one zero row;
- EncoderLM, pre-norm -> XLMRobertaXLForMaskedLM ("xlm-roberta-xl"), the same, and positions from pad_id + 1;
- DecoderLM (pre-norm) -> GPT2LMHeadModel ("gpt2"), whose Conv1D weights are (in, out) with q/k/v fused;
- Seq2SeqLM -> EncoderDecoderModel ("encoder-decoder") of one of the encoders above (as BertModel or
  XLMRobertaXLModel) and GPT-2 with cross-attention; memory_proj becomes enc_to_dec_proj.

Pre-norm encoders go to XLM-RoBERTa-XL rather than RoBERTa-PreLayerNorm because the latter normalises its
embeddings and fastlm's pre-norm stack does not. One training-only difference remains there: XLM-RoBERTa-XL has no
dropout on the feed-forward branch. What no architecture expresses (rotary or sinusoidal positions, SwiGLU,
grouped-query attention, a post-norm GPT-2) is refused with the field that says so, never approximated.

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

from fastlm.generation import GENERATION_DEFAULTS
from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM
from fastlm.models.base import LanguageModel
from fastlm.tokenizer import Tokenizer

logger = logging.getLogger("fastlm.hf")

# The model_type of a transformers config.json that `import_model` reads, and the fastlm model it becomes.
MODEL_TYPES = {"bert": "EncoderLM", "xlm-roberta-xl": "EncoderLM", "gpt2": "DecoderLM",
               "encoder-decoder": "Seq2SeqLM"}

# ModelConfig field -> the transformers config field that holds it, per family (max_seq_len is handled apart).
_BERT_FIELDS = dict(vocab_size="vocab_size", d_model="hidden_size", n_layers="num_hidden_layers",
                    n_heads="num_attention_heads", d_ff="intermediate_size", activation="hidden_act",
                    dropout="hidden_dropout_prob", attn_dropout="attention_probs_dropout_prob",
                    init_std="initializer_range", layer_norm_eps="layer_norm_eps", pad_id="pad_token_id",
                    bos_id="bos_token_id", eos_id="eos_token_id", tie_embeddings="tie_word_embeddings")
_GPT2_FIELDS = dict(vocab_size="vocab_size", d_model="n_embd", n_layers="n_layer", n_heads="n_head", d_ff="n_inner",
                    activation="activation_function", dropout="resid_pdrop", attn_dropout="attn_pdrop",
                    init_std="initializer_range", layer_norm_eps="layer_norm_epsilon", pad_id="pad_token_id",
                    bos_id="bos_token_id", eos_id="eos_token_id", tie_embeddings="tie_word_embeddings")
_ACTIVATIONS = ("gelu", "relu")   # exact GELU and ReLU: the names mean the same function on both sides


def transformers_module():
    """The `transformers` package, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError('Hugging Face export/import needs the transformers package: pip install -e ".[hf]"') from None
    return transformers


# ----- weights: one table per architecture, read in both directions -----

@dataclasses.dataclass(frozen=True)
class _Link:
    """The fastlm tensors `ours` stored as the transformers tensor `theirs`.

    layout "same": one tensor as it is. "conv1d": GPT-2's Conv1D keeps weights as (in, out), the transpose of
    nn.Linear's, and fuses several projections (q, k, v) side by side along `out`. "offset": a position table whose
    first `offset` rows are never read (RoBERTa numbers positions from pad_id + 1; they are written as zeros)."""
    ours: tuple[str, ...]
    theirs: str
    layout: str = "same"
    offset: int = 0

    def to_theirs(self, tensors: list[Tensor]) -> Tensor:
        if self.layout == "conv1d":
            return torch.cat([tensor.t() if tensor.dim() == 2 else tensor for tensor in tensors], dim=-1)
        (tensor,) = tensors
        if self.layout == "offset":
            return torch.cat([tensor.new_zeros(self.offset, tensor.shape[1]), tensor])
        return tensor

    def to_ours(self, tensor: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
        if self.layout == "conv1d":
            widths = [shape[0] for shape in shapes]   # the out width of each fused projection
            return [piece.t() if piece.dim() == 2 else piece for piece in tensor.split(widths, dim=-1)]
        if self.layout == "offset":
            return [tensor[self.offset:self.offset + shapes[0][0]]]
        return [tensor]


def _pair(ours: str, theirs: str, layout: str = "same") -> list[_Link]:
    """Weight and bias of a Linear, LayerNorm or Conv1D."""
    return [_Link((f"{ours}.{name}",), f"{theirs}.{name}", layout) for name in ("weight", "bias")]


def _fused(ours: list[str], theirs: str) -> list[_Link]:
    return [_Link(tuple(f"{name}.{part}" for name in ours), f"{theirs}.{part}", "conv1d")
            for part in ("weight", "bias")]


def _encoder_links(config: ModelConfig, ours: str, theirs: str) -> list[_Link]:
    """A bidirectional stack as BERT (post-norm) or XLM-RoBERTa-XL (pre-norm); the two share their attention names."""
    post = config.norm_position == "post"
    links = [_Link((f"{ours}embeddings.token.weight",), f"{theirs}embeddings.word_embeddings.weight"),
             _Link((f"{ours}embeddings.position.weight",), f"{theirs}embeddings.position_embeddings.weight",
                   "same" if post else "offset", 0 if post else config.pad_id + 1)]
    links += (_pair(f"{ours}embeddings.norm", f"{theirs}embeddings.LayerNorm") if post
              else _pair(f"{ours}final_norm", f"{theirs}encoder.LayerNorm"))
    names = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "ff.up_proj": "intermediate.dense", "ff.down_proj": "output.dense",
             "self_attn_norm": "attention.output.LayerNorm" if post else "attention.self_attn_layer_norm",
             "ff_norm": "output.LayerNorm" if post else "LayerNorm"}
    for layer in range(config.n_layers):
        for our_name, their_name in names.items():
            links += _pair(f"{ours}blocks.{layer}.{our_name}", f"{theirs}encoder.layer.{layer}.{their_name}")
    return links


def _masked_lm_head_links(config: ModelConfig) -> list[_Link]:
    head = "cls.predictions." if config.norm_position == "post" else "lm_head."
    transform = "cls.predictions.transform." if config.norm_position == "post" else "lm_head."
    norm = "LayerNorm" if config.norm_position == "post" else "layer_norm"
    # transformers keeps the output bias twice (the head's and the decoder Linear's, tied): both are written.
    return [*_pair("head.dense", f"{transform}dense"), *_pair("head.norm", f"{transform}{norm}"),
            _Link(("head.output.weight",), f"{head}decoder.weight"), _Link(("head.output.bias",), f"{head}bias"),
            _Link(("head.output.bias",), f"{head}decoder.bias")]


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


def _links(model: LanguageModel) -> list[_Link]:
    if isinstance(model, EncoderLM):
        prefix = "bert." if model.config.norm_position == "post" else "roberta."
        return _encoder_links(model.config, "body.", prefix) + _masked_lm_head_links(model.config)
    if isinstance(model, DecoderLM):
        return _gpt2_links(model.config, "body.", "transformer.", cross_attention=False) + [
            _Link(("lm_head.weight",), "lm_head.weight")]
    links = _encoder_links(model.encoder_config, "encoder.", "encoder.") + _gpt2_links(
        model.config, "decoder.", "decoder.transformer.", cross_attention=True) + [
        _Link(("lm_head.weight",), "decoder.lm_head.weight")]
    if model.memory_proj is not None:
        links += _pair("memory_proj", "enc_to_dec_proj")
    return links


def _unused_by_fastlm(name: str) -> bool:
    """transformers tensors with no fastlm counterpart: written as zeros, read only to fold into positions."""
    return name.endswith("token_type_embeddings.weight") or ".pooler." in name or name.startswith("pooler.")


# ----- configs -----

def _refuse_unsupported(config: ModelConfig, role: str, architecture: str, norm_position: str,
                        activations: tuple[str, ...]) -> None:
    """ValueError naming the first field of `config` that `architecture` cannot express."""
    problems = [
        ("positional", config.positional, config.positional == "learned", "'learned' (absolute learned positions)"),
        ("activation", config.activation, config.activation in activations, f"one of {list(activations)}"),
        ("n_kv_heads", config.n_kv_heads, config.n_kv_heads in (None, config.n_heads),
         f"None or n_heads = {config.n_heads} (no grouped-query attention)"),
        ("norm_position", config.norm_position, config.norm_position == norm_position, repr(norm_position)),
    ]
    for field, value, fine, expected in problems:
        if not fine:
            raise ValueError(f"{role} ModelConfig.{field} = {value!r} has no equivalent in {architecture}: "
                             f"expected {expected}")


def _encoder_config(transformers, config: ModelConfig, role: str, *, with_head: bool):
    """BertConfig (post-norm) or XLMRobertaXLConfig (pre-norm) for an encoder stack."""
    post = config.norm_position == "post"
    # BERT's MLM head applies hidden_act, fastlm's always GELU; XLM-RoBERTa-XL's head is GELU like ours.
    activations = ("gelu",) if post and with_head else _ACTIVATIONS
    _refuse_unsupported(config, role, "BERT" if post else "XLM-RoBERTa-XL", config.norm_position, activations)
    values = {theirs: getattr(config, ours) for ours, theirs in _BERT_FIELDS.items()}
    # One token type whose embedding is zero: adding it changes nothing. RoBERTa's positions start at pad_id + 1.
    values.update(type_vocab_size=1, max_position_embeddings=config.max_seq_len + (0 if post else config.pad_id + 1))
    return (transformers.BertConfig if post else transformers.XLMRobertaXLConfig)(**values)


def _gpt2_config(transformers, config: ModelConfig, role: str, *, cross_attention: bool):
    _refuse_unsupported(config, role, "GPT-2", "pre", _ACTIVATIONS)
    values = {theirs: getattr(config, ours) for ours, theirs in _GPT2_FIELDS.items()}
    values.update(n_positions=config.max_seq_len, embd_pdrop=config.dropout, add_cross_attention=cross_attention,
                  is_decoder=cross_attention)
    return transformers.GPT2Config(**values)


def _required(hf_config, field: str) -> Any:
    value = getattr(hf_config, field, None)
    if value is None:
        raise ValueError(f"{hf_config.model_type} config {field} = None: fastlm needs it (set it in config.json to "
                         f"the id your tokenizer uses)")
    return value


def _config_from_transformers(hf_config, *, with_head: bool = True) -> ModelConfig:
    """The ModelConfig of a BERT, XLM-RoBERTa-XL or GPT-2 transformers config; ValueError naming a field that has
    no fastlm equivalent."""
    model_type = hf_config.model_type
    gpt2 = model_type == "gpt2"
    fields = _GPT2_FIELDS if gpt2 else _BERT_FIELDS
    values = {ours: _required(hf_config, theirs) if ours.endswith("_id") else getattr(hf_config, theirs)
              for ours, theirs in fields.items()}
    activation_field = fields["activation"]
    activations = ("gelu",) if model_type == "bert" and with_head else _ACTIVATIONS
    checks = [(activation_field, values["activation"] in activations, f"one of {list(activations)} (exact GELU: "
               "fastlm has no tanh-approximated 'gelu_new')")]
    if gpt2:
        values.update(max_seq_len=hf_config.n_positions, norm_position="pre",
                      d_ff=hf_config.n_inner or 4 * hf_config.n_embd)   # GPT-2's None means 4 x width
        checks += [("scale_attn_weights", hf_config.scale_attn_weights, "True"),
                   ("scale_attn_by_inverse_layer_idx", not hf_config.scale_attn_by_inverse_layer_idx, "False")]
    else:
        post = model_type == "bert"
        offset = 0 if post else values["pad_id"] + 1
        values.update(max_seq_len=hf_config.max_position_embeddings - offset, norm_position="post" if post else "pre")
        position_type = getattr(hf_config, "position_embedding_type", None)
        checks += [("position_embedding_type", position_type in (None, "absolute"), "'absolute'"),
                   ("max_position_embeddings", values["max_seq_len"] > 0, f"more than pad_token_id + 1 = {offset}")]
    if with_head:
        checks.append(("is_decoder", not getattr(hf_config, "is_decoder", False) or gpt2, "False"))
    for field, fine, expected in checks:
        if not fine:
            raise ValueError(f"{model_type} config {field} = {getattr(hf_config, field, None)!r} has no fastlm "
                             f"equivalent: expected {expected}")
    return ModelConfig(**values)


# ----- models -----

def to_transformers(model: LanguageModel):
    """The transformers model (in memory) that computes what `model` computes, holding copies of its weights."""
    transformers = transformers_module()
    if isinstance(model, EncoderLM):
        config = _encoder_config(transformers, model.config, "EncoderLM", with_head=True)
        hf_model = (transformers.BertForMaskedLM if model.config.norm_position == "post"
                    else transformers.XLMRobertaXLForMaskedLM)(config)
    elif isinstance(model, DecoderLM):
        hf_model = transformers.GPT2LMHeadModel(_gpt2_config(transformers, model.config, "DecoderLM",
                                                             cross_attention=False))
    elif isinstance(model, Seq2SeqLM):
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
            _encoder_config(transformers, model.encoder_config, "Seq2SeqLM encoder", with_head=False),
            _gpt2_config(transformers, model.config, "Seq2SeqLM decoder", cross_attention=True))
        config.decoder_start_token_id, config.pad_token_id = model.decoder_start_id, model.config.pad_id
        config.eos_token_id = model.config.eos_id
        hf_model = transformers.EncoderDecoderModel(config=config)
    else:
        raise ValueError(f"model of type {type(model).__name__}: expected an EncoderLM, DecoderLM or Seq2SeqLM")
    ours = model.state_dict()
    theirs = {link.theirs: link.to_theirs([ours[name] for name in link.ours]) for link in _links(model)}
    expected = {name for name in hf_model.state_dict() if not _unused_by_fastlm(name)}
    if set(theirs) != expected:   # a transformers version that renamed something: better to stop than to guess
        raise ValueError(f"the {type(hf_model).__name__} of this transformers version does not match fastlm's map: "
                         f"unmapped {sorted(expected - set(theirs))[:5]}, unknown {sorted(set(theirs) - expected)[:5]}")
    state = hf_model.state_dict()
    theirs.update({name: torch.zeros_like(state[name]) for name in state if _unused_by_fastlm(name)})
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
    """The fastlm model that computes what a BertForMaskedLM, XLMRobertaXLForMaskedLM, GPT2LMHeadModel or an
    EncoderDecoderModel of these computes, holding copies of its weights. A token-type embedding is folded into the
    positions (fastlm has no segments: every token is type 0); identical encoder and decoder token embeddings of an
    EncoderDecoderModel come back as share_embeddings=True."""
    kinds = {"BertForMaskedLM": EncoderLM, "XLMRobertaXLForMaskedLM": EncoderLM, "GPT2LMHeadModel": DecoderLM,
             "EncoderDecoderModel": Seq2SeqLM}
    kind = kinds.get(type(hf_model).__name__)
    if kind is None:
        raise ValueError(f"model of type {type(hf_model).__name__}: expected one of {list(kinds)}")
    theirs = dict(hf_model.state_dict())
    _fold_token_types(theirs)
    if kind is Seq2SeqLM:
        encoder_type, decoder_type = hf_model.config.encoder.model_type, hf_model.config.decoder.model_type
        if encoder_type not in ("bert", "xlm-roberta-xl"):
            raise ValueError(f"encoder-decoder config encoder.model_type = {encoder_type!r}: expected 'bert' or "
                             f"'xlm-roberta-xl'")
        if decoder_type != "gpt2":
            raise ValueError(f"encoder-decoder config decoder.model_type = {decoder_type!r}: expected 'gpt2'")
        encoder_config = _config_from_transformers(hf_model.config.encoder, with_head=False)
        decoder_config = _config_from_transformers(hf_model.config.decoder, with_head=False)
        source, target = theirs["encoder.embeddings.word_embeddings.weight"], theirs["decoder.transformer.wte.weight"]
        shared = source.shape == target.shape and torch.equal(source, target)
        model = Seq2SeqLM(encoder_config, decoder_config, share_embeddings=shared)
        start = hf_model.config.decoder_start_token_id
        if start != model.decoder_start_id:
            raise ValueError(f"encoder-decoder config decoder_start_token_id = {start!r}: fastlm's decoder starts from "
                             f"{model.decoder_start_id}")
    else:
        model = kind(_config_from_transformers(hf_model.config))
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
    AutoModelForCausalLM / EncoderDecoderModel and AutoTokenizer. A non-empty `output` is replaced only with
    overwrite=True; the directory appears whole or not at all (it is written beside it, then renamed)."""
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
    """The fastlm model of a local transformers directory (BERT, XLM-RoBERTa-XL, GPT-2 or an encoder-decoder of
    them); nothing is downloaded. Tensors the checkpoint lacks are a ValueError, except an MLM head, which is left
    randomly initialised with a warning (fine-tuning into a Seq2SeqLM drops it)."""
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
    transformers = transformers_module()
    loaders = {"bert": transformers.AutoModelForMaskedLM, "xlm-roberta-xl": transformers.AutoModelForMaskedLM,
               "gpt2": transformers.AutoModelForCausalLM, "encoder-decoder": transformers.EncoderDecoderModel}
    hf_model, info = loaders[model_type].from_pretrained(directory, local_files_only=True, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    body = [name for name in missing if not name.startswith(("cls.", "lm_head.")) and not _unused_by_fastlm(name)]
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
