"""Data parallelism: ``torchrun`` + DistributedDataParallel (gloo on CPU, NCCL on GPU).

Launch any training command under ``torchrun``::

    torchrun --nproc_per_node 2 -m levyattn train --preset digits-vit

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them. The trainer splits each
*global* batch (``batch_size`` samples, the same as a one-process run) into
``world_size`` interleaved shards, so a two-process run follows the same training
trajectory as one process up to floating-point rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process).

    ``device``: "cpu", "cuda" or None (CUDA when available). ``backend``: default gloo on
    CPU, nccl on CUDA.
    """
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def current() -> DistInfo:
    """The DistInfo of an already-initialised process group (or a single CPU process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistInfo()


def all_reduce_sum(value: float, device: torch.device | None = None) -> float:
    """Sum a Python number over all processes (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` (picklable) on every process (``obj`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "cleanup", "current", "env_world_size",
           "init_distributed"]
