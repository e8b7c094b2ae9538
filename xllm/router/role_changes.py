"""The router's side of role changes: ordering them, hearing they are done, and (with
``--adaptive-pd``) asking the controller (``adaptive.RoleController``) which to make.

An ordered instance leaves its pool at once (``Registries`` puts it in the draining pool:
no policy chooses it), gets ``RoleChange``, drains, switches, and comes back in its new
role's pool when its ``RoleChanged`` or its store record says so. A decode instance
becoming a prefill instance is told to move its decoding requests to the other decode
instances (migration) rather than wait for them to finish. Every change is logged
and counted (``stats``: ``role_changes``, ``role_changes_refused``).
"""

from __future__ import annotations

import itertools
import logging
from typing import Awaitable, Callable

from ..config import RouterConfig
from ..protocol import MigrationTarget, RoleChange, RoleChanged, TokenizedRequest
from .adaptive import RoleController
from .registry import Registries

log = logging.getLogger("xllm.router.roles")


class RoleChanges:
    """Role changes ordered by one router. Verbs: order, changed, lost, observe, tick."""

    def __init__(self, registry: Registries, cfg: RouterConfig, send: Callable[[str, object], Awaitable[None]],
                 now: float, control: bool) -> None:
        self.registry = registry
        self.send = send  # (instance id, message): to that instance's scheduler
        self.drain_timeout_s = cfg.adaptive.drain_timeout_s
        self.interval_s = cfg.adaptive.interval_s
        self.controller = RoleController(cfg.slo, cfg.adaptive, now) if control else None
        self.ordered: dict[int, tuple[str, str]] = {}  # change id -> (instance, its role then)
        self.stats = {"role_changes": 0, "role_changes_refused": 0}
        self._ids = itertools.count(1)
        self._next_tick = now

    async def order(self, instance_id: str, role: str) -> int | None:
        """Order ``instance_id`` to become ``role``; the change's id, or None if it is not
        registered."""
        inst = self.registry.get(instance_id)
        if inst is None:
            return None
        change_id = next(self._ids)
        log.info("role change %d ordered: %s %s -> %s", change_id, instance_id, inst.role, role)
        self.ordered[change_id] = (instance_id, inst.role)
        leaving_decode = inst.role == "decode" and role != "decode"
        self.registry.set_role(instance_id, inst.role, role)
        # leaving decode, its decoding requests move to the other decode instances (migration)
        move_to = [MigrationTarget(i.id, i.address) for i in self.registry.pool("decode").instances.values()
                   if i.id != instance_id] if leaving_decode else []
        await self.send(instance_id, RoleChange(change_id, role, self.drain_timeout_s, move_to))
        return change_id

    def changed(self, msg: RoleChanged, now: float) -> None:
        """An instance switched (or refused): back in service in the role it has."""
        inst = self.registry.get(msg.instance_id)
        if inst is None or inst.incarnation not in ("", msg.incarnation):
            return
        iid, was = self.ordered.pop(msg.change_id, ("", ""))
        ours = iid == msg.instance_id  # else another router's order: that router counts it
        if not msg.ok:
            self.stats["role_changes_refused"] += ours
            log.warning("instance %s refused role change %d: %s", msg.instance_id, msg.change_id, msg.error)
        elif ours and msg.role != was:
            self.stats["role_changes"] += 1
            log.info("instance %s is %s now (role change %d, %.2f s of draining, %d requests of the old "
                     "role left)", msg.instance_id, msg.role, msg.change_id, msg.drain_s, msg.left_over)
        self.registry.set_role(msg.instance_id, msg.role)
        if ours:
            self._done(msg.instance_id, now)

    def lost(self, instance_id: str, now: float) -> None:
        """``instance_id`` is gone: a change of it is over."""
        self.ordered = {k: v for k, v in self.ordered.items() if v[0] != instance_id}
        self._done(instance_id, now)

    def observe(self, req: TokenizedRequest, cached: int, now: float) -> None:
        """A request was placed, ``cached`` of its prompt tokens in cache where it prefills."""
        if self.controller is not None:
            n = len(req.prompt_token_ids)
            self.controller.observe(now, n, min(cached, n - 1), req.sampling.max_tokens or 1)

    async def tick(self, now: float) -> None:
        """Once an interval: let the controller look at the split and make its change."""
        ctl = self.controller
        if ctl is None or now < self._next_tick:
            return
        self._next_tick = now + self.interval_s
        for stuck in ctl.expired(now):
            inst = self.registry.get(stuck)
            log.warning("role change of %s abandoned: no answer in time", stuck)
            if inst is not None:
                self.registry.set_role(stuck, inst.role)  # back in service in the role it has
            ctl.finished(now, stuck)
        for flip in ctl.step(self.registry, now):
            log.info("adaptive PD: %s becomes %s: %s", flip.instance_id, flip.role, flip.reason)
            if await self.order(flip.instance_id, flip.role) is None:
                ctl.finished(now, flip.instance_id)

    def snapshot(self) -> dict:
        """For the router's ``stats``: counts, each instance's role, the draining, the last look."""
        insts = self.registry.instances.values()
        return {**self.stats, "roles": {i.id: i.role for i in insts},
                "draining": {i.id: i.next_role for i in insts if i.next_role},
                "adaptive": self.controller.last if self.controller is not None else {}}

    def _done(self, instance_id: str, now: float) -> None:
        if self.controller is not None:
            self.controller.finished(now, instance_id)
