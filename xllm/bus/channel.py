"""Typed ZeroMQ sockets: one schema per socket, frames in and out through the codec."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from .codec import DecodeError, Decoder, Encoder

log = logging.getLogger(__name__)


class Channel:
    """One ZeroMQ socket that sends structs and decodes incoming ones against ``union``.

    For a ROUTER socket every received message comes with the peer identity
    (``recv_from``) and sends name the peer (``send_to``).
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        kind: int,
        address: str,
        *,
        bind: bool,
        union: Any = None,
        options: dict[int, int] | None = None,
    ) -> None:
        self.address = address
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        for opt, value in (options or {}).items():  # before bind/connect, where options apply
            self.sock.setsockopt(opt, value)
        if kind in (zmq.PUSH, zmq.DEALER, zmq.ROUTER, zmq.PUB):
            self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop: back-pressure is explicit
        if kind in (zmq.PULL, zmq.DEALER, zmq.ROUTER, zmq.SUB):
            self.sock.setsockopt(zmq.RCVHWM, 0)
        if kind == zmq.ROUTER:
            # a send to a peer that is gone fails (``send_to`` returns False), so the owner
            # learns of it and can drop the peer's work
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            (self.sock.bind if bind else self.sock.connect)(address)
        except (zmq.ZMQError, ValueError):
            self.sock.close(0)
            raise
        self._enc = Encoder()
        self._dec = Decoder(union) if union is not None else None

    async def send(self, msg: msgspec.Struct) -> None:
        await self.sock.send_multipart(self._enc.encode(msg), copy=False)

    async def send_to(self, identity: bytes, msg: msgspec.Struct) -> bool:
        """Send to one peer of a ROUTER socket; False when that peer is no longer connected."""
        try:
            await self.sock.send_multipart([identity, *self._enc.encode(msg)], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return True

    async def _frames(self) -> list:
        while True:
            try:
                return await self.sock.recv_multipart(copy=False)
            except zmq.Again:
                # NOTE: libzmq may say a socket is readable with nothing to read (seen on a
                # CURVE peer's first connection); wait for the message that follows
                continue

    async def recv(self) -> Any:
        """The next message; raises ``DecodeError`` for one that does not fit the schema."""
        frames = await self._frames()
        return self._dec.decode(frames)

    async def recv_from(self) -> tuple[bytes, Any]:
        """(identity, message) from a ROUTER socket; the message may be a ``DecodeError``."""
        frames = await self._frames()
        identity = frames[0].bytes
        try:
            return identity, self._dec.decode(frames[1:])
        except DecodeError as exc:
            return identity, exc

    def poll_now(self) -> bool:
        """True when a message is waiting (non-blocking)."""
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def close(self) -> None:
        self.sock.close(linger=0)
