"""The metadata store interface: a small key-value store with leases and prefix watches.

Two implementations: ``MemoryStore`` (embedded: one host, no outside service; other
processes reach it through ``StoreClient``) and ``EtcdStore`` (etcd v3 through
``aetcd``). Keys and values are bytes; where xllm keeps what is documented in
``keys``. A key put under a lease vanishes when the lease is not kept alive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import AsyncIterator, Protocol


class StoreUnavailable(ConnectionError):
    """The store did not answer (it is down, or unreachable); the call may be retried."""


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched prefix: ``value`` is None for a delete."""

    key: bytes
    value: bytes | None
    revision: int


class MetaStore(Protocol):
    """What xllm needs of a metadata store. Every verb may raise ``StoreUnavailable``."""

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None: ...

    async def get(self, key: bytes) -> bytes | None: ...

    async def get_prefix(self, prefix: bytes) -> dict[bytes, bytes]: ...

    async def read_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        """``get_prefix`` and the store's revision at that read (to watch from)."""

    async def delete(self, key: bytes) -> bool: ...

    async def grant_lease(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; returns its id."""

    async def keep_alive(self, lease: int) -> bool:
        """Refresh ``lease``; False when it has expired (its keys are gone)."""

    async def revoke_lease(self, lease: int) -> None: ...

    def watch_prefix(self, prefix: bytes, after: int | None = None) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` with a revision above ``after`` (None: from now on), in
        order, until the iterator is closed. Raises ``StoreUnavailable`` when the store goes
        away (watch again to resume). With ``read_prefix``'s revision as ``after``, a reader
        misses no change between its read and its watch."""

    async def close(self) -> None: ...


def open_store(url: str, *, client_address: str = "", options: dict | None = None) -> MetaStore:
    """The store at ``url``: ``etcd://HOST:PORT``, or ``embedded`` (the deployment's own store
    actor, reached at ``client_address``)."""
    if url.startswith("etcd://"):
        from .etcd import EtcdStore

        host, _, port = url.removeprefix("etcd://").rpartition(":")
        # NOTE: credentials come from the environment, never the command line or the plan file
        auth = {"username": os.environ.get("XLLM_ETCD_USER"), "password": os.environ.get("XLLM_ETCD_PASSWORD")}
        auth = {k: v for k, v in auth.items() if v}
        return EtcdStore(host or "127.0.0.1", int(port or 2379), **{**auth, **(options or {})})
    if url == "embedded":
        from .client import StoreClient

        return StoreClient(client_address, options=options)
    raise ValueError(f"unknown metadata store {url!r}: use embedded or etcd://HOST:PORT")
