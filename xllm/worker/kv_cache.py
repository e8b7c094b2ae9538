"""The worker's KV memory: one K and one V pool of blocks per attention layer, in
process memory, or in a shared-memory file the instance's KV agent maps too
(``xllm.kv_transfer.pool``); and the wait for blocks that agent loads back (KV tiers)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..kv_transfer.pool import SharedKVPool

from xllm_ops.paged_attention import kv_cache_shapes


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def allocate_kv_cache(attention_layers: list, num_blocks: int, block_size: int,
                      dtype: torch.dtype, shared: str = "") -> SharedKVPool | None:
    """Give every attention layer its K and V pools (layouts in ``xllm_ops.paged_attention``),
    and its index; in the shared file ``shared`` when given (returned)."""
    pool = None
    if shared:
        first = attention_layers[0]
        itemsize = torch.empty((), dtype=dtype).element_size()
        block_bytes = first.num_kv_heads * first.head_dim * block_size * itemsize
        if any(l.num_kv_heads * l.head_dim != first.num_kv_heads * first.head_dim for l in attention_layers):
            raise NotImplementedError("a shared KV pool needs the same K/V size in every layer")
        pool = SharedKVPool.create(Path(shared), len(attention_layers), num_blocks, block_bytes)
    for index, layer in enumerate(attention_layers):
        layer.layer_index = index
        k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        if pool is None:
            layer.k_cache = torch.zeros(k_shape, dtype=dtype)
            layer.v_cache = torch.zeros(v_shape, dtype=dtype)
        else:  # views of the shared pages (zeros: a new file)
            layer.k_cache = torch.from_numpy(pool.data[index, 0]).view(dtype).view(k_shape)
            layer.v_cache = torch.from_numpy(pool.data[index, 1]).view(dtype).view(v_shape)
    return pool


LOAD_POLL_S = 50e-6  # how often a waiting worker looks at the agent's load progress
LOAD_TIMEOUT_S = 60.0  # an agent that has loaded nothing for this long is taken for dead


class LoadWait:
    """Waits, before each attention layer of one step, until the KV agent has written that
    layer of the blocks it loads back for the step (``SharedKVPool.loaded``); counts the
    time spent waiting (what the forward pass did not hide of the copy)."""

    def __init__(self, pool: SharedKVPool, step_id: int) -> None:
        self.pool = pool
        self.step_id = step_id
        self.waited = 0.0  # seconds

    def __call__(self, layer: int) -> None:
        if self.pool.loaded(self.step_id, layer):
            return
        t0 = time.perf_counter()
        while not self.pool.loaded(self.step_id, layer):
            if time.perf_counter() - t0 > LOAD_TIMEOUT_S:
                raise RuntimeError(f"the KV agent loaded no layer {layer} for step {self.step_id} "
                                   f"in {LOAD_TIMEOUT_S:.0f} s")
            time.sleep(LOAD_POLL_S)
        self.waited += time.perf_counter() - t0

    def finish(self) -> None:
        """Wait until every layer is in: a step never ends with a load still writing."""
        self(self.pool.num_layers - 1)
