"""The worker's KV memory: one K and one V pool of blocks per attention layer."""

from __future__ import annotations

import torch

from xllm_ops.paged_attention import kv_cache_shapes


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def allocate_kv_cache(attention_layers: list, num_blocks: int, block_size: int,
                      dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give every attention layer its K and V pools (layouts in ``xllm_ops.paged_attention``)."""
    caches = []
    for layer in attention_layers:
        k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(k_shape, dtype=dtype)
        layer.v_cache = torch.zeros(v_shape, dtype=dtype)
        caches.append((layer.k_cache, layer.v_cache))
    return caches
