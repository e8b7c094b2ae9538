"""The store actor: serves a ``MemoryStore`` to the other processes of a deployment.

This is the embedded metadata store of a one-host deployment: nothing to install or
start, and the same ``MetaStore`` verbs as etcd for its clients (``StoreClient``). Each
verb is a control call named ``store.<verb>``; a watch is a long poll
(``store.changes``: the changes after a revision, waiting briefly for the first).
"""

from __future__ import annotations

import asyncio
import logging

import zmq

from ..bus.actor import Actor
from ..bus.codec import DecodeError
from ..deploy.plan import ActorSpec, DeploymentPlan
from ..protocol import ControlCall, ControlReply, ErrorReply, StoreInput
from .memory import MemoryStore

log = logging.getLogger(__name__)

MAX_WAIT_S = 5.0  # the longest a watcher's poll is held


class StoreServer:
    """Answers ``store.<verb>`` control calls on a ROUTER channel from a ``MemoryStore``."""

    def __init__(self, channel, store: MemoryStore) -> None:
        self.sock = channel
        self.store = store
        self._polls: set[asyncio.Task] = set()

    async def serve(self) -> None:
        while True:
            client, msg = await self.sock.recv_from()
            if isinstance(msg, DecodeError):
                await self.sock.send_to(client, ErrorReply("bad_request", f"malformed message: {msg}"))
            elif msg.method == "store.changes":  # may wait: answered by its own task
                task = asyncio.ensure_future(self._answer(client, msg))
                self._polls.add(task)
                task.add_done_callback(self._polls.discard)
            else:
                await self._answer(client, msg)

    async def _answer(self, client: bytes, call: ControlCall) -> None:
        try:
            reply = ControlReply(call.call_id, True, await self._call(call.method, call.args))
        except (KeyError, TypeError, ValueError) as exc:
            reply = ControlReply(call.call_id, False, error=f"{type(exc).__name__}: {exc}")
        await self.sock.send_to(client, reply)

    async def _call(self, method: str, a: dict):
        s = self.store
        match method:
            case "store.put":
                return await s.put(_key(a), _bytes(a, "value"), a.get("lease"))
            case "store.get":
                return await s.get(_key(a))
            case "store.get_prefix":
                return [[k, v] for k, v in (await s.get_prefix(_bytes(a, "prefix"))).items()]
            case "store.read_prefix":
                items, revision = await s.read_prefix(_bytes(a, "prefix"))
                return {"items": [[k, v] for k, v in items.items()], "revision": revision}
            case "store.delete":
                return await s.delete(_key(a))
            case "store.grant":
                return await s.grant_lease(int(a["ttl"]))
            case "store.keep_alive":
                return await s.keep_alive(int(a["lease"]))
            case "store.revoke":
                return await s.revoke_lease(int(a["lease"]))
            case "store.changes":
                if a.get("after") is None:
                    return {"revision": s.revision, "events": []}
                events = await s.wait_changes(_bytes(a, "prefix"), int(a["after"]),
                                              min(float(a.get("timeout", 1.0)), MAX_WAIT_S))
                return {"revision": s.revision, "events": [[e.key, e.value, e.revision] for e in events]}
        raise ValueError(f"unknown method {method!r}")


class StoreActor(Actor):
    """The embedded metadata store of one deployment."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan

    async def setup(self) -> dict:
        sock = self.channel(zmq.ROUTER, self.plan.store, bind=True, union=StoreInput)
        self.server = StoreServer(sock, MemoryStore())
        return {"address": self.plan.store}

    async def run(self) -> None:
        await self.server.serve()


def _bytes(args: dict, name: str) -> bytes:
    value = args[name]
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    return value


def _key(args: dict) -> bytes:
    return _bytes(args, "key")
