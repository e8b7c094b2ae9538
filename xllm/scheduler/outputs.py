"""What a step result means for the frontends: one row per request, sent as one
``TokenBatch`` per route."""

from __future__ import annotations

from ..protocol import TokenBatch


class StepOutputs:
    """What a step result means for the frontend: one row per request, turned into the
    columns of a ``TokenBatch`` by ``to_batch``."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def add(self, req: Request, tokens: list[int], reason: str | None, logprobs=None) -> None:
        self.rows.append((req.req_id, tokens, reason, max(req.num_cached_tokens, 0),
                          req.queue_time or 0.0, logprobs, req.reply_to))

    def _column(self, i: int) -> list:
        return [row[i] for row in self.rows]

    @property
    def req_ids(self) -> list[str]:
        return self._column(0)

    @property
    def new_token_ids(self) -> list[list[int]]:
        return self._column(1)

    @property
    def finish_reasons(self) -> list[str | None]:
        return self._column(2)

    def to_batches(self, step_id: int, instance_id: str = "") -> dict[str, TokenBatch]:
        """One ``TokenBatch`` per route (the frontend each request came from)."""
        by_route: dict[str, list[tuple]] = {}
        for row in self.rows:
            by_route.setdefault(row[6], []).append(row)
        batches = {}
        for route, rows in by_route.items():
            ids, tokens, reasons, cached, queue, logprobs, _ = map(list, zip(*rows))
            batches[route] = TokenBatch(step_id, ids, tokens, reasons, cached, queue,
                                        logprobs if any(x is not None for x in logprobs) else [], instance_id)
        return batches
