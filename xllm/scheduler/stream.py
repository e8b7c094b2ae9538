"""Stream interval: decode outputs held for a few steps, then sent as one message.

Every message to a frontend costs the scheduler, the frontend and the HTTP shim CPU time
(about 2 ms a token in all, measured on 2 cores), and on a small machine that time is
taken from the worker's threads. With ``--stream-interval N`` a request's new tokens go
out every N tokens instead of every step, as one row carrying all of them; its first
token (TTFT) and its last (the finish) go at once, and nothing waits longer than
``max_delay_s``, so a slow step rate (large batches) streams as before. N = 1 sends every
step (vLLM's and SGLang's ``--stream-interval`` are the same knob). A multi-step decode
brings several tokens per step: they count as that many.
"""

from __future__ import annotations

from .outputs import StepOutputs


class StreamBuffer:
    """Merges the rows of consecutive ``StepOutputs`` per request until they are due."""

    def __init__(self, interval: int, max_delay_s: float = 0.05) -> None:
        if interval < 1:
            raise ValueError(f"stream interval must be at least 1; got {interval}")
        self.interval = interval
        self.max_delay_s = max_delay_s
        self.rows: dict[str, list] = {}  # req id -> a row, tokens (and logprobs) merged
        self.tokens = 0  # decode tokens per request held (the most any step brought, summed)
        self.since: float | None = None  # when the oldest held row came
        self.step_id = -1
        self.started: set[str] = set()  # requests whose first token went out

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, step_id: int, out: StepOutputs, now: float) -> StepOutputs:
        """Take one step's outputs; return what is to be sent now."""
        if self.interval == 1:
            return out
        send = StepOutputs()
        held = 0
        for row in out.rows:
            rid, reason = row[0], row[2]
            merged = self._merge(self.rows.pop(rid, None), row)
            if reason is not None or rid not in self.started:
                if merged[1] or reason is not None:  # a first token, or an end: now
                    send.rows.append(tuple(merged))
                    self.started.add(rid)
                    if reason is not None:
                        self.started.discard(rid)
                    continue
            self.rows[rid] = merged
            held = max(held, len(row[1]))
        if held:
            self.tokens += held
            self.step_id = step_id
            if self.since is None:
                self.since = now
        elif not self.rows:  # the last held rows just went out with a finish
            self.tokens, self.since = 0, None
        if self.due(now):
            send.rows.extend(self.take().rows)
        return send

    def due(self, now: float) -> bool:
        """Held rows that have waited their tokens or their time."""
        return bool(self.rows) and (self.tokens >= self.interval or now - self.since >= self.max_delay_s)

    def deadline(self) -> float | None:
        """When the held rows must go at the latest (None: nothing held)."""
        return None if self.since is None else self.since + self.max_delay_s

    def take(self) -> StepOutputs:
        """Everything held, now."""
        out = StepOutputs()
        out.rows = [tuple(r) for r in self.rows.values()]
        self.rows.clear()
        self.tokens, self.since = 0, None
        return out

    @staticmethod
    def _merge(old: list | None, row: tuple) -> list:
        if old is None:
            return list(row)
        old[1] = old[1] + row[1]  # tokens
        old[2] = row[2]  # the finish reason, if any, is the latest row's
        if old[5] is not None or row[5] is not None:  # logprobs, one entry per token
            old[5] = (old[5] or []) + (row[5] or [])
        return old
