"""fastlm's Triton kernels, each with a plain-torch reference path (see fastlm.kernels.utils for `impl`)."""

from fastlm.kernels.attention import attention, attention_varlen, split_key_attention
from fastlm.kernels.cross_entropy import cross_entropy, linear_cross_entropy

__all__ = ["attention", "attention_varlen", "split_key_attention", "cross_entropy", "linear_cross_entropy"]
