"""The SDK requests behind one HTTP request, read as one stream of (choice, delta).

Each choice's SDK stream is read by its own task into one queue; a timer puts the
deadline into the same queue and a watcher puts the client's disconnect there, so a
reader only ever awaits the queue. ``cancel`` ends every task: leaving an SDK stream
early aborts its request on the engine, which frees its KV blocks at once.

NOTE: the tasks are plain asyncio tasks outside the ASGI server's cancel scopes, so
their clean-up (the abort message) runs even when the HTTP response is torn down.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from starlette.requests import Request

from ..protocol import RequestDelta
from ..sdk import AsyncClient
from ..sdk.errors import XllmError
from .errors import ApiError, ClientGone, from_sdk, timeout_error
from .metrics import Metrics
from .params import Choice

_TIMEOUT = object()
_GONE = object()
_live: set[asyncio.Task] = set()  # keeps cancelled tasks alive until their abort is sent


def _spawn(coro) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    _live.add(task)
    task.add_done_callback(_live.discard)
    return task


class Generation:
    """Runs the choices of one HTTP request; iterate ``deltas()`` for their outputs."""

    def __init__(self, client: AsyncClient, choices: list[Choice], metrics: Metrics,
                 timeout_s: float, on_close: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self._on_close = on_close
        self._closed = False
        self.timeout_s = timeout_s
        self._open = len(choices)
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self.queue.put_nowait,
                                                            (-1, _TIMEOUT))
        self._watch: asyncio.Task | None = None
        self._tasks = [_spawn(self._pump(client, c, metrics)) for c in choices]

    async def _pump(self, client: AsyncClient, choice: Choice, metrics: Metrics) -> None:
        clock = metrics.start()
        first = True
        try:
            async for delta in client.stream(**choice.kwargs):
                metrics.observe(clock, delta, first)
                first = False
                self.queue.put_nowait((choice.index, delta))
        except XllmError as exc:
            self.queue.put_nowait((choice.index, from_sdk(exc)))
        except Exception as exc:  # noqa: BLE001 - e.g. a value the SDK cannot encode
            self.queue.put_nowait((choice.index, ApiError(400, f"request refused: {exc}", "bad_request")))

    def watch(self, request: Request) -> None:
        """End the generation when ``request``'s client disconnects (non-streaming)."""

        async def wait_gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.queue.put_nowait((-1, _GONE))

        self._watch = asyncio.ensure_future(wait_gone())

    def unwatch(self) -> None:
        """Stop watching for a disconnect (the ASGI server's streaming watches instead)."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def deltas(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        """(choice index, delta) until every choice finished. Raises ``ApiError`` (a
        refusal by the engine, or 408 past the deadline) and ``ClientGone``."""
        while self._open:
            index, item = await self.queue.get()
            if item is _TIMEOUT:
                raise timeout_error(self.timeout_s)
            if item is _GONE:
                raise ClientGone()
            if isinstance(item, ApiError):
                raise item
            if item.finish_reason == "error":  # its instance was lost mid-way
                raise ApiError(503, item.error or "the request failed", "instance_lost")
            if item.finish_reason is not None:
                self._open -= 1
            yield index, item

    def interrupt(self, error: ApiError) -> None:
        """End the generation early with ``error`` (e.g. 503 when the server shuts down)."""
        self.queue.put_nowait((-1, error))

    def cancel(self) -> None:
        """Abort every choice still running; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()
        self._timer.cancel()
        self.unwatch()
        for task in self._tasks:
            task.cancel()
