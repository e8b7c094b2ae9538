"""Linear layers whose weights may be split over a tensor-parallel group.

Weights are ``(out_features, in_features)`` as in ``torch.nn.Linear`` and checkpoints.
Each layer's ``load(name_part, tensor)`` takes a checkpoint tensor (float, or Q8_0 blocks as
``xllm_ops.q8.Q8Tensor``) and copies in this rank's slice, so model files only say which
checkpoint names feed which layer. How the weight is stored and multiplied is its method's
business (``xllm.layers.quantization``).
"""

from __future__ import annotations

import torch
from torch import nn

from .parallel import SINGLE, TPGroup
from .quantization import linear_method


class PackableLinear(nn.Module):
    """A matrix weight kept and applied by its format's method (``xllm.layers.quantization``):
    the serving dtype packed for the matrix engine once loaded, or Q8_0 blocks."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    packed = None  # DenseMethod: the oneDNN copy of the weight

    def _create_weight(self, rows: int, cols: int, dtype: torch.dtype, quantization: str) -> None:
        self.method = linear_method(quantization)
        self.method.create(self, rows, cols, dtype)

    def pack(self) -> None:
        """Prepare the loaded weight for serving (call after loading, before serving)."""
        self.method.prepare(self)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.method.apply(self, x, bias)


class ColumnParallelLinear(PackableLinear):
    """Output features split over ranks; each rank keeps its slice of the output."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32, quantization: str = "none") -> None:
        super().__init__()
        self.tp = tp
        self.out_sizes = [tp.shard(n)[1] for n in out_sizes]  # per rank, per part
        self._create_weight(sum(self.out_sizes), in_features, dtype, quantization)
        self.bias = nn.Parameter(torch.zeros(sum(self.out_sizes), dtype=dtype),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def load(self, part: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        """Copy this rank's rows of checkpoint part ``part`` (e.g. q=0, k=1, v=2)."""
        size = self.out_sizes[part]
        offset = sum(self.out_sizes[:part])
        self._write_rows(offset, tensor.narrow(0, self.tp.rank * size, size), is_bias)

    def _write_rows(self, offset: int, rows, is_bias: bool) -> None:
        if is_bias:
            self.bias.data[offset:offset + rows.shape[0]].copy_(rows)
        else:
            self.method.load_rows(self, offset, rows)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. KV heads fewer than ranks are replicated."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32,
                 quantization: str = "none") -> None:
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        local_kv = max(1, num_kv_heads // tp.size)
        self.num_kv_heads = num_kv_heads
        super().__init__(hidden, [num_heads * head_dim, local_kv * head_dim * tp.size,
                                  local_kv * head_dim * tp.size], bias, tp, dtype, quantization)

    def load(self, part: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        if part == 0 or self.kv_replicas == 1:
            return super().load(part, tensor, is_bias)
        size = self.out_sizes[part]  # one KV head group, shared by kv_replicas ranks
        start = (self.tp.rank // self.kv_replicas) * size
        self._write_rows(sum(self.out_sizes[:part]), tensor.narrow(0, start, size), is_bias)


class RowParallelLinear(PackableLinear):
    """Input features split over ranks; partial outputs are summed (all-reduce)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32, quantization: str = "none") -> None:
        super().__init__()
        self.tp = tp
        self.in_local = tp.shard(in_features)[1]
        self._create_weight(out_features, self.in_local, dtype, quantization)
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
            self.method.load_rows(self, 0, tensor.narrow(1, self.tp.rank * self.in_local, self.in_local))
