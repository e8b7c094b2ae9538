"""Two hosts for real: two instances in two network namespaces, etcd and the router in this
one, all traffic between them over TCP with CURVE. Greedy output equals transformers'
(and so the one-instance run's) token for token; a peer without the cluster's key cannot
get through the handshake."""

from __future__ import annotations

import asyncio

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.cluster.hosts import launch_role, wait_instances
from tests.cluster.netns import hosts
from tests.etcd import running_etcd
from tests.integration.test_equality import MAX_TOKENS, workload
from tests.reference import assert_greedy_equal, hf_greedy
from xllm.bus import curve
from xllm.sdk import AsyncClient

BASE_PORT = 7200  # every host's; the scheduler of its first instance is at +100
SUBNET = "198.18.7"


def handshake(address: str, options: dict) -> str:
    """Connect a PUSH socket with ``options`` to ``address``: "succeeded", or how the
    handshake failed (waits at most 10 s)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    for k, v in options.items():
        sock.setsockopt(k, v)
    monitor = sock.get_monitor_socket()
    sock.connect(address)
    outcome = "no handshake within 10 s"
    failures = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused: authentication",
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused: protocol",
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused"}
    try:
        while monitor.poll(10_000):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                outcome = "succeeded"
                break
            if event in failures:
                outcome = failures[event]
                break
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()
    return outcome


async def _generate(address: str, prompts, max_tokens) -> tuple[list[list[int]], dict]:
    async with AsyncClient(address) as c:
        outs = await asyncio.gather(*(c.generate(prompt_token_ids=p, max_tokens=n, temperature=0.0,
                                                 ignore_eos=True) for p, n in zip(prompts, max_tokens)))
        return [o.token_ids for o in outs], await c.call("stats")


@pytest.mark.slow
def test_two_hosts_over_tcp_with_curve_equal_transformers(make_tiny, tmp_path):
    model = make_tiny("tiny-llama")
    keys = tmp_path / "keys"
    curve.make_keys(keys)
    prompts = workload()
    with hosts(["xa", "xb"], SUBNET) as addresses, running_etcd(tmp_path, host=f"{SUBNET}.1") as etcd:
        (ns_a, host_a), (ns_b, host_b) = addresses.items()
        with launch_role(model, tmp_path / "a", "instance", etcd.url, host_a, keys, "--dtype", "float32",
                         "--instance-prefix", "a-i", base_port=BASE_PORT, netns=ns_a), \
                launch_role(model, tmp_path / "b", "instance", etcd.url, host_b, keys, "--dtype", "float32",
                            "--instance-prefix", "b-i", base_port=BASE_PORT, netns=ns_b), \
                launch_role(model, tmp_path / "r", "router", etcd.url, f"{SUBNET}.1", keys, "--dtype",
                            "float32", "--router-policy", "round_robin") as router:
            asyncio.run(wait_instances(router.address, 2))
            outs, stats = asyncio.run(_generate(router.address, prompts, MAX_TOKENS))
            assert set(stats["instances"]) == {"a-i0", "b-i0"}
            assert all(s["num_finished"] > 0 for s in stats["instances"].values()), "a host got no request"

            # the scheduler of host a, from this namespace: only the cluster's key gets in
            scheduler = f"tcp://{host_a}:{BASE_PORT + 100}"
            stranger = tmp_path / "stranger"
            curve.make_keys(stranger)
            with_stranger_key = curve.options(scheduler, str(stranger), server=False)
            with_stranger_key[zmq.CURVE_SERVERKEY] = curve.options(scheduler, str(keys), server=False)[
                zmq.CURVE_SERVERKEY]
            assert handshake(scheduler, {}).startswith("refused")
            assert handshake(scheduler, with_stranger_key) == "refused: authentication"
            assert handshake(scheduler, curve.options(scheduler, str(keys), server=False)) == "succeeded"
    for prompt, n, out in zip(prompts, MAX_TOKENS, outs):
        assert_greedy_equal(str(model), prompt, out, hf_greedy(str(model), prompt, n))


@pytest.mark.slow
def test_prefill_and_decode_on_two_hosts_over_tcp_with_curve(make_tiny, tmp_path):
    """Prefill in one namespace, decode in another: every request's KV crosses between
    the hosts' KV agents over TCP with CURVE; greedy output equals transformers'."""
    model = make_tiny("tiny-llama")
    keys = tmp_path / "keys"
    curve.make_keys(keys)
    prompts = workload()
    subnet = "198.18.8"
    with hosts(["xp", "xd"], subnet) as addresses, running_etcd(tmp_path, host=f"{subnet}.1") as etcd:
        (ns_p, host_p), (ns_d, host_d) = addresses.items()
        common = ("--dtype", "float32", "--enforce-eager")
        with launch_role(model, tmp_path / "p", "instance", etcd.url, host_p, keys, *common,
                         "--instance-role", "prefill", "--instance-prefix", "p-i", base_port=BASE_PORT,
                         netns=ns_p), \
                launch_role(model, tmp_path / "d", "instance", etcd.url, host_d, keys, *common,
                            "--instance-role", "decode", "--instance-prefix", "d-i", base_port=BASE_PORT,
                            netns=ns_d), \
                launch_role(model, tmp_path / "r", "router", etcd.url, f"{subnet}.1", keys, *common) as router:
            asyncio.run(wait_instances(router.address, 2))
            outs, stats = asyncio.run(_generate(router.address, prompts, MAX_TOKENS))
            prefill, decode = stats["instances"]["p-i0"], stats["instances"]["d-i0"]
            assert decode["kv_transfers"] == prefill["kv_transfers"] == len(prompts)
            assert decode["kv_recomputed"] == 0 and decode["kv_transfer_bytes"] > 0
            assert prefill["total_output_tokens"] == 0  # the prefill host streamed nothing itself

            # the decode host's KV agent, from this namespace: only the cluster's key gets in
            agent = f"tcp://{host_d}:{BASE_PORT + 200}"
            assert handshake(agent, {}).startswith("refused")
            assert handshake(agent, curve.options(agent, str(keys), server=False)) == "succeeded"
    for prompt, n, out in zip(prompts, MAX_TOKENS, outs):
        assert_greedy_equal(str(model), prompt, out, hf_greedy(str(model), prompt, n))
