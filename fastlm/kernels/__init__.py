"""fastlm's Triton kernels, each with a plain-torch reference path (see fastlm.kernels.utils for `impl`)."""

from fastlm.kernels.attention import attention
from fastlm.kernels.cross_entropy import cross_entropy, linear_cross_entropy

__all__ = ["attention", "cross_entropy", "linear_cross_entropy"]
