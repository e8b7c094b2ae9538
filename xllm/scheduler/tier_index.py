"""The bookkeeping of one KV tier below the device pool (host memory, or disk): which
blocks it holds, in which slot, and which goes first when it is full (least recently used).

Pure Python, no bytes: the scheduler keeps one ``TierIndex`` per tier and decides; its KV
agent holds the bytes and moves them (``xllm.kv_transfer.tier_mover``). Blocks are keyed
by the same chained hashes as the device prefix cache (``xllm.block_hash``), and each
entry keeps its block's token ids so a hit is checked against the request's own tokens,
not trusted on its hash alone.

An entry is ``ready`` once its bytes are (or, in the agent's order of work, will be) the
block's: a block the device pool stores down is ready at once (the agent copies it before
it runs any later order); a block fetched up from disk is not, until the agent has read
and verified it (a corrupt file must never be loaded into the device pool).

A block can be pinned (by a request waiting to load it): eviction passes it over, and a
tier whose every block is pinned takes no new one until a pin goes.

NOTE (invariant, ``check_integrity``): every slot is either free or holds exactly one
entry; entries + free slots == capacity; the LRU order lists exactly the entries.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class TierEntry:
    """One block in a tier."""

    slot: int  # where its bytes are (host: a slot of the agent's memory; disk: a count, files go by hash)
    parent: int  # its parent block's hash (ROOT_HASH for a first block)
    tokens: tuple[int, ...]  # its token ids: a hit must hold these very tokens
    ready: bool = True  # False while a fetch into it is unconfirmed: not a hit yet


class TierIndex:
    """hash -> entry, LRU first. Verbs: lookup, touch, put, remove, mark_ready, pin, unpin, clear."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.entries: OrderedDict[int, TierEntry] = OrderedDict()  # least recently used first
        self.free_slots: list[int] = list(range(capacity - 1, -1, -1))  # popped from the end: 0 first
        self.pins: Counter[int] = Counter()  # hash -> pins on it (a hash may be pinned before it is here)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.entries

    def get(self, block_hash: int) -> TierEntry | None:
        return self.entries.get(block_hash)

    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> TierEntry | None:
        """The ready entry of ``block_hash`` if it holds ``tokens``; None otherwise."""
        entry = self.entries.get(block_hash)
        # NOTE: trust, but verify the hash: a hit must hold these very tokens
        if entry is None or not entry.ready or entry.tokens != tokens:
            return None
        return entry

    def touch(self, block_hash: int) -> None:
        """Mark ``block_hash`` as just used (last to be evicted)."""
        if block_hash in self.entries:
            self.entries.move_to_end(block_hash)

    def put(self, block_hash: int, parent: int, tokens: tuple[int, ...],
            ready: bool = True) -> tuple[TierEntry | None, tuple[int, TierEntry] | None]:
        """Enter a block (or touch it, if already here). Returns its entry (None when every
        block here is pinned: no room) and the entry it evicted to make room, as ``(hash,
        entry)``, or None."""
        entry = self.entries.get(block_hash)
        if entry is not None:
            self.entries.move_to_end(block_hash)
            return entry, None
        evicted = None
        if not self.free_slots:
            victim = next((h for h in self.entries if h not in self.pins), None)
            if victim is None:
                return None, None
            old = self.entries.pop(victim)
            self.free_slots.append(old.slot)
            evicted = (victim, old)
        entry = TierEntry(self.free_slots.pop(), parent, tuple(tokens), ready)
        self.entries[block_hash] = entry
        return entry, evicted

    def remove(self, block_hash: int) -> TierEntry | None:
        """Forget ``block_hash``; its slot is free again. Returns its entry, if it was here."""
        entry = self.entries.pop(block_hash, None)
        if entry is not None:
            self.free_slots.append(entry.slot)
        return entry

    def mark_ready(self, block_hash: int, entry: TierEntry) -> bool:
        """``entry`` (of ``block_hash``) now holds its block's bytes; False if it is no
        longer this tier's entry for that hash (evicted, or replaced)."""
        if self.entries.get(block_hash) is not entry:
            return False
        entry.ready = True
        return True

    def pin(self, block_hash: int) -> None:
        """Keep ``block_hash`` from eviction until as many ``unpin`` calls."""
        self.pins[block_hash] += 1

    def unpin(self, block_hash: int) -> None:
        n = self.pins.get(block_hash, 0)
        if n <= 1:
            self.pins.pop(block_hash, None)
        else:
            self.pins[block_hash] = n - 1

    def clear(self) -> list[int]:
        """Forget everything; returns the hashes that were here."""
        hashes = list(self.entries)
        for h in hashes:
            self.remove(h)
        return hashes

    # -- invariants ------------------------------------------------------------------------
    def check_integrity(self) -> dict[str, int]:
        """Assert the bookkeeping is consistent; returns the held/free/pending counts."""
        slots = [e.slot for e in self.entries.values()]
        assert len(set(slots)) == len(slots), f"{self.name}: a slot holds two blocks"
        assert not set(slots) & set(self.free_slots), f"{self.name}: a slot is both free and held"
        assert len(set(self.free_slots)) == len(self.free_slots), f"{self.name}: a slot is free twice"
        assert len(self.entries) + len(self.free_slots) == self.capacity, f"{self.name}: slots lost"
        assert all(0 <= s < self.capacity for s in slots + self.free_slots), f"{self.name}: a slot out of range"
        pending = sum(1 for e in self.entries.values() if not e.ready)
        return {"held": len(self.entries), "free": len(self.free_slots), "pending": pending}
