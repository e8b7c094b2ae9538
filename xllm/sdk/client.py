"""The asynchronous xllm client: ZeroMQ (DEALER) to a deployment's frontend.

One background task reads the socket and routes each delta to its request's queue
and each control reply to its caller, so many requests share one connection.

NOTE (invariant): nothing waits forever on a deployment that is gone. A second task
watches the connection (ZeroMQ's socket monitor, with ZMTP heartbeats so a frozen
peer counts as gone too); when it drops, every request and call in flight fails with
``EngineUnavailableError`` ("disconnected"), and so does every new one until the
connection is back (the socket reconnects by itself).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ..bus import curve
from ..bus.channel import Channel
from ..protocol import (
    AbortRequest, ChatMessage, ClientReply, ControlCall, ControlReply, ErrorReply, GenerateRequest,
    RequestDelta, RequestOutputs, SamplingParams,
)
from .errors import EngineUnavailableError, XllmError, error_for

HEARTBEAT_MS = 2_000  # ZMTP ping interval
HEARTBEAT_TIMEOUT_MS = 10_000  # no traffic for this long: the peer is gone


@dataclass
class Completion:
    """A finished request."""

    req_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    deltas: list[RequestDelta] = field(default_factory=list, repr=False)
    error: str | None = None  # why it ended, when finish_reason is "error"


class AsyncClient:
    """Talk to one deployment. Methods: ``generate``, ``stream``, ``abort``, ``call``."""

    def __init__(self, address: str, key_dir: str = "") -> None:
        """``key_dir``: the cluster's CURVE keys, for a deployment started with them."""
        self.address = address
        self._ctx = zmq.asyncio.Context()
        options = {zmq.HEARTBEAT_IVL: HEARTBEAT_MS, zmq.HEARTBEAT_TIMEOUT: HEARTBEAT_TIMEOUT_MS,
                   **curve.options(address, key_dir, server=False)}
        self._ch = Channel(self._ctx, zmq.DEALER, address, bind=False, union=ClientReply, options=options)
        self._monitor = self._ch.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._queues: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._lost: EngineUnavailableError | None = None  # set while a lost connection is down

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reader = self._watcher = None
        self._ch.sock.disable_monitor()
        self._monitor.close(linger=0)
        self._ch.close()
        self._ctx.term()

    # -- requests -------------------------------------------------------------------------
    def _request(self, prompt, prompt_token_ids, messages, sampling: dict, priority: int,
                 offline: bool, stream: bool, req_id: str | None,
                 params: SamplingParams | None = None, tools: list | None = None) -> GenerateRequest:
        if messages is not None:
            try:
                messages = [m if isinstance(m, ChatMessage) else msgspec.convert(m, ChatMessage) for m in messages]
            except msgspec.ValidationError as exc:
                raise TypeError(f"bad chat message: {exc}") from None
        if params is not None and sampling:
            raise TypeError("give either params= or sampling keywords, not both")
        if params is None:
            try:
                params = msgspec.convert(sampling, SamplingParams)  # checks names and types
            except msgspec.ValidationError as exc:
                raise TypeError(f"bad sampling parameter: {exc}") from None
        return GenerateRequest(req_id or f"{self._prefix}-{next(self._ids)}", prompt, prompt_token_ids,
                               messages, params, stream, priority, offline, tools=list(tools or []))

    async def stream(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                     messages: list | None = None, priority: int = 0, offline: bool = False,
                     req_id: str | None = None, params: SamplingParams | None = None,
                     tools: list | None = None, **sampling: Any) -> AsyncIterator[RequestDelta]:
        """Yield a ``RequestDelta`` per engine step until the request finishes.

        Sampling keywords are the fields of ``SamplingParams`` (``max_tokens``,
        ``temperature``, ``seed``, ``stop``...), or ``params=`` gives a whole
        ``SamplingParams``. ``tools`` (OpenAI function definitions) go to the chat template
        with ``messages``. Leaving the loop early aborts the request.
        """
        req = self._request(prompt, prompt_token_ids, messages, sampling, priority, offline, True, req_id,
                            params, tools)
        async for delta in self._run(req):
            yield delta

    async def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                       messages: list | None = None, priority: int = 0, offline: bool = False,
                       req_id: str | None = None, params: SamplingParams | None = None,
                       tools: list | None = None, **sampling: Any) -> Completion:
        """Run one request to the end and return its whole output."""
        req = self._request(prompt, prompt_token_ids, messages, sampling, priority, offline, False, req_id,
                            params, tools)
        deltas = [d async for d in self._run(req)]
        last = deltas[-1]
        return Completion(req.req_id, "".join(d.text for d in deltas),
                          [t for d in deltas for t in d.token_ids], last.finish_reason,
                          last.num_prompt_tokens, last.num_cached_tokens, deltas, last.error)

    async def _run(self, req: GenerateRequest) -> AsyncIterator[RequestDelta]:
        self._ensure_reader()
        queue: asyncio.Queue = asyncio.Queue()
        if self._lost is not None:
            raise self._lost
        self._queues[req.req_id] = queue
        finished = False
        try:
            await self._ch.send(req)
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(req.req_id, None)
            if not finished and self._lost is None:
                await self.abort(req.req_id)

    async def abort(self, req_id: str) -> None:
        """Stop a request and free its memory on the server."""
        await self._ch.send(AbortRequest(req_id))

    # -- control --------------------------------------------------------------------------
    async def call(self, method: str, timeout: float | None = 30.0, **args: Any) -> Any:
        """Run a control method (``stats``, ``health``, ``model_info``...) and return its result."""
        self._ensure_reader()
        if self._lost is not None:
            raise self._lost
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            await self._ch.send(ControlCall(call_id, method, args))
            reply: ControlReply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailableError("timeout", f"no reply to {method!r} within {timeout} s") from None
        finally:
            self._calls.pop(call_id, None)
        if not reply.ok:
            raise XllmError("control_error", reply.error or "failed")
        return reply.result

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the deployment answers ``health``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise EngineUnavailableError("timeout", f"{self.address} not ready after {timeout} s")
            try:
                await self.call("health", timeout=min(2.0, left))
                return
            except EngineUnavailableError as exc:
                if exc.code == "disconnected":
                    await asyncio.sleep(min(0.1, left))
            except XllmError:  # it answers, but cannot take a step yet
                await asyncio.sleep(min(0.2, left))

    # -- the reader -----------------------------------------------------------------------
    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Follow the connection: fail everything in flight when it drops."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._lost = None
            elif event == zmq.EVENT_DISCONNECTED and self._lost is None:
                self._lost = EngineUnavailableError(
                    "disconnected", f"the connection to the deployment at {self.address} was lost")
                for q in self._queues.values():
                    q.put_nowait(self._lost)
                for fut in self._calls.values():
                    if not fut.done():
                        fut.set_exception(self._lost)

    async def _read(self) -> None:
        while True:
            msg = await self._ch.recv()
            match msg:
                case RequestOutputs():
                    for d in msg.deltas:
                        q = self._queues.get(d.req_id)
                        if q is not None:
                            q.put_nowait(d)
                case ErrorReply():
                    err = error_for(msg.code, msg.message, msg.req_id, msg.param)
                    q = self._queues.get(msg.req_id or "")
                    if q is not None:
                        q.put_nowait(err)
                case ControlReply():
                    fut = self._calls.get(msg.call_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
