"""Launch helpers shared by every kernel in fastlm.kernels: which implementation runs, interpreter quirks,
autotuning configs and argument validation.

Every public kernel function takes `impl="auto" | "triton" | "torch"`: "auto" runs the Triton kernel on CUDA
tensors and the plain-torch reference path otherwise; "triton" forces the kernel (on CPU only under Triton's
interpreter); "torch" forces the reference path.
"""

import os
from typing import Iterable, Sequence

import torch
import triton

IMPLS = ("auto", "triton", "torch")


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), as the tests do without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def debug_checks_enabled() -> bool:
    """True when FASTLM_DEBUG=1: checks that need a host-device sync (values inside GPU tensors) run then only."""
    return os.environ.get("FASTLM_DEBUG", "0") not in ("", "0")


def select_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Resolve `impl` into "triton" or "torch" for these tensors, per the convention in this module's docstring."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda else "torch"
    if impl == "triton" and not on_cuda and not interpreter_active():
        raise ValueError(
            "impl='triton' got CPU tensors: the Triton kernels run on CPU only in the interpreter; set "
            "TRITON_INTERPRET=1 before importing fastlm.kernels, or use impl='torch'"
        )
    return impl


def upcast_under_interpreter(dtype: torch.dtype) -> bool:
    """The constexpr flag "cast bf16 tiles to fp32 right after loading".

    Triton's interpreter holds bf16 as raw 16-bit integers, so bf16 arithmetic and `tl.dot` there return garbage;
    on a GPU the flag is off and the kernels keep the fast bf16 tensor-core path.
    """
    return interpreter_active() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """The `tl.dot` input precision: exact fp32 products for fp32 inputs (a user who asks for fp32 expects fp32
    accuracy, not TF32's 10-bit mantissa); Triton's default for 16-bit inputs, where the flag has no effect."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): tile sizes must be powers of two."""
    return max(minimum, triton.next_power_of_2(n))


def tuning_configs(gpu_configs: Sequence[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The autotuning candidates: several on a GPU; exactly one under the interpreter, which cannot benchmark."""
    return [interpreter_config] if interpreter_active() else list(gpu_configs)


def check_tensor(name: str, tensor: object, *, ndim: int, dtypes: Iterable[torch.dtype]) -> torch.Tensor:
    """Raise a ValueError naming `name` unless `tensor` is a tensor with `ndim` dims and one of `dtypes`."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    dtypes = tuple(dtypes)
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name}.dtype={tensor.dtype}: expected one of {', '.join(map(str, dtypes))}")
    return tensor


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise a ValueError naming the first of `others` that lives on another device than `reference`."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name} is on {tensor.device}, expected {reference.device} (the device of {reference_name})"
            )
