"""Linear layers whose weights may be split over a tensor-parallel group.

Weights are ``(out_features, in_features)`` as in ``torch.nn.Linear`` and checkpoints.
Each layer's ``load(name_part, tensor)`` takes a checkpoint tensor and copies in this
rank's slice, so model files only say which checkpoint names feed which layer.
"""

from __future__ import annotations

import torch
from torch import nn

from xllm_ops import linear as packed_linear

from .parallel import SINGLE, TPGroup


class PackableLinear(nn.Module):
    """A weight that can be packed for the device's matrix engine once it is loaded."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Pack the loaded weight (call after loading, before serving)."""
        self.packed = packed_linear.pack(self.weight.data)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_linear.linear(x, self.weight, self.packed, bias)


class ColumnParallelLinear(PackableLinear):
    """Output features split over ranks; each rank keeps its slice of the output."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.tp = tp
        self.out_sizes = [tp.shard(n)[1] for n in out_sizes]  # per rank, per part
        self.weight = nn.Parameter(torch.empty(sum(self.out_sizes), in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(sum(self.out_sizes), dtype=dtype),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def load(self, part: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        """Copy this rank's rows of checkpoint part ``part`` (e.g. q=0, k=1, v=2)."""
        size = self.out_sizes[part]
        offset = sum(self.out_sizes[:part])
        rows = tensor.narrow(0, self.tp.rank * size, size)
        target = self.bias if is_bias else self.weight
        target.data[offset:offset + size].copy_(rows)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. KV heads fewer than ranks are replicated."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32) -> None:
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        local_kv = max(1, num_kv_heads // tp.size)
        self.num_kv_heads = num_kv_heads
        super().__init__(hidden, [num_heads * head_dim, local_kv * head_dim * tp.size,
                                  local_kv * head_dim * tp.size], bias, tp, dtype)

    def load(self, part: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        if part == 0 or self.kv_replicas == 1:
            return super().load(part, tensor, is_bias)
        size = self.out_sizes[part]  # one KV head group, shared by kv_replicas ranks
        start = (self.tp.rank // self.kv_replicas) * size
        target = self.bias if is_bias else self.weight
        offset = sum(self.out_sizes[:part])
        target.data[offset:offset + size].copy_(tensor.narrow(0, start, size))


class RowParallelLinear(PackableLinear):
    """Input features split over ranks; partial outputs are summed (all-reduce)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.tp = tp
        self.in_local = tp.shard(in_features)[1]
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output; the caller sums it over the ranks."""
        # NOTE: the bias is added once, on rank 0, so the sum over ranks has it once.
        return self.matmul(x, self.bias if self.tp.rank == 0 else None)

    def load(self, part: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        if is_bias:
            self.bias.data.copy_(tensor)
        else:
            self.weight.data.copy_(tensor.narrow(1, self.tp.rank * self.in_local, self.in_local))
