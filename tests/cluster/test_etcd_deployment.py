"""A deployment of three launchers on loopback sharing a real etcd: one router host and
two instance hosts. Instances register and take traffic; one whose scheduler is killed is
restarted by its host and takes traffic again; a host killed whole leaves when its lease
expires and takes traffic again once restarted; a restarted router
rebuilds its registry from the store; so does a router whose etcd lost everything. Over an
etcd with TLS and client certificates, a router and an instance register and serve; a
launcher given half a client certificate stops before it starts anything."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec
import psutil
import pytest

from tests.cluster.hosts import launch_role, wait_instances
from tests.deploy import wait_gone
from tests.etcd import make_tls_files, running_etcd
from xllm.bus.curve import make_keys
from xllm.metastore import StoreUnavailable, keys, open_store
from xllm.protocol import InstanceRecord
from xllm.sdk import AsyncClient

PROMPTS = [[3 + k, 4, 5, 6 + k] for k in range(6)]


async def serve_some(address: str) -> dict:
    """Six requests; per instance id, how many it finished (from the router's stats)."""
    async with AsyncClient(address) as c:
        before = (await c.call("stats"))["instances"]
        outs = await asyncio.gather(*(c.generate(prompt_token_ids=p, max_tokens=6, ignore_eos=True,
                                                 temperature=0.0) for p in PROMPTS))
        assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in outs)
        after = (await c.call("stats"))["instances"]
    return {i: s["num_finished"] - before.get(i, {}).get("num_finished", 0) for i, s in after.items()}


async def wait_registered(url: str, n: int, timeout: float = 60.0) -> None:
    """Poll etcd until the deployment has ``n`` records in it."""
    store = open_store(url)
    try:
        deadline = time.monotonic() + timeout  # a bound, not a measurement
        while len(await _records(store)) != n:
            assert time.monotonic() < deadline, f"fewer than {n} records in etcd after {timeout} s"
            await asyncio.sleep(0.1)
    finally:
        await store.close()


@pytest.mark.slow
def test_instances_on_other_launchers_register_leave_and_rejoin(make_tiny, tmp_path):
    model = make_tiny("tiny-llama")
    keys = tmp_path / "keys"
    make_keys(keys)
    common = ("--router-policy", "round_robin")
    with running_etcd(tmp_path) as etcd:
        url = etcd.url
        with launch_role(model, tmp_path / "a", "instance", url, "127.0.0.1", keys, "--instance-prefix", "a-i"), \
                launch_role(model, tmp_path / "b", "instance", url, "127.0.0.1", keys,
                            "--instance-prefix", "b-i") as b:
            with launch_role(model, tmp_path / "r", "router", url, "127.0.0.1", keys, *common) as router:
                asyncio.run(wait_instances(router.address, 2))
                assert asyncio.run(serve_some(router.address)) == {"a-i0": 3, "b-i0": 3}

                # host b's scheduler dies: b's launcher restarts the instance, which registers
                # a new incarnation and takes traffic again
                first = asyncio.run(_incarnation(url, "b-i0"))
                os.kill(b.pids["scheduler"], signal.SIGKILL)
                asyncio.run(_wait_incarnation(url, "b-i0", first))
                assert b.proc.poll() is None
                asyncio.run(wait_instances(router.address, 2))
                assert asyncio.run(serve_some(router.address)) == {"a-i0": 3, "b-i0": 3}

                # host b dies whole, without a word: its lease expires, the router drops it
                actors = [p.pid for p in psutil.Process(b.proc.pid).children(recursive=True)]
                b.proc.kill()
                b.proc.wait(timeout=30)
                assert wait_gone(actors) == []  # its actors die with it
                asyncio.run(wait_instances(router.address, 1, timeout=30))
                assert asyncio.run(serve_some(router.address)) == {"a-i0": 6}

                # host b comes back: it registers anew and takes traffic again
                with launch_role(model, tmp_path / "b2", "instance", url, "127.0.0.1", keys,
                                 "--instance-prefix", "b-i"):
                    asyncio.run(wait_instances(router.address, 2))
                    assert asyncio.run(serve_some(router.address)) == {"a-i0": 3, "b-i0": 3}

                    # a new router finds both instances in the store
                    router.stop()
                    with launch_role(model, tmp_path / "r2", "router", url, "127.0.0.1", keys,
                                     *common) as router2:
                        asyncio.run(wait_instances(router2.address, 2))
                        assert asyncio.run(serve_some(router2.address)) == {"a-i0": 3, "b-i0": 3}

                        # etcd restarts empty: everyone registers again
                        etcd.stop()
                        etcd.wipe()
                        etcd.start()
                        asyncio.run(wait_registered(url, 3))  # two instances and the router
                        asyncio.run(wait_instances(router2.address, 2, timeout=60))
                        assert asyncio.run(serve_some(router2.address)) == {"a-i0": 3, "b-i0": 3}


@pytest.mark.slow
def test_a_router_and_an_instance_register_and_serve_over_an_etcd_with_tls(make_tiny, tmp_path, monkeypatch):
    model = make_tiny("tiny-llama")
    tls = make_tls_files(tmp_path / "tls")
    for variable, path in (("XLLM_ETCD_CA", tls.ca), ("XLLM_ETCD_CERT", tls.client_cert),
                           ("XLLM_ETCD_KEY", tls.client_key)):
        monkeypatch.setenv(variable, str(path))  # the launchers inherit this environment
    with running_etcd(tmp_path, tls=tls) as etcd:
        with launch_role(model, tmp_path / "a", "instance", etcd.url, "127.0.0.1", None, "--instance-prefix", "a-i"), \
                launch_role(model, tmp_path / "r", "router", etcd.url, "127.0.0.1", None) as router:
            asyncio.run(wait_instances(router.address, 1))
            assert asyncio.run(serve_some(router.address)) == {"a-i0": 6}
            asyncio.run(wait_registered(etcd.url, 2))  # the instance and the router


def test_a_launcher_given_half_a_client_certificate_stops_before_starting(make_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XLLM_ETCD_CERT", str(make_tls_files(tmp_path / "tls").client_cert))
    monkeypatch.delenv("XLLM_ETCD_KEY", raising=False)
    # NOTE: nothing listens on port 1; exit status 2 is the launcher refusing its settings
    with pytest.raises(RuntimeError, match="(?s)exited with 2.*XLLM_ETCD_KEY"):
        with launch_role(make_tiny("tiny-llama"), tmp_path / "i", "instance", "etcd://127.0.0.1:1", "127.0.0.1", None):
            pass


async def _incarnation(url: str, instance_id: str) -> str:
    store = open_store(url)
    try:
        value = await store.get(keys.instance_key("default", instance_id))
    finally:
        await store.close()
    return msgspec.json.decode(value, type=InstanceRecord).incarnation if value else ""


async def _wait_incarnation(url: str, instance_id: str, old: str, timeout: float = 120.0) -> None:
    """Poll etcd until ``instance_id`` is registered with an incarnation other than ``old``."""
    deadline = time.monotonic() + timeout  # a bound, not a measurement
    while (await _incarnation(url, instance_id)) in ("", old):
        assert time.monotonic() < deadline, f"{instance_id} did not register again in {timeout} s"
        await asyncio.sleep(0.2)


async def _records(store) -> dict:
    try:
        return await store.get_prefix(keys.deployment_prefix("default"))
    except StoreUnavailable:
        return {}
