"""Transformer language models: EncoderLM (masked LM), DecoderLM (causal LM) and their merge, Seq2SeqLM."""

from .base import ModelOutput
from .config import ModelConfig
from .decoder import DecoderLM
from .encoder import EncoderLM
from .kv_cache import KVCache
from .seq2seq import Seq2SeqLM

__all__ = ["ModelConfig", "EncoderLM", "DecoderLM", "Seq2SeqLM", "ModelOutput", "KVCache"]
