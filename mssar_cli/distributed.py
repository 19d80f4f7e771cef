"""Distributed data parallel set-up for ``torchrun --nproc_per_node=N -m mssar_cli train R``, or
for the N tasks of one Slurm job step (``mssar ablate --launcher slurm --gpus-per-run N``).

NCCL on GPUs, gloo on the CPU. Each rank trains on its shard of every epoch's permutation with a
per-rank batch of ``batch_size / world_size`` (so the recipe's batch size stays the global one,
as in the paper); metrics are summed over ranks; rank 0 alone writes logs and checkpoints.
BatchNorm statistics are per rank (no SyncBN), as in torchvision's reference scripts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, or else the
    one of the Slurm job step this process is a task of (:func:`slurm_rendezvous`), if any."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" not in os.environ:
        slurm = slurm_rendezvous(os.environ)
        if slurm is None:
            return World()
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{slurm.master_addr}:{slurm.master_port}",
                rank=slurm.rank,
                world_size=slurm.world_size,
            )
        return World(slurm.rank, slurm.world_size, slurm.local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def slurm_rendezvous(env: Mapping[str, str]) -> Rendezvous | None:
    """What torchrun would set, read from a Slurm task's environment: rank ``SLURM_PROCID`` of
    ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``, rank 0 on the first node of
    ``SLURM_JOB_NODELIST`` and a port derived from the job id (``MASTER_ADDR`` / ``MASTER_PORT``
    override them). None outside a job step of several tasks: a batch script, an ``salloc``
    shell and a one-task step train alone."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    world_size = int(env.get("SLURM_NTASKS", "1"))
    if world_size <= 1:
        return None
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    addr = env.get("MASTER_ADDR") or first_host(nodes) or "127.0.0.1"
    job = env.get("SLURM_JOB_ID", "")
    port = int(env.get("MASTER_PORT") or (20000 + int(job) % 20000 if job.isdigit() else 29500))
    return Rendezvous(
        int(env["SLURM_PROCID"]), world_size, int(env.get("SLURM_LOCALID", "0")), addr, port
    )


def first_host(nodelist: str) -> str | None:
    """The first host of a Slurm node list: ``gpu[07-09,12],cpu3`` -> ``gpu07``."""
    prefix, _, rest = nodelist.strip().partition("[")
    if "," in prefix or not rest:
        return prefix.split(",")[0] or None
    inside, _, after = rest.partition("]")
    return prefix + inside.split(",")[0].split("-")[0] + after.split(",")[0]


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
