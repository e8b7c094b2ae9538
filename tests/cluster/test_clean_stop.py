"""A clean stop of one instance host drains it first: two decode-role instance hosts and a
router host share a real etcd; while requests stream, host a gets SIGTERM. Its launcher has
the routers move a's running requests to b (migration, KV and all) before it stops its
processes, so every stream completes with the output it has without the stop, and a's
launcher exits cleanly once nothing is left on it."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.cluster.hosts import launch_role, wait_instances
from tests.etcd import running_etcd
from xllm.bus.curve import make_keys
from xllm.sdk import AsyncClient

MAX_TOKENS = 320
PROMPTS = [[3 + (13 * k + j) % 300 for j in range(8 + 3 * k)] for k in range(6)]


async def stop_a_while_streaming(address: str, host_a) -> dict:
    async with AsyncClient(address) as c:
        alone = [(await c.generate(prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0,
                                   ignore_eos=True)).token_ids for p in PROMPTS]
        on_a = (await c.call("stats"))["instances"]["a-i0"]["num_finished"]
        got: dict[int, list[int]] = {}
        reasons: dict[int, str] = {}

        async def one(k: int) -> None:
            async for d in c.stream(prompt_token_ids=PROMPTS[k], max_tokens=MAX_TOKENS, temperature=0.0,
                                    ignore_eos=True):
                got.setdefault(k, []).extend(d.token_ids)
                if d.finish_reason:
                    reasons[k] = d.finish_reason

        streams = [asyncio.ensure_future(one(k)) for k in range(len(PROMPTS))]
        deadline = time.monotonic() + 60  # a bound, not a measurement
        while len(got) < len(PROMPTS) or min(map(len, got.values())) < 4:
            assert time.monotonic() < deadline and not any(t.done() for t in streams)
            await asyncio.sleep(0.005)
        running_on_a = (await c.call("stats"))["instances"]["a-i0"]["num_running"]
        host_a.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*streams)
        while host_a.proc.poll() is None:
            assert time.monotonic() < deadline + 60, "host a did not stop"
            await asyncio.sleep(0.1)
        b = (await c.call("stats"))["instances"]["b-i0"]
    return dict(alone=alone, got=got, reasons=reasons, running_on_a=running_on_a, b=b, served_by_a=on_a)


@pytest.mark.slow
def test_a_stopping_instance_host_moves_its_streams_and_exits_cleanly(make_tiny, tmp_path):
    model = make_tiny("tiny-llama")
    keys = tmp_path / "keys"
    make_keys(keys)
    flags = ("--instance-role", "decode", "--dtype", "float32")
    with running_etcd(tmp_path) as etcd:
        with launch_role(model, tmp_path / "a", "instance", etcd.url, "127.0.0.1", keys, "--instance-prefix", "a-i",
                         *flags) as a, \
                launch_role(model, tmp_path / "b", "instance", etcd.url, "127.0.0.1", keys, "--instance-prefix",
                            "b-i", *flags):
            with launch_role(model, tmp_path / "r", "router", etcd.url, "127.0.0.1", keys,
                             "--router-policy", "round_robin", "--dtype", "float32") as router:
                asyncio.run(wait_instances(router.address, 2))
                r = asyncio.run(stop_a_while_streaming(router.address, a))
                log_a = a.output()
    assert r["served_by_a"] > 0 and r["running_on_a"] > 0  # a had streams when it was told to stop
    assert all(reason == "length" for reason in r["reasons"].values()), r["reasons"]
    for k in range(len(PROMPTS)):
        assert r["got"][k] == r["alone"][k], f"prompt {k}: output changed by the stop"
    assert a.proc.returncode == 0
    assert r["b"]["migrated_in"] >= 1 and r["b"]["migration_failures"] == 0 and r["b"]["kv_recomputed"] == 0
    assert "holds no request" in log_a
