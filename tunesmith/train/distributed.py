"""Process-group helpers so the same loop runs alone or under `torchrun`.

Contract: `setup(device)` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK, initialises the
default process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU) and returns a `Dist`.
Rank 0 logs and writes outputs; every rank trains on its own shard of the rows. With one
process everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank)


def all_reduce_sum(value: float | int, dist: Dist, device: torch.device) -> float:
    if not dist.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.item()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def cleanup(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
