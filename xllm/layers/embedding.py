"""Token embedding and LM head with the vocabulary split over a tensor-parallel group.

The embedding always keeps the serving dtype (a Q8_0 checkpoint tensor is dequantized); the
head is a linear and keeps its weight in its method's format (``xllm.layers.quantization``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm_ops.q8 import Q8Tensor

from .parallel import SINGLE, TPGroup
from .quantization import linear_method


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary's rows; lookups are summed."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.local = tp.shard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.local, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def load(self, part: int, tensor: torch.Tensor | Q8Tensor, is_bias: bool = False) -> None:
        rows = tensor.narrow(0, self.start, self.local)
        self.weight.data.copy_(rows.dequantize() if isinstance(rows, Q8Tensor) else rows)


class ParallelLMHead(nn.Module):
    """Hidden states -> logits over the full vocabulary (gathered from every rank); each rank
    holds the vocabulary rows of its embedding slice."""

    packed = None  # DenseMethod: the oneDNN copy of the weight

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32,
                 quantization: str = "none") -> None:
        super().__init__()
        self.tp = tp
        self.start, self.local = tp.shard(vocab_size)
        self.method = linear_method(quantization)
        self.method.create(self, self.local, dim, dtype)

    def load(self, part: int, tensor: torch.Tensor | Q8Tensor, is_bias: bool = False) -> None:
        self.method.load_rows(self, 0, tensor.narrow(0, self.start, self.local))

    def pack(self) -> None:
        """Prepare the (possibly tied) weight for serving; a tied embedding keeps its own."""
        self.method.prepare(self)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, hidden, None)  # (N, vocab / tp)
        return self.tp.all_gather_last(out)
