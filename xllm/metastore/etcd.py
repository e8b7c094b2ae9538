"""``EtcdStore``: the ``MetaStore`` verbs against etcd v3, through ``aetcd`` (asyncio).

Every aetcd or gRPC failure surfaces as ``StoreUnavailable``, so callers retry the same
way for etcd and for the embedded store. aetcd keeps no lease alive by itself: the
registration loop (``registration.Registration``) refreshes leases at a third of
their TTL. aetcd 1.0 has no TLS option; ``TlsClient`` adds one.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aetcd
import grpc
from aetcd import rpc
from aetcd.watcher import Watcher

from .base import StoreUnavailable, WatchEvent

CALL_TIMEOUT_S = 3


class TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel when given ``tls`` credentials (plain text without).

    NOTE: aetcd 1.0's ``connect`` always opens a plain-text channel. This one opens the
    channel itself and then sets up what aetcd's sets up: the token of ``username`` and
    ``password``, the stubs and the watcher (aetcd's attributes, hence the pin to 1.0.x).
    """

    def __init__(self, *, tls: grpc.ChannelCredentials | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self._tls = tls
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connected.is_set():
                return
            self.channel = self._channel()
            if self._username is not None:
                self.metadata = (("token", await self._token()),)
            self.kvstub, self.leasestub = rpc.KVStub(self.channel), rpc.LeaseStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()

    def _channel(self) -> grpc.aio.Channel:
        target, options = f"{self._host}:{self._port}", list(self._options.items())
        if self._tls is None:
            return grpc.aio.insecure_channel(target, options)
        return grpc.aio.secure_channel(target, self._tls, options)

    async def _token(self) -> str:
        """The token of ``username``; the channel is closed when etcd does not give one."""
        self.auth_stub = rpc.AuthStub(self.channel)
        request = rpc.AuthenticateRequest(name=self._username, password=self._password)
        try:
            return (await self.auth_stub.Authenticate(request, timeout=self._timeout)).token
        except BaseException:
            await self.channel.close()
            self._init_channel_attrs()
            raise


class EtcdStore:
    """A ``MetaStore`` in an etcd cluster (``etcd://HOST:PORT``).

    Over TLS when given ``ca`` (PEM: the CA bundle that verifies etcd's certificate; without
    it, gRPC's default roots do) or a client ``cert`` and its ``key`` (PEM, for etcd's
    ``--client-cert-auth``); ``open_store`` takes them from the environment.
    """

    def __init__(self, host: str, port: int = 2379, username: str | None = None,
                 password: str | None = None, ca: bytes | None = None, cert: bytes | None = None,
                 key: bytes | None = None) -> None:
        tls = grpc.ssl_channel_credentials(ca, key, cert) if ca or cert else None
        self.client = TlsClient(host=host, port=port, username=username, password=password, tls=tls,
                                timeout=CALL_TIMEOUT_S, connect_wait_timeout=CALL_TIMEOUT_S)

    async def _do(self, coro) -> Any:
        try:
            return await asyncio.wait_for(coro, CALL_TIMEOUT_S + 1)
        except (asyncio.TimeoutError, aetcd.exceptions.ClientError, OSError) as exc:
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
        except (aetcd.exceptions.ClientError, OSError) as exc:
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
