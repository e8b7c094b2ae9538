"""Whatever arrives on the SDK socket, the deployment answers with an error and keeps serving.

A raw DEALER plays a hostile client: deep nesting, huge frames, wrong types, random
bytes. After every attack the launcher and every actor are still alive and a normal
request is served.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.deploy import launch
from xllm.bus.codec import Decoder
from xllm.protocol import ClientReply, ControlReply, ErrorReply
from xllm.sdk import AsyncClient

enc = msgspec.msgpack.encode
DEEP = 5000


def nested_control_call() -> bytes:
    """The 5 KB ControlCall of the report: args nested 5,000 levels deep."""
    return (b"\x84" + enc("type") + enc("control_call") + enc("call_id") + b"\x01" + enc("method")
            + enc("stats") + enc("args") + b"\x81" + enc("x") + b"\x91" * DEEP + b"\x01")


def generate(**fields) -> bytes:
    return enc({"type": "generate", "req_id": "h", **fields})


ATTACKS = {
    "nested control call": [nested_control_call()],
    "nested messages": [generate(messages=[[[[[[]]]]]] * 3 + [b"\x91" * 10])],
    "nested generate field": [b"\x82" + enc("type") + enc("generate") + enc("prompt") + b"\x91" * DEEP + b"\x01"],
    "random 64 MB frame": [os.urandom(64 * 2**20)],
    "50 MB prompt": [generate(prompt="y" * 50_000_000)],
    "5M token ids": [generate(prompt_token_ids=list(range(100)) * 50_000)],
    "token id of 64 bits": [generate(prompt_token_ids=[2**64 - 1])],
    "wrong type of req_id": [enc({"type": "generate", "req_id": 5, "prompt": "x"})],
    "wrong type of temperature": [generate(prompt="x", sampling={"temperature": "hot"})],
    "unknown sampling field": [generate(prompt="x", sampling={"bogus": 1})],
    "messages not a list": [generate(messages="hi")],
    "unknown message type": [enc({"type": "launch_missiles"})],
    "not a map": [enc([1, 2, 3])],
    "empty frame": [b""],
    "many frames": [enc({"type": "bogus"})] + [b"x"] * 500,
    "abort with a wrong type": [enc({"type": "abort", "req_id": ["a"]})],
    "tokenize nested messages": [enc({"type": "control_call", "call_id": 2, "method": "tokenize",
                                      "args": {"messages": [{"role": [1], "content": {"a": []}}]}})],
    "tokenize a huge text": [enc({"type": "control_call", "call_id": 3, "method": "tokenize",
                                  "args": {"prompt": "z" * 20_000_000}})],
    "detokenize garbage": [enc({"type": "control_call", "call_id": 4, "method": "detokenize",
                                "args": {"tokens": ["a", None, 2**64 - 1]}})],
    "unknown method": [enc({"type": "control_call", "call_id": 5, "method": "shutdown", "args": {}})],
}


@pytest.fixture(scope="module")
def dep(make_tiny, tmp_path_factory):
    with launch(make_tiny("tiny-llama"), tmp_path_factory.mktemp("hostile-sdk")) as d:
        yield d


async def _exchange(address: str, frames: list[bytes]):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        await sock.send_multipart(frames)
        # NOTE: the wait bounds the test; every attack is answered at once
        reply = await asyncio.wait_for(sock.recv_multipart(), 120)
        return Decoder(ClientReply).decode(reply)
    finally:
        sock.close()
        ctx.term()


async def _still_serving(address: str) -> list[int]:
    async with AsyncClient(address) as c:
        done = await c.generate(prompt_token_ids=[1, 2, 3], max_tokens=3, temperature=0.0, ignore_eos=True)
    return done.token_ids


def _assert_alive(dep) -> None:
    assert dep.proc.poll() is None, dep.output()[-3000:]
    assert len(asyncio.run(_still_serving(dep.address))) == 3


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_gets_an_error_and_the_deployment_serves(dep, attack):
    reply = asyncio.run(_exchange(dep.address, ATTACKS[attack]))
    if isinstance(reply, ControlReply):  # a control call is refused under its own call id
        assert not reply.ok and reply.error, reply
    else:
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request" and reply.message, reply
    _assert_alive(dep)


@pytest.mark.slow
def test_random_bytes_never_stop_the_deployment(dep):
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.binary(max_size=256), min_size=1, max_size=3))
    def one(frames):
        reply = asyncio.run(_exchange(dep.address, frames))
        assert isinstance(reply, (ErrorReply, ControlReply)), reply

    one()
    _assert_alive(dep)
