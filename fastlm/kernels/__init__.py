"""fastlm's Triton kernels, each with a plain-torch reference path (see fastlm.kernels.utils for `impl`)."""

from fastlm.kernels.attention import attention, attention_varlen
from fastlm.kernels.cross_entropy import cross_entropy, linear_cross_entropy

__all__ = ["attention", "attention_varlen", "cross_entropy", "linear_cross_entropy"]
