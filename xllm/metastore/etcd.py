"""``EtcdStore``: the ``MetaStore`` verbs against etcd v3, through ``aetcd`` (asyncio).

Every aetcd or gRPC failure surfaces as ``StoreUnavailable``, so callers retry the same
way for etcd and for the embedded store. aetcd keeps no lease alive by itself: the
registration loop (``registration.Registration``) refreshes leases at a third of
their TTL.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from .base import StoreUnavailable, WatchEvent

CALL_TIMEOUT_S = 3


class EtcdStore:
    """A ``MetaStore`` in an etcd cluster (``etcd://HOST:PORT``)."""

    def __init__(self, host: str, port: int = 2379, username: str | None = None,
                 password: str | None = None) -> None:
        import aetcd

        self._aetcd = aetcd
        self.client = aetcd.Client(host=host, port=port, username=username, password=password,
                                   timeout=CALL_TIMEOUT_S, connect_wait_timeout=CALL_TIMEOUT_S)

    async def _do(self, coro) -> Any:
        try:
            return await asyncio.wait_for(coro, CALL_TIMEOUT_S + 1)
        except (asyncio.TimeoutError, self._aetcd.exceptions.ClientError, OSError) as exc:
            raise StoreUnavailable(f"etcd did not answer: {exc!r}") from None

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self._do(self.client.put(key, value, lease=lease))

    async def get(self, key: bytes) -> bytes | None:
        got = await self._do(self.client.get(key))
        return got.value if got is not None else None

    async def get_prefix(self, prefix: bytes) -> dict[bytes, bytes]:
        got = await self._do(self.client.get_prefix(prefix))
        return {kv.key: kv.value for kv in got}

    async def read_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        got = await self._do(self.client.get_prefix(prefix))
        return {kv.key: kv.value for kv in got}, got.header.revision

    async def delete(self, key: bytes) -> bool:
        return (await self._do(self.client.delete(key))) is not None

    async def grant_lease(self, ttl_s: int) -> int:
        return (await self._do(self.client.lease(ttl_s))).id

    async def keep_alive(self, lease: int) -> bool:
        reply = await self._do(self.client.refresh_lease(lease))
        return reply is not None and reply.TTL > 0

    async def revoke_lease(self, lease: int) -> None:
        await self._do(self.client.revoke_lease(lease))

    async def watch_prefix(self, prefix: bytes, after: int | None = None) -> AsyncIterator[WatchEvent]:
        start = after + 1 if after is not None else None
        watch = await self._do(self.client.watch_prefix(prefix, start_revision=start))
        try:
            async for event in watch:
                value = event.kv.value if event.kind == "PUT" else None
                yield WatchEvent(event.kv.key, value, event.kv.mod_revision)
        except (self._aetcd.exceptions.ClientError, OSError) as exc:
            raise StoreUnavailable(f"the etcd watch ended: {exc!r}") from None
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1)
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), 2)
        except Exception:  # noqa: BLE001
            pass
