"""Malformed messages are refused with an error; the engine keeps serving."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from tests.deploy import launch
from xllm.bus.codec import Decoder
from xllm.protocol import ClientReply, ErrorReply
from xllm.sdk import AsyncClient, BadRequestError

GARBAGE = [
    [b"\x00\x01not msgpack"],
    [msgspec.msgpack.encode({"type": "no_such_message", "x": 1})],
    [msgspec.msgpack.encode({"type": "generate", "req_id": 5})],  # wrong field type
    [msgspec.msgpack.encode({"type": "generate", "req_id": "a", "sampling": {"bogus": 1}})],
    [msgspec.msgpack.encode(["not", "a", "map"])],
]


async def _raw_exchange(address: str) -> list:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    dec = Decoder(ClientReply)
    replies = []
    try:
        for frames in GARBAGE:
            await sock.send_multipart(frames)
            replies.append(dec.decode(await asyncio.wait_for(sock.recv_multipart(), 10)))
    finally:
        sock.close(0)
        ctx.term()
    return replies


async def _bad_requests(address: str) -> list[str]:
    errors = []
    async with AsyncClient(address) as c:
        for kwargs in (dict(prompt_token_ids=[10**9]), dict(prompt="hi", max_tokens=0),
                       dict(prompt="x " * 5000), dict(prompt="hi", top_p=2.0),
                       dict(prompt="hi", prompt_token_ids=[1])):
            with pytest.raises(BadRequestError) as info:
                await c.generate(**kwargs)
            errors.append(info.value.message)
        ok = await c.generate(prompt="still serving", max_tokens=3, temperature=0.0)
        assert len(ok.token_ids) == 3
    return errors


def test_malformed_frames_get_errors_and_service_continues(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--max-model-len", "512") as dep:
        replies = asyncio.run(_raw_exchange(dep.address))
        assert all(isinstance(r, ErrorReply) and r.code == "bad_request" for r in replies)
        errors = asyncio.run(_bad_requests(dep.address))
        assert "outside the vocabulary" in errors[0]
        assert "max_tokens" in errors[1]
        assert "context" in errors[2]
        assert "top_p" in errors[3]
        assert "exactly one" in errors[4]
