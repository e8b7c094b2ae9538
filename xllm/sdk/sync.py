"""A thin blocking wrapper over ``AsyncClient`` (its event loop runs in a thread)."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Iterator

from ..protocol import RequestDelta
from .client import AsyncClient, Completion

_DONE = object()


class Client:
    """Blocking client: ``generate``, ``stream``, ``abort``, ``call``, ``wait_ready``."""

    def __init__(self, address: str, key_dir: str = "") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xllm-client", daemon=True)
        self._thread.start()
        self._client: AsyncClient = self._run(self._make(address, key_dir))

    async def _make(self, address: str, key_dir: str) -> AsyncClient:
        return AsyncClient(address, key_dir)

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        return self._run(self._client.generate(prompt, **kwargs))

    def generate_many(self, prompts: list[str | None], **kwargs: Any) -> list[Completion]:
        """Submit several requests at once (they are batched together by the engine)."""
        return self.run_many([{"prompt": p, **kwargs} for p in prompts])

    def run_many(self, requests: list[dict[str, Any]],
                 on_done: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Submit every request at once (each a dict of ``generate`` keywords); the
        completions come back in order. ``on_done`` sees each one as it finishes (on the
        client's thread)."""

        async def one(kwargs: dict[str, Any]) -> Completion:
            c = await self._client.generate(**kwargs)
            if on_done is not None:
                on_done(c)
            return c

        async def all_of() -> list[Completion]:
            return await asyncio.gather(*(one(r) for r in requests))

        return self._run(all_of())

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[RequestDelta]:
        out: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for delta in self._client.stream(prompt, **kwargs):
                    out.put(delta)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
                out.put(exc)
            finally:
                out.put(_DONE)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := out.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            fut.cancel()

    def abort(self, req_id: str) -> None:
        self._run(self._client.abort(req_id))

    def call(self, method: str, **args: Any) -> Any:
        return self._run(self._client.call(method, **args))

    def wait_ready(self, timeout: float = 120.0) -> None:
        self._run(self._client.wait_ready(timeout))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
