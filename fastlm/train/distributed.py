"""Data parallelism under torchrun: process group from the environment, DDP or FSDP2 wrapping, and the few
collectives the trainer needs. A plain `python -m fastlm ...` is a world of one and touches none of this."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint is imported where a checkpoint is made or loaded, not here: it takes most of a second
# to import, which every `fastlm` command (tokenizer, prepare, translate...) would pay at start.

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str | None = None) -> World:
    """Join the process group described by torchrun's environment (nccl on GPUs, gloo on CPU), or a world of one.

    `device`: "cpu" or "cuda" to force one; None picks CUDA when available.
    """
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or None")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


# The closing barrier's work, held until the process ends (see close_world).
_closing_barrier: list = []


def close_world(world: World) -> None:
    if world.is_distributed and dist.is_initialized():
        # Every rank past its last collective first. The barrier's work holds the works before it, whose tensors
        # Python owns; it is kept alive here so that no gloo worker thread frees it: freeing needs the GIL, which
        # the main thread holds while DDP's teardown destroys the process group and joins that very worker, and
        # the process would hang at exit (seen under torchrun: rank 1 stuck in ~ProcessGroupGloo).
        work = dist.barrier(async_op=True)
        work.wait()
        _closing_barrier.append(work)
        dist.destroy_process_group()


def wrap_model(model: nn.Module, world: World, *, fsdp: bool) -> nn.Module:
    """The module to run forward/backward on: the model itself, DDP around it, or the model sharded in place by
    FSDP2 (every block of every ModuleList, then the root, so that each block's parameters are gathered only
    while it runs)."""
    if not world.is_distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def gradient_sync(wrapped: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation (DDP no_sync; FSDP2's
    requires_gradient_sync), so accumulation costs one all-reduce per optimizer step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def unwrap(wrapped: nn.Module) -> nn.Module:
    return wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(value: object, world: World) -> list[object]:
    if not world.is_distributed:
        return [value]
    gathered: list[object] = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


def full_state_dicts(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on CPU, both keyed by parameter names whatever the layout (one
    process, DDP or FSDP2), so that a checkpoint loads on any world size. Under a process group this is a collective
    (every rank must call it) and only rank 0 gets the gathered tensors: the others never hold the whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state_dict(wrapped: nn.Module, *, fsdp: bool) -> dict:
    """The unsharded model state dict on CPU (a collective under FSDP2: every rank must call it)."""
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(wrapped).state_dict()


def load_full_state_dicts(wrapped: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict) -> None:
    """Load the state dicts of `full_state_dicts` into any layout. Under a process group only rank 0 passes them
    (the others pass empty dicts): rank 0 broadcasts one tensor at a time and each rank keeps its FSDP2 shard of it,
    so no rank but 0 reads the file or holds the whole state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    # Two calls rather than one set_state_dict: with broadcast_from_rank0 the combined call hangs under gloo
    # (seen with torch 2.13), the separate ones do not.
    set_model_state_dict(wrapped, model_state, options=options)
    set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=options)


def run_on_main(world: World, function: Callable[[], T]) -> T:
    """`function()` run on rank 0 only and its result (picklable, small) sent to every rank. An exception on rank 0
    is re-raised on every rank, so that a bad file stops the whole job instead of leaving ranks in a collective."""
    if not world.is_distributed:
        return function()
    outcome: list = [None]
    if world.is_main:
        try:
            outcome[0] = (True, function())
        except Exception as error:  # noqa: BLE001 - any failure must reach the other ranks
            outcome[0] = (False, error)
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value
