"""Is the instance able to take a step? The scheduler's view of its workers' progress.

A healthy instance is one whose workers make progress: the oldest step in flight has
not run for longer than the stall limit, and every rank answered something (a step
result, or a heartbeat the scheduler sends while idle) within that limit. The limit is
``worker_stall_timeout_s``, or 8x the slowest step seen so far if that is longer, so a
long prefill is not taken for a hang.
"""

from __future__ import annotations

import time
from collections import deque

PING_INTERVAL_S = 1.0  # heartbeat period while no step is in flight


class WorkerWatch:
    """Step and heartbeat times of one instance's ranks. No sockets: the actor feeds it."""

    def __init__(self, num_ranks: int, stall_timeout_s: float, clock=time.monotonic) -> None:
        self.clock = clock
        self.stall_timeout_s = stall_timeout_s
        now = clock()
        self.last_seen = [now] * num_ranks  # when each rank last answered
        self.sent_at: deque[float] = deque()  # send times of the steps in flight, oldest first
        self.last_ping = now
        self.slowest_step_s = 0.0

    def step_sent(self) -> None:
        self.sent_at.append(self.clock())

    def step_done(self) -> None:
        """A step result came back: every rank took part in it."""
        now = self.clock()
        if self.sent_at:
            self.slowest_step_s = max(self.slowest_step_s, now - self.sent_at.popleft())
        self.last_seen = [now] * len(self.last_seen)

    def heard_from(self, rank: int) -> None:
        if 0 <= rank < len(self.last_seen):
            self.last_seen[rank] = self.clock()

    def ping_due(self) -> bool:
        """True (and the ping counted as sent) when an idle instance should be pinged."""
        now = self.clock()
        if self.sent_at or now - self.last_ping < PING_INTERVAL_S:
            return False
        self.last_ping = now
        return True

    @property
    def limit_s(self) -> float:
        return max(self.stall_timeout_s, 8 * self.slowest_step_s)

    def problem(self) -> str | None:
        """Why the instance cannot take a step now, or None when it can."""
        now = self.clock()
        if self.sent_at and now - self.sent_at[0] > self.limit_s:
            return f"a step has been running for {now - self.sent_at[0]:.0f} s (limit {self.limit_s:.0f} s)"
        for rank, seen in enumerate(self.last_seen):
            if now - seen > self.limit_s:
                return f"worker-{rank} has not answered for {now - seen:.0f} s (limit {self.limit_s:.0f} s)"
        return None
