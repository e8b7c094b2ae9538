"""Paged KV block manager with prefix caching.

Blocks are fixed-size pages of KV memory owned by the worker; the scheduler only
counts them. Each block has a reference count. A full block whose tokens all have
their KV computed gets a chained hash (parent hash, its token ids, extra keys) and is
entered in the prefix cache; a later request whose prompt starts with the same tokens
reuses it instead of recomputing. Blocks nobody references sit in an LRU free queue:
uncached ones and cached ones alike, and taking a cached one evicts it from the cache.

NOTE (invariant, ``check_integrity``): free + cached + in use == total, where "in use"
blocks have references, "cached" blocks have none but a hash, "free" blocks neither.
A reference is a request's, or the KV agent's while it copies the block (``hold``).

With KV tiers the cache goes on below the device pool (``tiers``): the blocks entering
the cache are kept for them (``take_new_cached``), and the KV events name each block's
tier.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from ..block_hash import ROOT_HASH, block_hashes

class BlockOwner(Protocol):
    """What the block manager needs of a request."""

    block_ids: list[int]
    block_hashes: list[int]  # hashes of its leading full blocks of known tokens
    num_cached_blocks: int  # leading blocks already offered to the prefix cache

    def known_token_ids(self) -> Sequence[int]: ...


DEVICE, HOST, DISK = range(3)  # a block's tier (``protocol.KV_TIERS``)


@dataclass
class KVEvents:
    """Changes to the prefix cache (every tier) since the last drain, for a global prefix index."""

    stored: list[tuple[int, int, list[int], int]] = field(default_factory=list)  # (hash, parent, tokens, tier)
    removed: list[tuple[int, int]] = field(default_factory=list)  # (hash, tier) evicted
    cleared: bool = False  # the whole cache was reset (before ``stored``)

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.cleared)


class BlockManager:
    """Counts KV blocks for the scheduler. Verbs: match, allocate, cache, free, reset."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 keep_new_cached: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # of cached blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.events = KVEvents()
        self.keep_new_cached = keep_new_cached  # KV tiers: keep what enters the cache for ``take_new_cached``
        self.new_cached: list[tuple[int, int, int, tuple[int, ...]]] = []  # (block, hash, parent, tokens)
        self.num_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # of which found

    # -- counts ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (evicting cached ones if needed)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, owner: BlockOwner, num_tokens: int) -> int:
        """New blocks ``owner`` needs to hold ``num_tokens`` tokens of KV."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(owner.block_ids))

    # -- prefix cache ----------------------------------------------------------------------
    def update_hashes(self, owner: BlockOwner) -> None:
        """Extend ``owner.block_hashes`` over its full blocks of known tokens."""
        tokens = owner.known_token_ids()
        if len(owner.block_hashes) < len(tokens) // self.block_size:
            owner.block_hashes[:] = block_hashes(tokens, self.block_size, owner.block_hashes)

    def match_prefix(self, owner: BlockOwner, max_tokens: int) -> list[int]:
        """Cached blocks that hold the longest prefix of ``owner``'s tokens (at most
        ``max_tokens`` tokens). Takes no references."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(owner)
        hits: list[int] = []
        tokens, bs = owner.known_token_ids(), self.block_size
        for i, h in enumerate(owner.block_hashes[: max_tokens // bs]):
            block = self.cached.get(h)
            # NOTE: trust, but verify the hash: a hit must hold these very tokens
            if block is None or self.block_tokens[block] != tuple(tokens[i * bs:(i + 1) * bs]):
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += num_tokens
        self.num_hits += num_hit_tokens

    def cache_blocks(self, owner: BlockOwner, num_computed_tokens: int) -> None:
        """Enter ``owner``'s full blocks whose KV is computed into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        n_full = num_computed_tokens // self.block_size
        if n_full <= owner.num_cached_blocks:
            return  # no block became full since the last call
        self.update_hashes(owner)
        n_full = min(n_full, len(owner.block_hashes))
        for i in range(owner.num_cached_blocks, n_full):
            block = owner.block_ids[i]
            if self.block_hash[block] is not None:
                continue
            h = owner.block_hashes[i]
            if h in self.cached:
                continue  # same content already cached in another block
            block_tokens = list(owner.known_token_ids()[i * self.block_size:(i + 1) * self.block_size])
            self.block_hash[block] = h
            self.block_tokens[block] = tuple(block_tokens)
            self.cached[h] = block
            parent = owner.block_hashes[i - 1] if i else ROOT_HASH
            self.events.stored.append((h, parent, block_tokens, DEVICE))
            if self.keep_new_cached:
                self.new_cached.append((block, h, parent, self.block_tokens[block]))
        owner.num_cached_blocks = n_full

    # -- allocation ------------------------------------------------------------------------
    def take_prefix(self, owner: BlockOwner, blocks: list[int]) -> None:
        """Give ``owner`` references to cached ``blocks`` (from ``match_prefix``)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
        owner.block_ids.extend(blocks)

    def allocate(self, owner: BlockOwner, num_tokens: int) -> bool:
        """Grow ``owner`` to hold ``num_tokens`` tokens; False (and no change) if short."""
        if num_tokens <= len(owner.block_ids) * self.block_size:
            return True  # the common decode case: the last block still has room
        need = self.blocks_needed(owner, num_tokens)
        if need > len(self.free_queue):
            return False
        for _ in range(need):
            b, _ = self.free_queue.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            owner.block_ids.append(b)
        return True

    def take_new_cached(self) -> list[tuple[int, int, int, tuple[int, ...]]]:
        """The blocks that entered the cache since the last call: (block, hash, parent, tokens)."""
        out, self.new_cached = self.new_cached, []
        return out

    def hold(self, block: int) -> None:
        """One more reference to ``block``, for the KV agent while it copies it."""
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        """The KV agent is done with ``block`` (``hold``)."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def free(self, owner: BlockOwner) -> None:
        """Drop ``owner``'s references. Its tail blocks become the first to be evicted."""
        for b in reversed(owner.block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None
        owner.block_ids.clear()

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            self.block_tokens[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
                self.events.removed.append((h, DEVICE))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block not in use. False if some are still referenced."""
        if any(self.ref_counts):
            return False
        for b in range(self.num_blocks):
            self.block_hash[b] = None
            self.block_tokens[b] = None
        self.cached.clear()
        self.events = KVEvents(cleared=True)
        return True

    def drain_events(self) -> KVEvents:
        events, self.events = self.events, KVEvents()
        return events

    # -- invariants ------------------------------------------------------------------------
    def check_integrity(self) -> dict[str, int]:
        """Assert the bookkeeping is consistent; returns the free/cached/used counts."""
        used = sum(1 for r in self.ref_counts if r > 0)
        cached = sum(1 for b, r in enumerate(self.ref_counts) if r == 0 and self.block_hash[b] is not None)
        free = sum(1 for b, r in enumerate(self.ref_counts) if r == 0 and self.block_hash[b] is None)
        assert all(r >= 0 for r in self.ref_counts), "negative reference count"
        assert free + cached + used == self.num_blocks
        assert set(self.free_queue) == {b for b, r in enumerate(self.ref_counts) if r == 0}
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, "cache map and block hash disagree"
        return {"free": free, "cached": cached, "used": used}
