"""Attention over the paged KV cache for a flattened batch of requests.

A step's tokens are flattened into one ``(T, ...)`` batch. Requests that compute one
token (decodes) are attended to together; requests that compute several (a prompt or
a chunk of one) each get a causal pass over their cached context plus the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from xllm_ops import (decode_attention, paged_decode_attention, paged_prefill_attention,
                      prefill_attention, write_kv)


@dataclass
class PrefillSpan:
    """One multi-token request in the flattened batch."""

    start: int  # first row in the flattened batch
    length: int  # tokens computed in this step
    num_context: int  # tokens already in the cache before this step
    block_table: torch.Tensor  # (M,) int64


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and who attends to what, for one step.

    Built by the model runner, passed explicitly down the model (no global state).
    """

    slot_mapping: torch.Tensor  # (T,) flat cache slot of every token
    decode_rows: torch.Tensor | None  # (B,) rows of the single-token requests; None if none
    decode_block_tables: torch.Tensor | None  # (B, M)
    decode_seq_lens: torch.Tensor | None  # (B,) cached tokens incl. the new one
    max_decode_len: int = 0
    all_decode: bool = False  # every row is a decode: rows == decode_rows
    prefills: list[PrefillSpan] = field(default_factory=list)
    # called with a layer's index once its K/V for this step are stored (the KV agent
    # sends it on while the later layers compute); None: nobody is waiting
    on_layer_stored: Callable[[int], None] | None = None
    # called with a layer's index before its attention reads the cache, returning once the
    # KV agent has written that layer of the blocks it loads back for this step (KV tiers:
    # the copy overlaps the earlier layers' compute); None: nothing is being loaded
    wait_for_layer: Callable[[int], None] | None = None


class Attention(nn.Module):
    """Writes this layer's new K/V to its cache and attends. Caches are set by the runner."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None  # (num_blocks, kvh, d, block_size)
        self.v_cache: torch.Tensor | None = None  # (num_blocks, kvh, block_size, d)
        self.layer_index = 0  # set with the caches

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: (T, h, d); k, v: (T, kvh, d) -> (T, h, d)."""
        kc, vc = self.k_cache, self.v_cache
        if meta.wait_for_layer is not None:
            meta.wait_for_layer(self.layer_index)
        if meta.all_decode:
            out = decode_attention(q, k, v, kc, vc, meta.slot_mapping, meta.decode_block_tables,
                                   meta.decode_seq_lens, self.scale)
            if meta.on_layer_stored is not None:
                meta.on_layer_stored(self.layer_index)
            return out
        write_kv(kc, vc, k, v, meta.slot_mapping)
        if meta.on_layer_stored is not None:
            meta.on_layer_stored(self.layer_index)
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            out[meta.decode_rows] = paged_decode_attention(
                q[meta.decode_rows], kc, vc, meta.decode_block_tables, meta.decode_seq_lens,
                self.scale, meta.max_decode_len)
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.length)
            if span.num_context == 0:
                out[rows] = prefill_attention(q[rows], k[rows], v[rows], self.scale)
            else:
                out[rows] = paged_prefill_attention(q[rows], kc, vc, span.block_table,
                                                    span.num_context, self.scale)
        return out
