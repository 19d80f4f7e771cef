"""Distributed data parallel set-up for ``torchrun --nproc_per_node=N -m mssar_cli train R``.

NCCL on GPUs, gloo on the CPU. Each rank trains on its shard of every epoch's permutation with a
per-rank batch of ``batch_size / world_size`` (so the recipe's batch size stays the global one,
as in the paper); metrics are summed over ranks; rank 0 alone writes logs and checkpoints.
BatchNorm statistics are per rank (no SyncBN), as in torchvision's reference scripts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_environment(device_type: str) -> World:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_flag(flag: bool, world: World, device: torch.device) -> bool:
    """Rank 0's decision, shared with every rank."""
    if not world.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
