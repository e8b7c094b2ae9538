"""The scheduler's side of the KV tiers: which blocks go down from the device pool to host
memory and disk, which come back up, and when a device block the KV agent touches is the
scheduler's again. The agent moves the bytes (``xllm.kv_transfer.tier_mover``); this
class decides, in plain data: one ``KVTierOrder`` per scheduling pass.

What is stored when:

- **down**: a block that enters the device prefix cache is copied to host memory by the
  step after the one that computed it (write-through), so evicting it from the device
  later costs nothing. A block the host tier evicts (LRU) is spilled to disk, unless disk
  has it; the disk tier evicts LRU (its file is deleted).
- **up**: a request whose device prefix hits go on in host memory gets fresh device
  blocks that the agent fills, layer by layer, while the step that computes the rest of
  its prompt runs: those tokens count as computed. Where the prefix goes on on disk, the
  blocks are first fetched into host memory and verified there; the request waits
  (``Request.tier_job``) and then loads them like any host hit. A block whose file fails
  its checks is a miss: recomputed, never served.

NOTE (invariant, ``check_integrity``): a device block an order names (loaded into, or
stored from) keeps one reference per order until the agent's ``KVTierDone`` for it, so
the scheduler never hands out a block the agent may still read or write. Host slots and
disk files need no such hold: the agent runs orders strictly in the order they were made,
so every op issued before the one that overwrites a slot (or deletes a file) has run
before it. The one thing the order does not cover is a fetch that fails its checks: a
fetched block is not a hit (``TierEntry.ready``) until the agent says it passed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from ..config import CacheConfig
from ..protocol import KVTierDone, KVTierInventory, KVTierOp, KVTierOrder
from .block_manager import DISK, HOST, BlockManager
from .request import Request
from .tier_index import TierEntry, TierIndex

log = logging.getLogger(__name__)


@dataclass
class TierJob:
    """One order, from its first op until the agent's ``KVTierDone``."""

    held: list[int] = field(default_factory=list)  # device blocks it holds a reference on
    fetched: list[tuple[int, TierEntry, TierEntry]] = field(default_factory=list)  # (hash, host, disk entry)
    loaded: list[int] = field(default_factory=list)  # hashes it loads into the device pool


@dataclass
class TierStats:
    kv_host_loaded_blocks: int = 0  # blocks loaded back into the device pool from host memory
    kv_stored_blocks: int = 0  # blocks copied down to host memory
    kv_spilled_blocks: int = 0  # blocks written to disk
    kv_disk_fetched_blocks: int = 0  # blocks read back from disk (and verified) into host memory
    kv_disk_failed_blocks: int = 0  # disk blocks that failed their checks (or were gone): recomputed
    kv_tier_errors: int = 0  # loads the agent refused (its memory and this bookkeeping disagreed)
    kv_load_seconds: float = 0.0  # the agent's time loading blocks back, summed
    kv_load_wait_seconds: float = 0.0  # the workers' time waiting for those loads, summed
    kv_fetch_seconds: float = 0.0  # the agent's time reading (and checking) blocks from disk, summed


class KVTiers:
    """Host and disk tiers of one instance. Verbs: match, load, store_new, seal, take_orders,
    done, adopt, reset (see the module docstring)."""

    def __init__(self, blocks: BlockManager, cache: CacheConfig) -> None:
        self.blocks = blocks
        self.block_size = cache.block_size
        self.enabled = cache.tiers
        self.host = TierIndex("host", cache.host_blocks)
        self.disk = TierIndex("disk", cache.disk_blocks) if cache.disk_dir else None
        self.loads: list[KVTierOp] = []  # of the order being made; they go first
        self.ops: list[KVTierOp] = []  # its other ops, in the order they were decided
        self.job = TierJob()
        self.sealed: list[KVTierOrder] = []  # made, not yet taken by the actor
        self.jobs: dict[int, TierJob] = {}  # sent (or sealed), not yet done
        self.fetching: dict[int, int] = {}  # hash -> the order fetching it from disk (its host entry is pending)
        self.next_job = 1
        self.adopted = False  # the disk tier's blocks from an earlier run are known
        self.stats = TierStats()

    # -- up ------------------------------------------------------------------------------------
    def match(self, req: Request, start: int, limit: int) -> list[tuple[int, TierEntry]] | None:
        """Host blocks that continue ``req``'s device prefix hits (its first ``start``
        blocks), up to ``limit`` blocks: what to load. None when the prefix goes on on disk:
        those blocks are being fetched and ``req`` waits for them (``tier_job``)."""
        if not self.enabled:
            return []
        bs, hashes, tokens = self.block_size, req.block_hashes, req.known_token_ids()
        chain: list[tuple[int, TierEntry]] = []
        on_disk: list[tuple[int, TierEntry]] = []
        waits: list[int] = []  # orders already fetching some of its blocks
        on_the_way: list[int] = []  # those blocks
        for i in range(start, min(limit, len(hashes))):
            h, block_tokens = hashes[i], tuple(tokens[i * bs:(i + 1) * bs])
            entry = self.host.lookup(h, block_tokens)
            if entry is not None:
                chain.append((h, entry))
                continue
            if self.disk is None or req.tier_fetched:
                break
            pending = self.host.get(h)
            if pending is not None and h in self.fetching and pending.tokens == block_tokens:
                waits.append(self.fetching[h])  # on its way up for another request
                on_the_way.append(h)
            elif (found := self.disk.lookup(h, block_tokens)) is not None:
                on_disk.append((h, found))
            else:
                break
        for h, _ in chain:
            self.host.touch(h)
        if not (on_disk or waits):
            return chain
        # NOTE: what it waits for, and the host hits before it, stay in host memory until it
        # loads them: unpinned, blocks written down meanwhile pushed them out (a full
        # instance admits a request steps after its fetch) and the fetch was wasted (W8)
        self._pin(req, [h for h, _ in chain] + on_the_way)
        if on_disk:
            fetched = self._fetch(req, on_disk[: max(1, self.host.capacity // 2)])
            if fetched:
                waits.append(self.next_job)
        if not waits:
            return chain  # no room in host memory to fetch into: what is there now
        # NOTE: orders are answered in order, so the last of them done means all are
        req.tier_job = max(waits)
        req.tier_fetched = True  # once: a block that fails its checks is recomputed, not fetched again
        return None

    def release(self, req: Request) -> None:
        """``req`` loaded its host blocks (or left): they may be evicted again."""
        for h in req.tier_pins:
            self.host.unpin(h)
        req.tier_pins = []

    def _pin(self, req: Request, hashes: list[int]) -> None:
        """Pin ``hashes`` for ``req``, once each (it is matched again on every pass it waits)."""
        held = set(req.tier_pins)
        for h in hashes:
            if h not in held:
                held.add(h)
                self.host.pin(h)
                req.tier_pins.append(h)

    def load(self, chain: list[tuple[int, TierEntry]], device_blocks: list[int]) -> None:
        """Load ``chain`` (from ``match``) into ``device_blocks`` during the step being planned."""
        for (h, entry), b in zip(chain, device_blocks):
            self.loads.append(KVTierOp("load", h, entry.slot, b))
            self._hold(b)
            self.job.loaded.append(h)
        self.stats.kv_host_loaded_blocks += len(chain)

    def _fetch(self, req: Request, blocks: list[tuple[int, TierEntry]]) -> int:
        """Fetch ``blocks`` (a run of ``req``'s prefix) into host memory, pinned for ``req``,
        as far as there is room; returns how many."""
        n = 0
        for h, found in blocks:
            entry = self._host_put(h, found.parent, found.tokens, ready=False)
            if entry is None:
                break  # every host block is pinned by waiting requests
            self._pin(req, [h])
            self.ops.append(KVTierOp("fetch", h, entry.slot))
            self.job.fetched.append((h, entry, found))
            self.fetching[h] = self.next_job
            self.disk.touch(h)
            n += 1
        return n

    # -- down ----------------------------------------------------------------------------------
    def store_new(self) -> None:
        """Copy the blocks that just entered the device cache down to host memory."""
        for block, h, parent, tokens in self.blocks.take_new_cached():
            existing = self.host.get(h)
            if existing is not None and existing.ready:
                self.host.touch(h)
                continue
            entry = self._host_put(h, parent, tokens, ready=True)
            if entry is None:
                continue  # host memory is all pinned by waiting requests: this block is not kept
            entry.ready = True  # a pending fetch into it is overwritten by this store, after it
            self._hold(block)
            self.ops.append(KVTierOp("store", h, entry.slot, block, parent, list(tokens)))
            self.blocks.events.stored.append((h, parent, list(tokens), HOST))
            self.stats.kv_stored_blocks += 1

    def _host_put(self, h: int, parent: int, tokens, ready: bool) -> TierEntry | None:
        entry, evicted = self.host.put(h, parent, tokens, ready)
        if evicted is not None:
            old_hash, old = evicted
            if old.ready:
                self.blocks.events.removed.append((old_hash, HOST))
                self._spill(old_hash, old)
        return entry

    def _spill(self, h: int, entry: TierEntry) -> None:
        """``h`` leaves host memory: to disk, unless disk has it (or there is no disk)."""
        if self.disk is None or h in self.disk:
            return
        _, evicted = self.disk.put(h, entry.parent, entry.tokens)
        if evicted is not None:
            self.ops.append(KVTierOp("drop", evicted[0]))
            self.blocks.events.removed.append((evicted[0], DISK))
        self.ops.append(KVTierOp("spill", h, entry.slot))
        self.blocks.events.stored.append((h, entry.parent, list(entry.tokens), DISK))
        self.stats.kv_spilled_blocks += 1

    def _hold(self, block: int) -> None:
        self.blocks.hold(block)
        self.job.held.append(block)

    # -- orders --------------------------------------------------------------------------------
    def seal(self, step_id: int) -> bool:
        """End the order of the pass that planned step ``step_id``; True if it loads blocks
        that step reads (the workers then wait for them, layer by layer)."""
        if not (self.loads or self.ops):
            return False
        loads = bool(self.loads)
        self.sealed.append(KVTierOrder(self.next_job, step_id, self.loads + self.ops))
        self.jobs[self.next_job] = self.job
        self.next_job += 1
        self.loads, self.ops, self.job = [], [], TierJob()
        return loads

    def take_orders(self, step_id: int) -> list[KVTierOrder]:
        """The orders to send the agent now, oldest first (what was decided outside a plan,
        such as fetches, goes with ``step_id``, the last step planned: it waits for nothing)."""
        assert not self.loads, "loads are sealed with the step that reads them"
        self.seal(step_id)
        out, self.sealed = self.sealed, []
        return out

    def done(self, msg: KVTierDone) -> bool:
        """The agent finished an order: its device blocks are free to go, its fetched blocks
        are hits (or gone). False for an order that is not pending (dropped)."""
        job = self.jobs.pop(msg.job_id, None)
        if job is None:
            log.error("a tier answer for order %d, which is not pending: dropped", msg.job_id)
            return False
        for b in job.held:
            self.blocks.release(b)
        failed = set(msg.failed)
        for h, entry, on_disk in job.fetched:
            if self.fetching.get(h) == msg.job_id:
                del self.fetching[h]
            if h not in failed:
                if self.host.mark_ready(h, entry):
                    self.blocks.events.stored.append((h, entry.parent, list(entry.tokens), HOST))
                self.stats.kv_disk_fetched_blocks += 1
                continue
            self.stats.kv_disk_failed_blocks += 1
            if self.host.get(h) is entry and not entry.ready:
                self.host.remove(h)
            # NOTE: only the entry whose file failed: a newer one of the same hash has a new file
            if self.disk.get(h) is on_disk:
                self.disk.remove(h)
                self.blocks.events.removed.append((h, DISK))
        if bad := failed.intersection(job.loaded):
            self.stats.kv_tier_errors += len(bad)
            log.error("the KV agent refused %d loads of order %d: the host tier and its bookkeeping disagree",
                      len(bad), msg.job_id)
        self.stats.kv_load_seconds += msg.load_seconds
        self.stats.kv_fetch_seconds += msg.fetch_seconds
        return True

    def adopt(self, blocks) -> None:
        """The disk tier's blocks from an earlier run (``KVTierInventory``), oldest first;
        once (the agent reports them when it starts; a second report is not its)."""
        if self.disk is None or self.adopted:
            log.error("dropped a disk tier inventory: %s", "no disk tier" if self.disk is None else "one came already")
            return
        self.adopted = True
        for b in blocks:
            if b.block_hash in self.disk or len(b.token_ids) != self.block_size:
                continue
            _, evicted = self.disk.put(b.block_hash, b.parent_hash, tuple(b.token_ids))
            if evicted is not None:
                self.ops.append(KVTierOp("drop", evicted[0]))
                self.blocks.events.removed.append((evicted[0], DISK))
            self.blocks.events.stored.append((b.block_hash, b.parent_hash, list(b.token_ids), DISK))

    def reset(self) -> None:
        """Forget every block of both tiers (their files are deleted)."""
        self.host.clear()
        self.fetching.clear()
        if self.disk is not None:
            self.ops += [KVTierOp("drop", h) for h in self.disk.clear()]

    # -- introspection -------------------------------------------------------------------------
    def held(self) -> Counter:
        """Device block -> references orders hold on it."""
        return Counter(b for job in (*self.jobs.values(), self.job) for b in job.held)

    def check_integrity(self) -> dict[str, int]:
        host = self.host.check_integrity()
        disk = self.disk.check_integrity() if self.disk is not None else {"held": 0, "pending": 0}
        held = self.held()
        assert all(self.blocks.ref_counts[b] >= n for b, n in held.items()), "an order holds a free block"
        return {"agent_held": sum(held.values()), "host_blocks": host["held"], "host_pending": host["pending"],
                "disk_blocks": disk["held"], "tier_orders_pending": len(self.jobs)}

    def snapshot(self) -> dict:
        return {**self.stats.__dict__, "kv_host_blocks": len(self.host),
                "kv_disk_blocks": len(self.disk) if self.disk is not None else 0,
                "kv_tier_orders_pending": len(self.jobs)}


class TierVerbs:
    """Mixed into ``Scheduler``: what its actor calls for the KV tiers. Expects of the
    scheduler ``tiers``, ``blocks``, ``waiting`` and ``_step_id``."""

    def take_tier_orders(self) -> list[KVTierOrder]:
        """What the KV agent must do, oldest first: send before the step just planned."""
        return self.tiers.take_orders(self._step_id)

    def tier_done(self, msg: KVTierDone) -> None:
        """The agent finished an order: its blocks are free to go; requests waiting for a
        fetch from disk may be admitted."""
        if self.tiers.done(msg):
            for req in self.waiting:
                if 0 < req.tier_job <= msg.job_id:  # orders are answered in order
                    req.tier_job = 0

    def tier_inventory(self, msg: KVTierInventory) -> None:
        """The disk tier's blocks from an earlier run of this instance."""
        self.tiers.adopt(msg.blocks)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block of every tier; False (nothing forgotten) while some
        block is referenced (by a request, or by the agent)."""
        if not self.blocks.reset_prefix_cache():
            return False
        self.tiers.reset()
        return True
