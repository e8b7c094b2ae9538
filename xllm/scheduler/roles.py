"""An instance's role at run time: prefill or decode for the others, changed while it serves.

The router decides (``xllm.router.adaptive``) and orders a change (``RoleChange``); this
class keeps the instance's side of it. A role only says what the routers send the
instance: every prefill or decode instance has a KV agent and a shared KV pool, and its
scheduler serves both kinds of disaggregated work whenever they reach it (a request a
router placed before it heard of the change still arrives). So a change never refuses a
request; it waits until the old role's requests have left (``drained``), or until the
order's drain timeout, and then switches (what is left finishes beside the new work).

Leaving decode, an order that names other decode instances (``RoleChange.migrate_to``)
moves the decoding requests there (``scheduler.migration``) instead of waiting for them
to finish; the scheduler's actor starts that with the change, and ``release`` ends it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..protocol import RoleChange, RoleChanged

SWITCHABLE = ("prefill", "decode")  # a mixed instance has no KV agent: its role is fixed


@dataclass
class Pending:
    """A change under way."""

    change_id: int
    role: str
    started: float  # monotonic
    deadline: float  # monotonic: switch then, drained or not


class RoleSwitch:
    """The role of one instance and the change under way, if any. Verbs: begin, release,
    due, finish."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.pending: Pending | None = None
        self.num_changes = 0

    @property
    def next_role(self) -> str:
        """The role it drains towards ("" when no change is under way)."""
        return self.pending.role if self.pending is not None else ""

    def begin(self, order: RoleChange, now: float | None = None) -> str:
        """Start a change; "" when started (or nothing to do), else why it is refused."""
        if self.role not in SWITCHABLE:
            return f"a {self.role} instance has no KV agent: its role cannot change"
        if order.role not in SWITCHABLE:
            return f"an instance can become {' or '.join(SWITCHABLE)}, not {order.role!r}"
        if not order.drain_timeout_s >= 0:
            return f"the drain timeout must be >= 0, got {order.drain_timeout_s}"
        now = time.monotonic() if now is None else now
        # NOTE: a later order replaces an earlier one (the router that sent both knows best)
        self.pending = Pending(order.change_id, order.role, now, now + order.drain_timeout_s)
        return ""

    def old_work(self, requests) -> int:
        """Requests of the role being left: prefills for other instances when leaving
        prefill, everything else when leaving decode."""
        prefilling = sum(1 for r in requests if r.remote_decode is not None)
        return prefilling if self.role == "prefill" else len(requests) - prefilling

    def release(self, core) -> None:
        """At the switch: no more requests start moving elsewhere (those on their way
        finish moving)."""
        core.stop_migrating()

    def due(self, requests, now: float | None = None) -> bool:
        """True when the change can be made: nothing of the old role is left, or the order's
        drain timeout has passed."""
        if self.pending is None:
            return False
        now = time.monotonic() if now is None else now
        return self.pending.role == self.role or not self.old_work(requests) or now >= self.pending.deadline

    def finish(self, instance_id: str, incarnation: str, requests, now: float | None = None) -> RoleChanged:
        """Switch to the pending role; the answer for the routers."""
        p = self.pending
        now = time.monotonic() if now is None else now
        left = self.old_work(requests) if p.role != self.role else 0
        if p.role != self.role:
            self.num_changes += 1
        self.role, self.pending = p.role, None
        return RoleChanged(instance_id, incarnation, p.change_id, self.role, drain_s=now - p.started,
                           left_over=left)
