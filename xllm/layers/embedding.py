"""Token embedding and LM head with the vocabulary split over a tensor-parallel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm_ops import linear as packed_linear

from .parallel import SINGLE, TPGroup


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

    def load(self, part: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        self.weight.data.copy_(tensor.narrow(0, self.start, self.local))


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits over the full vocabulary (gathered from every rank)."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Pack the (possibly tied) weight for the matrix engine; the embedding keeps its own."""
        self.packed = packed_linear.pack(self.weight.data)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = packed_linear.linear(hidden, self.weight, self.packed)  # (N, vocab / tp)
        return self.tp.all_gather_last(out)
