"""Living with the store: keep a record registered, and follow the records under a prefix.

Both survive the store going away: a registration is re-made (a new lease) as soon as
the store answers again, and a follower re-reads the prefix and watches anew.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from .base import MetaStore, StoreUnavailable
from .keys import LEASE_TTL_S

log = logging.getLogger(__name__)

RETRY_S = 0.5
RESYNC_S = 5.0  # a follower re-reads its prefix this often, whatever the watch said


class Registration:
    """Keeps ``value`` at ``key`` under a lease of ``ttl_s``, refreshed every ``ttl_s / 3``."""

    def __init__(self, store: MetaStore, key: bytes, value: bytes, ttl_s: int = LEASE_TTL_S) -> None:
        self.store, self.key, self.value, self.ttl_s = store, key, value, ttl_s
        self.lease: int | None = None
        self.registered = asyncio.Event()
        self.num_registrations = 0

    async def run(self) -> None:
        """Register, keep alive, re-register; until cancelled."""
        while True:
            try:
                self.lease = await self.store.grant_lease(self.ttl_s)
                await self.store.put(self.key, self.value, self.lease)
                self.num_registrations += 1
                if self.num_registrations > 1:
                    log.info("re-registered %s", self.key.decode())
                self.registered.set()
                while await self._keep_alive():
                    pass
                log.warning("the lease of %s expired; registering again", self.key.decode())
            except (StoreUnavailable, KeyError) as exc:
                if self.registered.is_set():
                    log.warning("lost the metadata store (%s); retrying", exc)
                await asyncio.sleep(RETRY_S)
            self.registered.clear()

    async def update(self, value: bytes) -> None:
        """Replace the record (under the same lease). If the store does not answer now, the
        next registration puts the new value."""
        self.value = value
        if self.lease is None or not self.registered.is_set():
            return
        try:
            await self.store.put(self.key, value, self.lease)
        except (StoreUnavailable, KeyError) as exc:
            log.warning("could not update %s now (%s); the next registration will", self.key.decode(), exc)

    async def _keep_alive(self) -> bool:
        await asyncio.sleep(self.ttl_s / 3)
        return await self.store.keep_alive(self.lease)

    async def withdraw(self) -> None:
        """Remove the record now (a clean stop), if the store answers."""
        if self.lease is not None:
            try:
                await self.store.revoke_lease(self.lease)
            except StoreUnavailable:
                pass


class PrefixFollower:
    """Calls ``on_put(key, value)`` and ``on_delete(key)`` so that the caller's view of the
    records under ``prefix`` follows the store: a first full read, then the watch, and a
    full re-read every ``RESYNC_S`` (and after any outage) to repair what a watch missed."""

    def __init__(self, store: MetaStore, prefix: bytes, on_put: Callable[[bytes, bytes], Awaitable[None]],
                 on_delete: Callable[[bytes], Awaitable[None]]) -> None:
        self.store, self.prefix = store, prefix
        self.on_put, self.on_delete = on_put, on_delete
        self.known: dict[bytes, bytes] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                revision = await self._resync()
                watching = asyncio.ensure_future(self._watch(revision))
                try:
                    while True:
                        done, _ = await asyncio.wait({watching}, timeout=RESYNC_S)
                        if done:
                            watching.result()  # raises what ended the watch
                            break
                        await self._resync()
                finally:
                    watching.cancel()
                    await asyncio.gather(watching, return_exceptions=True)
            except StoreUnavailable as exc:
                log.warning("cannot follow %s (%s); retrying", self.prefix.decode(), exc)
                await asyncio.sleep(RETRY_S)

    async def _resync(self) -> int:
        """Read the prefix again and apply the differences; the revision of the read."""
        now, revision = await self.store.read_prefix(self.prefix)
        for key in [k for k in self.known if k not in now]:
            await self._apply(key, None)
        for key, value in now.items():
            if self.known.get(key) != value:
                await self._apply(key, value)
        self.synced.set()
        return revision

    async def _watch(self, after: int) -> None:
        async for event in self.store.watch_prefix(self.prefix, after):
            await self._apply(event.key, event.value)

    async def _apply(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            if self.known.pop(key, None) is not None:
                await self.on_delete(key)
        elif self.known.get(key) != value:
            self.known[key] = value
            await self.on_put(key, value)
