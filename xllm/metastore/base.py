"""The metadata store interface: a small key-value store with leases and prefix watches.

Two implementations: ``MemoryStore`` (embedded: one host, no outside service; other
processes reach it through ``StoreClient``) and ``EtcdStore`` (etcd v3 through
``aetcd``). Keys and values are bytes; where xllm keeps what is documented in
``keys``. A key put under a lease vanishes when the lease is not kept alive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Mapping, Protocol


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
    """The store at ``url``: ``etcd://HOST:PORT`` (with the user, password and TLS files of
    ``etcd_access``), or ``embedded`` (the deployment's own store actor, reached at
    ``client_address``)."""
    if url.startswith("etcd://"):
        from .etcd import EtcdStore

        host, _, port = url.removeprefix("etcd://").rpartition(":")
        return EtcdStore(host or "127.0.0.1", int(port or 2379), **{**etcd_access(), **(options or {})})
    if url == "embedded":
        from .client import StoreClient

        return StoreClient(client_address, options=options)
    raise ValueError(f"unknown metadata store {url!r}: use embedded or etcd://HOST:PORT")


# NOTE: how to reach etcd comes from the environment, never the command line (where ps shows
# it) or the plan file. The variable of each ``EtcdStore`` argument:
ETCD_VARIABLES = {"username": "XLLM_ETCD_USER", "password": "XLLM_ETCD_PASSWORD",
                  "ca": "XLLM_ETCD_CA", "cert": "XLLM_ETCD_CERT", "key": "XLLM_ETCD_KEY"}
_PAIRS = (("username", "password"), ("cert", "key"))
_FILES = ("ca", "cert", "key")


def etcd_access(env: Mapping[str, str] = os.environ) -> dict[str, str | bytes]:
    """``EtcdStore``'s keyword arguments from ``env``: a user and password, and for TLS the
    contents of a CA bundle that verifies etcd's certificate and of a client certificate and
    its key (files named by the variables). Unset or empty variables are left out.

    Raises ``ValueError`` naming the variable when a pair is given by half or a file cannot
    be read as PEM, so that a bad setting stops a launcher before anything starts.
    """
    given = {arg: env[var] for arg, var in ETCD_VARIABLES.items() if env.get(var)}
    for pair in _PAIRS:
        if len(set(pair) & given.keys()) == 1:
            have, missing = pair if pair[0] in given else pair[::-1]
            raise ValueError(f"{ETCD_VARIABLES[have]} is set but {ETCD_VARIABLES[missing]} is not: "
                             "give both or neither")
    return {arg: _read_pem(ETCD_VARIABLES[arg], v) if arg in _FILES else v for arg, v in given.items()}


def _read_pem(variable: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{variable}={path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{variable}={path}: not a PEM file")
    return data
