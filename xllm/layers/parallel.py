"""The tensor-parallel group a layer belongs to (one rank per worker process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group; size 1 means no collectives."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed process group when size > 1
    shm: Any = None  # a ShmCommunicator when every rank is a CPU process of this host

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.size > 1:
            if self.shm is not None and self.shm.fits(x):
                return self.shm.all_reduce(x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_async(self, x: torch.Tensor):
        """Start summing ``x`` over the ranks; returns a handle with ``wait()`` (or None)."""
        if self.size > 1:
            if self.shm is not None and self.shm.fits(x):
                from ..platform.shm_comm import PendingReduce

                return PendingReduce(self.shm, x)
            return dist.all_reduce(x, group=self.group, async_op=True)
        return None

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.size == 1:
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_gather_last(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, n: int) -> tuple[int, int]:
        """(start, size) of this rank's slice of ``n`` items split evenly."""
        if n % self.size:
            raise ValueError(f"{n} does not split evenly over {self.size} ranks")
        per = n // self.size
        return self.rank * per, per


SINGLE = TPGroup()
