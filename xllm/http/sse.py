"""Server-sent events: ``data: {json}\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` at the end.

An error after the stream started (the engine refused a choice, the deadline passed)
is sent as one ``data: {"error": {...}}`` event, and the stream still ends with [DONE].
"""

from __future__ import annotations

from typing import AsyncIterator

import msgspec

from ..protocol import RequestDelta
from .errors import ApiError, ClientGone
from .formats import Format
from .generation import Generation

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encoder = msgspec.json.Encoder()


def event(obj: dict) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + _encoder.encode(obj) + b"\n\n"


async def events(gen: Generation, fmt: Format, first: tuple[int, RequestDelta],
                 rest: AsyncIterator[tuple[int, RequestDelta]]) -> AsyncIterator[bytes]:
    """The SSE body of a streaming request whose first delta (``first``) already came.

    Leaving early (the client disconnected, the server cancels the body) ends the
    generation, which aborts its requests on the engine.
    """
    try:
        for chunk in fmt.head():
            yield event(chunk)
        async for index, delta in _chain(first, rest):
            part = fmt.feed(index, delta)
            if part is not None:
                yield event(fmt.chunk([part]))
        if fmt.include_usage:
            yield event(fmt.chunk([], fmt.usage()))
    except ApiError as exc:
        yield event(exc.body())
    except ClientGone:
        return
    finally:
        gen.cancel()
    yield DONE


async def _chain(first: tuple, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item
