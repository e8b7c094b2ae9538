"""The metadata store's verbs behave the same embedded and on a real etcd (plain or over
TLS); an etcd with a user or a client-certificate check admits only those it should."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from tests.etcd import make_tls_files, running_etcd
from xllm.bus.channel import Channel
from xllm.metastore import StoreUnavailable, open_store
from xllm.metastore.client import StoreClient
from xllm.metastore.memory import MemoryStore
from xllm.metastore.registration import PrefixFollower, Registration
from xllm.metastore.server import StoreServer
from xllm.protocol import StoreInput

TTL = 2  # etcd's shortest lease


@asynccontextmanager
async def served_store(tmp_path):
    """The embedded store as a deployment has it: a server on a socket, a client."""
    ctx = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/store"
    server = StoreServer(Channel(ctx, zmq.ROUTER, address, bind=True, union=StoreInput), MemoryStore())
    task = asyncio.ensure_future(server.serve())
    client = StoreClient(address)
    try:
        yield client
    finally:
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.sock.close()
        ctx.term()


@pytest.fixture(params=["memory", "served", "etcd", "etcd-tls"])
def backend(request, tmp_path, monkeypatch):
    """The store's kind, a directory for it, and for etcd-tls its certificates (which the
    environment hands to ``open_store``)."""
    tls = make_tls_files(tmp_path / "tls") if request.param == "etcd-tls" else None
    if tls is not None:
        use_tls(monkeypatch, tls.ca, tls.client_cert, tls.client_key)
    return request.param, tmp_path, tls


def use_tls(monkeypatch, ca: Path | None, cert: Path | None = None, key: Path | None = None) -> None:
    """Set XLLM_ETCD_CA, _CERT and _KEY to these files; unset those given None."""
    for variable, path in (("XLLM_ETCD_CA", ca), ("XLLM_ETCD_CERT", cert), ("XLLM_ETCD_KEY", key)):
        if path is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, str(path))


@asynccontextmanager
async def store_for(backend):
    kind, tmp_path, tls = backend
    if kind == "memory":
        yield MemoryStore()
    elif kind == "served":
        async with served_store(tmp_path) as s:
            yield s
    else:
        with running_etcd(tmp_path, tls=tls) as etcd:
            store = open_store(etcd.url)
            try:
                yield store
            finally:
                await store.close()


async def _next_event(it, timeout=10.0):
    return await asyncio.wait_for(it.__anext__(), timeout)


async def test_keys_prefixes_and_deletes(backend):
    async with store_for(backend) as s:
        await s.put(b"/a/1", b"one")
        await s.put(b"/a/2", b"two")
        await s.put(b"/b/1", b"other")
        assert await s.get(b"/a/1") == b"one"
        assert await s.get(b"/nothing") is None
        assert await s.get_prefix(b"/a/") == {b"/a/1": b"one", b"/a/2": b"two"}
        assert await s.delete(b"/a/1") is True
        assert await s.get_prefix(b"/a/") == {b"/a/2": b"two"}


async def test_a_lease_kept_alive_keeps_its_key_and_an_expired_one_removes_it(backend):
    async with store_for(backend) as s:
        kept, dropped = await s.grant_lease(TTL), await s.grant_lease(TTL)
        await s.put(b"/l/kept", b"k", kept)
        await s.put(b"/l/dropped", b"d", dropped)
        for _ in range(8):  # 4 s: twice the TTL
            await asyncio.sleep(0.5)
            assert await s.keep_alive(kept)
        assert await s.get(b"/l/kept") == b"k"
        assert await s.get(b"/l/dropped") is None
        assert not await s.keep_alive(dropped)


async def test_watch_sees_puts_deletes_and_expiries(backend):
    async with store_for(backend) as s:
        watch = s.watch_prefix(b"/w/")
        first = asyncio.ensure_future(_next_event(watch))
        await asyncio.sleep(0.3)  # the watch is in place
        lease = await s.grant_lease(TTL)
        await s.put(b"/w/x", b"1", lease)
        event = await first
        assert (event.key, event.value) == (b"/w/x", b"1")
        await s.put(b"/other", b"not watched")
        await s.put(b"/w/y", b"2")
        assert (await _next_event(watch)).key == b"/w/y"
        await s.delete(b"/w/y")
        assert ((e := await _next_event(watch)).key, e.value) == (b"/w/y", None)
        expired = await _next_event(watch, timeout=15)  # the lease runs out
        assert (expired.key, expired.value) == (b"/w/x", None)
        await watch.aclose()


async def test_registration_and_follower_survive_an_etcd_restart(tmp_path):
    """A registration is re-made when a wiped etcd comes back; a follower sees it leave and return."""
    with running_etcd(tmp_path) as etcd:
        store = open_store(etcd.url)
        reg = Registration(store, b"/xllm/t/instances/i0", b"record", ttl_s=TTL)
        seen: list[tuple[str, bytes]] = []

        async def put(key, value):
            seen.append(("put", key))

        async def delete(key):
            seen.append(("delete", key))

        follower = PrefixFollower(store, b"/xllm/t/instances/", put, delete)
        tasks = [asyncio.ensure_future(reg.run()), asyncio.ensure_future(follower.run())]
        try:
            await asyncio.wait_for(reg.registered.wait(), 10)
            await _until(lambda: ("put", b"/xllm/t/instances/i0") in seen)
            etcd.stop()
            etcd.wipe()
            with pytest.raises(StoreUnavailable):
                await store.get(b"/x")
            etcd.start()
            await _until(lambda: reg.num_registrations >= 2, 30)
            assert await store.get(b"/xllm/t/instances/i0") == b"record"
            await reg.withdraw()  # a clean stop removes the record at once
            await _until(lambda: seen[-1] == ("delete", b"/xllm/t/instances/i0"), 15)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.close()


async def _until(predicate, limit_s: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), limit_s)  # a bound on the test, not a measurement


async def test_an_etcd_with_authentication_admits_only_its_user(tmp_path, monkeypatch):
    """Credentials come from XLLM_ETCD_USER / XLLM_ETCD_PASSWORD (never the command line)."""
    with running_etcd(tmp_path) as etcd:
        for cmd in (["user", "add", "root:s3cret"], ["auth", "enable"]):
            assert etcd.ctl(*cmd).returncode == 0
        monkeypatch.setenv("XLLM_ETCD_USER", "root")
        monkeypatch.setenv("XLLM_ETCD_PASSWORD", "s3cret")
        store = open_store(etcd.url)
        try:
            await store.put(b"/t/k", b"v")
            assert await store.get(b"/t/k") == b"v"
        finally:
            await store.close()
        monkeypatch.setenv("XLLM_ETCD_PASSWORD", "wrong")
        await _refused(etcd.url)
        monkeypatch.delenv("XLLM_ETCD_USER")
        monkeypatch.delenv("XLLM_ETCD_PASSWORD")
        await _refused(etcd.url)


async def _refused(url: str) -> None:
    """A store opened with the environment as it is can neither write nor read."""
    store = open_store(url)
    try:
        with pytest.raises(StoreUnavailable):
            await store.put(b"/t/refused", b"v")
        with pytest.raises(StoreUnavailable):
            await store.get(b"/t/k")
    finally:
        await store.close()


async def _put(url: str, key: bytes, value: bytes) -> None:
    store = open_store(url)
    try:
        await store.put(key, value)
    finally:
        await store.close()


async def _reads(url: str) -> dict[bytes, bytes]:
    """Everything under /t/, read by a store opened with the environment as it is."""
    store = open_store(url)
    try:
        return await store.get_prefix(b"/t/")
    finally:
        await store.close()


async def test_an_etcd_over_tls_admits_only_clients_with_its_ca_and_a_client_certificate(tmp_path, monkeypatch):
    """XLLM_ETCD_CA verifies etcd; XLLM_ETCD_CERT and _KEY answer its --client-cert-auth."""
    ours, other = make_tls_files(tmp_path / "ours"), make_tls_files(tmp_path / "other")
    with running_etcd(tmp_path, tls=ours) as etcd:
        use_tls(monkeypatch, ours.ca, ours.client_cert, ours.client_key)
        await _put(etcd.url, b"/t/k", b"v")
        refused = [(None, None, None),  # plain text to a TLS port
                   (None, ours.client_cert, ours.client_key),  # gRPC's default roots: etcd not verified
                   (other.ca, ours.client_cert, ours.client_key),  # another CA: etcd not verified
                   (ours.ca, None, None),  # no client certificate
                   (ours.ca, other.client_cert, other.client_key)]  # a client certificate of another CA
        for ca, cert, key in refused:
            use_tls(monkeypatch, ca, cert, key)
            await _refused(etcd.url)
        use_tls(monkeypatch, ours.ca, ours.client_cert, ours.client_key)
        assert await _reads(etcd.url) == {b"/t/k": b"v"}  # the refused puts wrote nothing


async def test_a_ca_alone_reaches_an_etcd_over_tls_that_asks_no_client_certificate(tmp_path, monkeypatch):
    tls = make_tls_files(tmp_path / "tls")
    with running_etcd(tmp_path, tls=tls, client_cert_auth=False) as etcd:
        use_tls(monkeypatch, tls.ca)
        await _put(etcd.url, b"/t/k", b"v")
        assert await _reads(etcd.url) == {b"/t/k": b"v"}
        use_tls(monkeypatch, make_tls_files(tmp_path / "other").ca)
        await _refused(etcd.url)
