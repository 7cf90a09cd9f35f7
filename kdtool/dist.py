"""Multi-process runs under torchrun: DistributedDataParallel set-up from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from kdtool import console


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); else a single process.

    NCCL on CUDA (one GPU per process, by LOCAL_RANK), gloo on CPU. Processes
    other than rank 0 print nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not info.is_main:
        console.err.quiet = True
        console.out.quiet = True
    return info, device


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        torch_dist.all_reduce(t)
        t /= info.world_size
    return t


def sync_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating buffers (BN running statistics) over ranks.

    DDP keeps parameters equal, but each rank's last forward updates its BN
    running statistics from its own batch; averaging makes the ranks agree.
    """
    if not info.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            torch_dist.all_reduce(b)
            b /= info.world_size


def finish(info: DistInfo) -> None:
    """Wait for every rank (rank 0 may still be writing), then leave the process group."""
    if info.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
