"""The embedded store: keys, leases and watches in one process's memory.

The deployment's ``store`` actor serves one of these to the other processes of a host
(``server.StoreActor``); tests use it directly. Revisions count every change, as
etcd's do, so a watcher that asks "what changed after revision r" misses nothing that
is still in the recent history.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import AsyncIterator

from .base import WatchEvent

HISTORY = 10_000  # changes kept for watchers that catch up


class MemoryStore:
    """In-memory ``MetaStore``. Expired leases are swept on every call and every 0.5 s."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.data: dict[bytes, tuple[bytes, int | None]] = {}  # key -> (value, lease)
        self.leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, deadline)
        self.revision = 0
        self.history: deque[WatchEvent] = deque(maxlen=HISTORY)
        self._changed = asyncio.Condition()
        self._lease_ids = itertools.count(1)

    # -- keys -----------------------------------------------------------------------------
    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self._sweep()
        if lease is not None and lease not in self.leases:
            raise KeyError(f"lease {lease} does not exist (it expired)")
        self.data[key] = (value, lease)
        await self._record(key, value)

    async def get(self, key: bytes) -> bytes | None:
        await self._sweep()
        item = self.data.get(key)
        return item[0] if item else None

    async def get_prefix(self, prefix: bytes) -> dict[bytes, bytes]:
        await self._sweep()
        return {k: v for k, (v, _) in self.data.items() if k.startswith(prefix)}

    async def read_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        return await self.get_prefix(prefix), self.revision

    async def delete(self, key: bytes) -> bool:
        await self._sweep()
        if self.data.pop(key, None) is None:
            return False
        await self._record(key, None)
        return True

    # -- leases ---------------------------------------------------------------------------
    async def grant_lease(self, ttl_s: int) -> int:
        lease = next(self._lease_ids)
        self.leases[lease] = (float(ttl_s), self.clock() + ttl_s)
        return lease

    async def keep_alive(self, lease: int) -> bool:
        await self._sweep()
        if lease not in self.leases:
            return False
        ttl, _ = self.leases[lease]
        self.leases[lease] = (ttl, self.clock() + ttl)
        return True

    async def revoke_lease(self, lease: int) -> None:
        self.leases.pop(lease, None)
        await self._drop_keys_of({lease})

    async def _sweep(self) -> None:
        now = self.clock()
        gone = {lease for lease, (_, deadline) in self.leases.items() if deadline <= now}
        for lease in gone:
            del self.leases[lease]
        if gone:
            await self._drop_keys_of(gone)

    async def _drop_keys_of(self, leases: set[int]) -> None:
        for key in [k for k, (_, lease) in self.data.items() if lease in leases]:
            del self.data[key]
            await self._record(key, None)

    # -- watches --------------------------------------------------------------------------
    async def _record(self, key: bytes, value: bytes | None) -> None:
        self.revision += 1
        self.history.append(WatchEvent(key, value, self.revision))
        async with self._changed:
            self._changed.notify_all()

    def changes_after(self, prefix: bytes, revision: int) -> list[WatchEvent]:
        """Changes under ``prefix`` with a revision above ``revision`` still in the history."""
        return [e for e in self.history if e.revision > revision and e.key.startswith(prefix)]

    async def wait_changes(self, prefix: bytes, revision: int, timeout_s: float) -> list[WatchEvent]:
        """``changes_after``, waiting up to ``timeout_s`` for the first one."""
        deadline = self.clock() + timeout_s
        while True:
            await self._sweep()
            found = self.changes_after(prefix, revision)
            left = deadline - self.clock()
            if found or left <= 0:
                return found
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def watch_prefix(self, prefix: bytes, after: int | None = None) -> AsyncIterator[WatchEvent]:
        seen = self.revision if after is None else after
        while True:
            for event in await self.wait_changes(prefix, seen, 1.0):
                seen = event.revision
                yield event

    async def close(self) -> None:
        pass
