"""ModelConfig: the one typed description of a transformer stack, its presets and its JSON form."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

AttnImpl = Literal["fastlm", "sdpa", "eager"]


@dataclass
class ModelConfig:
    vocab_size: int = 32000          # the tokenizer's vocab size; ids must lie in [0, vocab_size)
    d_model: int = 512               # width of the residual stream
    n_layers: int = 6                # transformer blocks in the stack
    n_heads: int = 8                 # query heads; d_model must divide evenly among them
    n_kv_heads: int | None = None    # key/value heads (grouped-query attention); None = n_heads (plain multi-head)
    d_ff: int = 2048                 # hidden width of the feed-forward layer
    max_seq_len: int = 512           # longest sequence the model accepts (size of the learned position table)
    # 0.1: on ko-en fine-tuning (3 epochs) 0.3 with attention dropout 0.1 lost 0.7 chrF and 0.2 BLEU on the valid
    # split, both significant (docs/RESULTS.md, 6).
    dropout: float = 0.1             # on embeddings and on each residual branch
    attn_dropout: float = 0.0        # on attention probabilities (0 keeps the fused kernels on their fast path)
    norm_position: Literal["pre", "post"] = "pre"   # pre-norm trains stably without warm-up; post = original/BERT
    positional: Literal["learned", "sinusoidal", "rope"] = "learned"  # how token positions are encoded
    activation: Literal["gelu", "relu", "swiglu"] = "gelu"  # of the feed-forward layer
    tie_embeddings: bool = True      # output projection shares the input embedding (one tensor, fewer parameters)
    init_std: float = 0.02           # std of the normal init of every weight matrix (GPT-2 / BERT value)
    layer_norm_eps: float = 1e-5     # added to the variance in every layer norm
    rope_theta: float = 10000.0      # base of the rotary frequencies (only with positional="rope")
    pad_id: int = 0                  # the tokenizer's default special-token layout: <pad>=0, <s>=1, </s>=2
    bos_id: int = 1                  # begins every MLM row and translation source: <s> sentence </s>
    eos_id: int = 2                  # ends every sentence; the Seq2SeqLM decoder also starts from it (see Seq2SeqLM)
    attn_impl: AttnImpl = "fastlm"   # fastlm kernels (torch SDPA on CPU), torch SDPA, or readable eager math

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            setattr(self, field.name, _checked(field.name, getattr(self, field.name), hints[field.name]))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)}: expected a positive integer")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise ValueError(f"ModelConfig.n_kv_heads = {self.n_kv_heads}: expected a positive integer or None")
        for name in ("init_std", "layer_norm_eps", "rope_theta"):
            if not 0.0 < getattr(self, name) < math.inf:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)}: expected a positive finite number")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model = {self.d_model}: expected a multiple of n_heads = {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"ModelConfig.n_kv_heads = {self.n_kv_heads}: expected a divisor of n_heads = {self.n_heads}")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.positional = 'rope' needs an even head_dim, got {self.head_dim}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)}: expected a probability in [0, 1)")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)}: expected an id in [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"preset name = {name!r}: expected one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig keys {unknown}: unknown; expected keys among {sorted(known)}")
        return cls(**values)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# Presets change shapes only; every other field keeps its commented default above.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the `fastlm demo`: the whole pipeline in minutes on 2 cores.
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=128),
    "small": dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_seq_len=512),
    # BERT-base / GPT-2-small shapes.
    "base": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024),
}


def _checked(name: str, value: Any, expected: Any) -> Any:
    """`value` if it fits the annotation `expected` (int, float, bool, str, Literal, X | None), else ValueError.

    An int given for a float field comes back as a float, so that a JSON round trip returns an equal config."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        if value not in typing.get_args(expected):
            raise ValueError(f"ModelConfig.{name} = {value!r}: expected one of {list(typing.get_args(expected))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return value
        expected = next(option for option in options if option is not type(None))
    # bool is a subclass of int: reject it where a number is expected.
    if isinstance(value, bool) and expected is not bool:
        raise ValueError(f"ModelConfig.{name} = {value!r}: expected {expected.__name__}")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ValueError(f"ModelConfig.{name} = {value!r}: expected {expected.__name__}")
    return value
