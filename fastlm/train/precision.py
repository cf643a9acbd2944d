"""The precision a run trains and evaluates in: bf16 autocast (weights stay fp32) or fp32, by TrainConfig.precision
and the hardware. One place, so that `fastlm eval` computes what the run logged."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of training and evaluation alike on `device` for TrainConfig.precision."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=trains_in_bf16(precision, device))


def trains_in_bf16(precision: str, device: torch.device) -> bool:
    """Whether TrainConfig.precision means bf16 autocast on `device`: "auto" where bf16 is native (CUDA, or a CPU
    with bf16 dot products: AVX-512 BF16 or AMX), else as named. Resuming on a machine of another kind can
    therefore change "auto"'s choice; on the same machine a run resumes exactly."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    # torch exposes these only under private names; a torch without them is treated as having none.
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)
