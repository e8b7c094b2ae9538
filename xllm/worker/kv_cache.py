"""The worker's KV memory: one K and one V pool of blocks per attention layer."""

from __future__ import annotations

import torch


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def allocate_kv_cache(attention_layers: list, num_blocks: int, block_size: int,
                      dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give every attention layer its (K, V) pools of shape (num_blocks, block_size, kvh, d)."""
    caches = []
    for layer in attention_layers:
        shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=dtype)
        layer.v_cache = torch.zeros(shape, dtype=dtype)
        caches.append((layer.k_cache, layer.v_cache))
    return caches
