"""torch.distributed glue for the trainer: the training device, set up from torchrun's environment,
wrap in DDP, reduce.

Model files stay free of distributed code; this module applies it from outside. Each process trains
on one device (``train.device``, see ``kinetic.device.resolve_device``): processes on CPU use the
gloo backend, processes on a GPU use NCCL, and the reductions below move their tensors to the
backend's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kinetic.device import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def backend_for(device: torch.device) -> str:
    """NCCL for processes that train on a GPU, gloo for processes that train on the CPU (whether or
    not the machine has a GPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: str = "auto") -> DistInfo:
    """Initialize the process group when launched by torchrun (WORLD_SIZE > 1), with the backend of
    the device this process trains on (``train.device``, resolved with its LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo()
    where = resolve_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)  # NCCL's collectives run on the current device
    if not dist.is_initialized():
        dist.init_process_group(backend_for(where))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it. Exiting with a live
    gloo group lets its threads be torn down during interpreter exit, which sometimes aborts the
    process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device | None = None) -> nn.Module:
    """DDP around ``model`` (already on ``device``) when there is more than one process."""
    if not info.enabled:
        return model
    if device is not None and device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device], output_device=device)
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _comm_device(default: torch.device) -> torch.device:
    """Where the process group's collectives take their tensors: NCCL only reduces CUDA tensors (on
    the current device), gloo takes ``default``."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else default


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks, on t's device (``t`` itself is not modified)."""
    if dist.is_available() and dist.is_initialized():
        device = _comm_device(t.device)
        total = t.clone() if device == t.device else t.to(device)
        dist.all_reduce(total)
        return total.to(t.device)
    return t


def all_reduce_mean(value: float) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device(torch.device("cpu")))
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()
    return value


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape and dtype on all ranks), in rank order, on t's device;
    ``[t]`` without a process group. NCCL gathers through the current CUDA device."""
    if not (dist.is_available() and dist.is_initialized()):
        return [t]
    device = _comm_device(t.device)
    parts = [torch.empty_like(t, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(device))
    return [part.to(t.device) for part in parts]
