"""The tensor-parallel group a layer belongs to (one rank per worker process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class ProcessGroupComm:
    """Collectives through a torch.distributed process group (gloo on CPU; NCCL or HCCL
    where ``xllm.platform`` picks them)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_async(self, x: torch.Tensor):
        return dist.all_reduce(x, group=self.group, async_op=True)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=src, group=self.group)
        return x


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group; size 1 means no collectives.

    ``comm`` does the collectives: a ``ProcessGroupComm``, or on CPU ranks of one host a
    ``xllm.platform.shm_comm.ShmCommunicator`` (which falls back to a process group for
    what does not fit its buffers).
    """

    rank: int = 0
    size: int = 1
    comm: Any = None  # set when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        return self.comm.all_reduce(x) if self.size > 1 else x

    def all_reduce_async(self, x: torch.Tensor):
        """Start summing ``x`` over the ranks; returns a handle with ``wait()`` (or None)."""
        return self.comm.all_reduce_async(x) if self.size > 1 else None

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        return self.comm.all_gather_last(x) if self.size > 1 else x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank gets rank ``src``'s ``x``, in place."""
        return self.comm.broadcast(x, src) if self.size > 1 else x

    def shard(self, n: int) -> tuple[int, int]:
        """(start, size) of this rank's slice of ``n`` items split evenly."""
        if n % self.size:
            raise ValueError(f"{n} does not split evenly over {self.size} ranks")
        per = n // self.size
        return self.rank * per, per


SINGLE = TPGroup()
