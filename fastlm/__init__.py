"""fastlm: pre-training transformer language models from scratch, fast."""

__version__ = "0.1.0"

from fastlm.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
