"""The host tier's bytes: whole KV blocks in the KV agent's own memory.

A slot holds one block of every rank, layer, K and V: ``(ranks, layers, 2, block_bytes)``
bytes, the same byte ranges the device pool keeps per layer (``pool.SharedKVPool``), so a
block moves between the pool and a slot as a copy of byte ranges whatever the dtype. Each
slot remembers which block it holds (hash, parent, token ids), so the agent can check an
order against what is really there before it copies a slot anywhere.

Which block goes in which slot is the scheduler's decision (``xllm.scheduler.tier_index``);
this class only keeps the bytes and their names.
"""

from __future__ import annotations

import numpy as np

from .pool import SharedKVPool


class HostTier:
    """``num_slots`` blocks of memory. Verbs: store_from, load_layer_into, holds, forget."""

    def __init__(self, num_slots: int, pools: list[SharedKVPool]) -> None:
        first = pools[0]
        # zero pages are only committed when first written, so a large tier costs nothing until used
        self.data = np.zeros((num_slots, len(pools), first.num_layers, 2, first.block_bytes), dtype=np.uint8)
        self.names: list[tuple[int, int, tuple[int, ...]] | None] = [None] * num_slots  # (hash, parent, tokens)

    @property
    def num_slots(self) -> int:
        return len(self.names)

    def holds(self, slot: int, block_hash: int) -> bool:
        """Whether ``slot`` holds the block ``block_hash``."""
        name = self.names[slot]
        return name is not None and name[0] == block_hash

    def name(self, slot: int, block_hash: int, parent: int, tokens) -> None:
        """Record that ``slot`` now holds ``block_hash`` (its bytes written by the caller)."""
        self.names[slot] = (block_hash, parent, tuple(tokens))

    def forget(self, slot: int) -> None:
        self.names[slot] = None

    def store_from(self, pools: list[SharedKVPool], device_block: int, slot: int) -> None:
        """Copy one device block, every rank and layer, into ``slot``."""
        for rank, pool in enumerate(pools):
            self.data[slot, rank] = pool.data[:, :, device_block]  # (layers, 2, block_bytes)

    def load_layer_into(self, pools: list[SharedKVPool], layer: int, slots: list[int],
                        device_blocks: list[int]) -> None:
        """Copy one layer of ``slots`` into ``device_blocks`` of every rank's pool."""
        src = np.asarray(slots, dtype=np.int64)
        dst = np.asarray(device_blocks, dtype=np.int64)
        for rank, pool in enumerate(pools):
            pool.data[layer, 0][dst] = self.data[src, rank, layer, 0]
            pool.data[layer, 1][dst] = self.data[src, rank, layer, 1]
