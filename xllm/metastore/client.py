"""``StoreClient``: the ``MetaStore`` verbs against a deployment's store actor, over ZeroMQ."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from ..bus.channel import Channel
from ..protocol import ControlCall, ControlReply, ErrorReply, StoreOutput
from .base import StoreUnavailable, WatchEvent

CALL_TIMEOUT_S = 3.0


class StoreClient:
    """A ``MetaStore`` whose data lives in the store actor at ``address``."""

    def __init__(self, address: str, options: dict | None = None) -> None:
        self.address = address
        self._ctx = zmq.asyncio.Context()
        self._ch = Channel(self._ctx, zmq.DEALER, address, bind=False, union=StoreOutput,
                           options=options)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def _call(self, method: str, timeout_s: float = CALL_TIMEOUT_S, **args: Any) -> Any:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        call_id = next(self._ids)
        fut = self._waiting[call_id] = asyncio.get_running_loop().create_future()
        try:
            await self._ch.send(ControlCall(call_id, method, args))
            reply: ControlReply = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"the store at {self.address} did not answer {method}") from None
        finally:
            self._waiting.pop(call_id, None)
        if not reply.ok:
            raise KeyError(reply.error) if "KeyError" in (reply.error or "") else ValueError(reply.error)
        return reply.result

    async def _read(self) -> None:
        while True:
            msg = await self._ch.recv()
            if isinstance(msg, ControlReply):
                fut = self._waiting.get(msg.call_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, ErrorReply):
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(ValueError(msg.message))

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self._call("store.put", key=key, value=value, lease=lease)

    async def get(self, key: bytes) -> bytes | None:
        return await self._call("store.get", key=key)

    async def get_prefix(self, prefix: bytes) -> dict[bytes, bytes]:
        return {k: v for k, v in await self._call("store.get_prefix", prefix=prefix)}

    async def read_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        got = await self._call("store.read_prefix", prefix=prefix)
        return {k: v for k, v in got["items"]}, got["revision"]

    async def delete(self, key: bytes) -> bool:
        return await self._call("store.delete", key=key)

    async def grant_lease(self, ttl_s: int) -> int:
        return await self._call("store.grant", ttl=ttl_s)

    async def keep_alive(self, lease: int) -> bool:
        return await self._call("store.keep_alive", lease=lease)

    async def revoke_lease(self, lease: int) -> None:
        await self._call("store.revoke", lease=lease)

    async def watch_prefix(self, prefix: bytes, after: int | None = None) -> AsyncIterator[WatchEvent]:
        seen = after if after is not None else (
            await self._call("store.changes", prefix=prefix, after=None))["revision"]
        while True:
            got = await self._call("store.changes", CALL_TIMEOUT_S + 2.0, prefix=prefix, after=seen,
                                   timeout=CALL_TIMEOUT_S)
            for key, value, revision in got["events"]:
                seen = revision
                yield WatchEvent(key, value, revision)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._ch.close()
        self._ctx.term()
