"""Scheduling policies: who waits first, who is preempted first, which phase goes first.

A policy is a small value object the scheduler consults; it never touches KV memory.

- ``fcfs``: first come, first served: running requests (decodes and unfinished prompt
  chunks, in the order they were admitted) take the budget, then waiting ones by
  arrival; the newest running request is preempted first.
- ``priority``: lower ``priority`` value first (ties by arrival); the least urgent
  running request is preempted first.
- ``prefill_first``: FCFS order, but waiting prompts are admitted before running
  requests get their decode tokens (lower time to first token).
- ``decode_first``: requests in their decode phase take the budget first, then
  unfinished prompt chunks, then new prompts fill what remains (smoother inter-token
  latency under long prompts).

With every policy an ``offline`` request ranks after every online one: it only runs on
capacity online requests leave and is the first to be preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .request import Request


@dataclass(frozen=True)
class Policy:
    name: str = "fcfs"

    @property
    def prefill_first(self) -> bool:
        return self.name == "prefill_first"

    def rank(self, req: Request) -> tuple:
        """Sort key: smaller runs first and is preempted last."""
        if self.name == "priority":
            return (req.offline, req.priority, req.arrival_time, req.req_id)
        return (req.offline, req.arrival_time, req.req_id)

    def pick_victim(self, candidates: Iterable[Request]) -> Request | None:
        """The running request to preempt when KV memory runs out."""
        return max(candidates, key=self.rank, default=None)
