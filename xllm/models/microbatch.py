"""Micro-batch overlap: hide tensor-parallel all-reduces behind the other half's compute.

A step's batch is split in two. Layer by layer, each micro-batch's attention (then
MLP) output is this rank's partial sum; its all-reduce is started asynchronously and
the other micro-batch computes while it runs. A micro-batch waits for its own
reduction only when it needs the sum (before its next sub-layer).

    attn(A) → reduce(A) ┐  attn(B) → reduce(B) ┐
                        └ wait A, mlp(A) → reduce(A) ┐  wait B, mlp(B) → reduce(B) ┐
                                                     └ wait A, next layer ...
"""

from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata
from ..layers.parallel import TPGroup


class _Pending:
    """A partial sum whose all-reduce is in flight."""

    def __init__(self, value: torch.Tensor, tp: TPGroup) -> None:
        self.value = value
        self.handle = tp.all_reduce_async(value)

    def result(self) -> torch.Tensor:
        if self.handle is not None:
            self.handle.wait()
        return self.value


def run_overlapped(model, batches: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                   tp: TPGroup) -> list[torch.Tensor]:
    """Hidden states (T_i, hidden) for each (input_ids, positions, meta) micro-batch."""
    xs = [model.embed_tokens(ids) for ids, _, _ in batches]
    pending: list[_Pending | None] = [None] * len(batches)
    for layer in model.layers:
        for i, (_, pos, meta) in enumerate(batches):  # attention of every micro-batch
            if pending[i] is not None:
                xs[i] = xs[i] + pending[i].result()
            h = layer.self_attn(pos, layer.input_layernorm(xs[i]), meta, partial=True)
            pending[i] = _Pending(h, tp)
        for i in range(len(batches)):  # then the MLP of every micro-batch
            xs[i] = xs[i] + pending[i].result()
            h = layer.mlp(layer.post_attention_layernorm(xs[i]), partial=True)
            pending[i] = _Pending(h, tp)
    return [model.norm(x + p.result()) for x, p in zip(xs, pending)]
