"""The asynchronous xllm client: ZeroMQ (DEALER) to a deployment's frontend.

One background task reads the socket and routes each delta to its request's queue
and each control reply to its caller, so many requests share one connection.
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

from ..bus.channel import Channel
from ..protocol import (
    AbortRequest, ChatMessage, ClientReply, ControlCall, ControlReply, ErrorReply, GenerateRequest,
    RequestDelta, RequestOutputs, SamplingParams,
)
from .errors import EngineUnavailableError, XllmError, error_for


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


class AsyncClient:
    """Talk to one deployment. Methods: ``generate``, ``stream``, ``abort``, ``call``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ctx = zmq.asyncio.Context()
        self._ch = Channel(self._ctx, zmq.DEALER, address, bind=False, union=ClientReply)
        self._queues: dict[str, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._ch.close()
        self._ctx.term()

    # -- requests -------------------------------------------------------------------------
    def _request(self, prompt, prompt_token_ids, messages, sampling: dict, priority: int,
                 offline: bool, stream: bool, req_id: str | None) -> GenerateRequest:
        if messages is not None:
            messages = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
        try:
            params = msgspec.convert(sampling, SamplingParams)  # checks names and types
        except msgspec.ValidationError as exc:
            raise TypeError(f"bad sampling parameter: {exc}") from None
        return GenerateRequest(req_id or f"{self._prefix}-{next(self._ids)}", prompt, prompt_token_ids,
                               messages, params, stream, priority, offline)

    async def stream(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                     messages: list | None = None, priority: int = 0, offline: bool = False,
                     req_id: str | None = None, **sampling: Any) -> AsyncIterator[RequestDelta]:
        """Yield a ``RequestDelta`` per engine step until the request finishes.

        Sampling keywords are the fields of ``SamplingParams`` (``max_tokens``,
        ``temperature``, ``seed``, ``stop``...). Leaving the loop early aborts the request.
        """
        req = self._request(prompt, prompt_token_ids, messages, sampling, priority, offline, True, req_id)
        async for delta in self._run(req):
            yield delta

    async def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                       messages: list | None = None, priority: int = 0, offline: bool = False,
                       req_id: str | None = None, **sampling: Any) -> Completion:
        """Run one request to the end and return its whole output."""
        req = self._request(prompt, prompt_token_ids, messages, sampling, priority, offline, False, req_id)
        deltas = [d async for d in self._run(req)]
        last = deltas[-1]
        return Completion(req.req_id, "".join(d.text for d in deltas),
                          [t for d in deltas for t in d.token_ids], last.finish_reason,
                          last.num_prompt_tokens, last.num_cached_tokens, deltas)

    async def _run(self, req: GenerateRequest) -> AsyncIterator[RequestDelta]:
        self._ensure_reader()
        queue: asyncio.Queue = asyncio.Queue()
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
            if not finished:
                await self.abort(req.req_id)

    async def abort(self, req_id: str) -> None:
        """Stop a request and free its memory on the server."""
        await self._ch.send(AbortRequest(req_id))

    # -- control --------------------------------------------------------------------------
    async def call(self, method: str, timeout: float | None = 30.0, **args: Any) -> Any:
        """Run a control method (``stats``, ``health``, ``model_info``...) and return its result."""
        self._ensure_reader()
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
            except EngineUnavailableError:
                continue

    # -- the reader -----------------------------------------------------------------------
    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())

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
                    err = error_for(msg.code, msg.message, msg.req_id)
                    q = self._queues.get(msg.req_id or "")
                    if q is not None:
                        q.put_nowait(err)
                case ControlReply():
                    fut = self._calls.get(msg.call_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
