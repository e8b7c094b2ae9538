"""Whatever reaches the sockets other hosts use, the deployment keeps serving.

A deployment advertising 127.0.0.1 without cluster keys (so anyone can connect, as the
launcher warns) gets, on each socket other hosts reach (the scheduler's input, the
router's reports, the frontend's input; with PD, the prefill and decode schedulers' inputs
and their KV agents'; with KV tiers, the scheduler's and its KV agent's): deep nesting, a huge frame,
wrong types, random bytes, messages of another socket. After each attack every actor
is alive, a normal request is served, and no KV block is held.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest
import zmq

from tests.cluster.hosts import free_port_block
from tests.deploy import launch
from xllm.sdk import AsyncClient

enc = msgspec.msgpack.encode
DEEP = 5000

ATTACKS = {
    "nested": [b"\x82" + enc("type") + enc("tokenized") + enc("req_id") + b"\x91" * DEEP + b"\x01"],
    "random 32 MB frame": [os.urandom(32 * 2**20)],
    "random bytes": [os.urandom(1000)],
    "empty frame": [b""],
    "many frames": [enc({"type": "load"})] + [b"x"] * 300,
    "wrong types": [enc({"type": "load", "instance_id": 1, "incarnation": [], "num_waiting": "x"})],
    "a load report of an unknown instance": [enc({
        "type": "load", "instance_id": "ghost", "incarnation": "g", "num_waiting": 0, "num_running": 0,
        "num_free_blocks": 1, "num_blocks": 1, "ttft_s": 0.0, "tpot_s": 0.0})],
    "a request whose reply route is no address": [enc({
        "type": "tokenized", "req_id": "x-1", "prompt_token_ids": [3, 4], "sampling": {}, "eos_token_ids": [],
        "arrival_time": 0.0, "reply_to": "no such address"})],
    "a request answered nowhere": [enc({
        "type": "tokenized", "req_id": "x-2", "prompt_token_ids": [3, 4], "sampling": {"max_tokens": 2},
        "eos_token_ids": [], "arrival_time": 0.0})],
    "a control call answered on no address": [enc({"type": "control_call", "call_id": 1, "method": "stats",
                                                   "reply_to": "tcp://"})],
    "token batch of unknown requests": [enc({
        "type": "tokens", "step_id": 1, "req_ids": ["nobody"], "new_token_ids": [[1]],
        "finish_reasons": [None], "num_cached_tokens": [0], "queue_times": [0.0]})],
    "unknown type": [enc({"type": "launch_missiles"})],
    # what only a KV agent or a PD scheduler expects
    "KV for a request nobody expects": [enc({
        "type": "kv_layer", "req_id": "ghost", "rank": 0, "layer": 0, "dst_blocks": [0, 1],
        "k": ["|u1", [2, 4096], 1], "v": ["|u1", [2, 4096], 2]}), b"\0" * 8192, b"\0" * 8192],
    "KV with arrays that are not its frames": [enc({
        "type": "kv_layer", "req_id": "ghost", "rank": 0, "layer": 0, "dst_blocks": [0],
        "k": ["|u1", [1, 4096], 7], "v": ["<f8", [3], 1]}), b"x"],
    "a completion acknowledged nowhere": [enc({
        "type": "kv_complete", "req_id": "ghost", "num_messages": 0, "first_token": 1, "reply_to": "tcp://"})],
    "a send plan to nowhere": [enc({"type": "kv_send_plan", "step_id": 1,
                                    "sends": [["ghost", [0], [0], "not an address"]]})],
    "a release of an unknown request": [enc({"type": "kv_released", "req_id": "ghost", "ok": True})],
    "a first token of an unknown request": [enc({"type": "kv_received", "req_id": "ghost", "ok": True,
                                                 "first_token": 1})],
    "a prefill to be answered nowhere": [enc({
        "type": "prefill", "request": {"type": "tokenized", "req_id": "x-3", "prompt_token_ids": [3, 4],
                                       "sampling": {}, "eos_token_ids": [], "arrival_time": 0.0},
        "decode_instance": "d", "decode_address": "no address", "decode_agent": "no address",
        "block_ids": [0]})],
    # what only a KV agent with tiers, or its scheduler, expects
    "a tier order with an unknown op": [enc({"type": "kv_tier_order", "job_id": 1, "step_id": 1,
                                             "ops": [["launch", 5]]})],
    "a tier order out of range": [enc({"type": "kv_tier_order", "job_id": 1, "step_id": 1,
                                       "ops": [["load", 5, 10**6, 10**6], ["fetch", 6, -3]]})],
    "a tier order for a step far ahead": [enc({"type": "kv_tier_order", "job_id": 1, "step_id": 10**12,
                                               "ops": [["store", 5, 0, 0, 0, [1] * 16]]})],
    "a tier order out of sequence": [enc({"type": "kv_tier_order", "job_id": 10**6, "step_id": 1,
                                          "ops": [["fetch", 6, 0], ["drop", 7]]})],
    "a tier answer of an unknown order": [enc({"type": "kv_tier_done", "job_id": 10**6, "failed": [1, 2]})],
    "a tier inventory of blocks that are not there": [enc({
        "type": "kv_tier_inventory", "blocks": [[123, 0, [1, 2, 3], 2], [124, 123, list(range(16)), 2]]})],
    "a disaggregated request whose prefill is nowhere": [enc({
        "type": "pd_request", "request": {"type": "tokenized", "req_id": "x-4", "prompt_token_ids": [3, 4],
                                          "sampling": {"max_tokens": 2}, "eos_token_ids": [],
                                          "arrival_time": 0.0, "reply_to": "no such address"},
        "prefill_instance": "p", "prefill_address": "nowhere"})],
}


def sockets(base: int) -> dict[str, str]:
    """The plan's tcp sockets of a one-host deployment at ``base`` (xllm.deploy.plan)."""
    return {"router reports": f"tcp://127.0.0.1:{base}", "frontend input": f"tcp://127.0.0.1:{base + 1}",
            "scheduler input": f"tcp://127.0.0.1:{base + 100}"}


def push(address: str, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)  # deliver before closing
    sock.connect(address)
    sock.send_multipart(frames)
    sock.close()
    ctx.term()


async def still_serving(address: str, prompt: list[int] = [3, 4, 5]) -> dict:  # noqa: B006 - not mutated
    async with AsyncClient(address) as c:
        out = await asyncio.wait_for(c.generate(prompt_token_ids=prompt, max_tokens=4, ignore_eos=True), 60)
        assert out.finish_reason == "length" and len(out.token_ids) == 4
        for _ in range(100):  # with PD the prefill side lets go a moment after (a bound: 10 s)
            integrity = await c.call("check_integrity")
            if integrity["used"] == 0:
                break
            await asyncio.sleep(0.1)
        return integrity


@pytest.fixture(scope="module")
def exposed(make_tiny, tmp_path_factory):
    base = free_port_block()
    tmp = tmp_path_factory.mktemp("exposed")
    with launch(make_tiny("tiny-llama"), tmp, "--advertise-host", "127.0.0.1", "--base-port", str(base)) as dep:
        yield dep, sockets(base)


@pytest.fixture(scope="module")
def exposed_pd(make_tiny, tmp_path_factory):
    """A prefill and a decode instance: their schedulers at +100/+101, KV agents at +200/+201."""
    base = free_port_block()
    tmp = tmp_path_factory.mktemp("exposed-pd")
    with launch(make_tiny("tiny-llama"), tmp, "--advertise-host", "127.0.0.1", "--base-port", str(base),
                "--pd", "1:1") as dep:
        yield dep, {f"{side} {what}": f"tcp://127.0.0.1:{base + off + k}"
                    for k, side in enumerate(("prefill", "decode"))
                    for what, off in (("scheduler input", 100), ("kv agent input", 200))}


@pytest.fixture(scope="module")
def exposed_tiers(make_tiny, tmp_path_factory):
    """A mixed instance with host and disk tiers: its scheduler at +100, its KV agent at +200."""
    base = free_port_block()
    tmp = tmp_path_factory.mktemp("exposed-tiers")
    with launch(make_tiny("tiny-llama"), tmp, "--advertise-host", "127.0.0.1", "--base-port", str(base),
                "--kv-host-memory", "0.001", "--kv-disk-dir", str(tmp / "disk"), "--kv-disk-size", "0.01") as dep:
        yield dep, {"tiers scheduler input": f"tcp://127.0.0.1:{base + 100}",
                    "tiers kv agent input": f"tcp://127.0.0.1:{base + 200}"}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tiers scheduler input", "tiers kv agent input"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_on_the_kv_tier_sockets_leave_the_deployment_serving(exposed_tiers, target, attack):
    dep, addresses = exposed_tiers
    push(addresses[target], ATTACKS[attack])
    # two full blocks: the agent must still take and answer the scheduler's orders (stores)
    integrity = asyncio.run(still_serving(dep.address, [3 + i % 50 for i in range(40)]))
    assert integrity["used"] == 0 and integrity["tier_orders_pending"] == 0  # nothing leaked, nothing stuck
    assert dep.proc.poll() is None, dep.output()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["prefill scheduler input", "decode scheduler input",
                                    "prefill kv agent input", "decode kv agent input"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_on_the_pd_sockets_leave_the_deployment_serving(exposed_pd, target, attack):
    dep, addresses = exposed_pd
    push(addresses[target], ATTACKS[attack])
    integrity = asyncio.run(still_serving(dep.address))
    assert integrity["used"] == 0
    assert dep.proc.poll() is None, dep.output()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["router reports", "frontend input", "scheduler input"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_on_the_cluster_sockets_leave_the_deployment_serving(exposed, target, attack):
    dep, addresses = exposed
    push(addresses[target], ATTACKS[attack])
    integrity = asyncio.run(still_serving(dep.address))
    assert integrity["used"] == 0
    assert dep.proc.poll() is None, dep.output()[-3000:]
