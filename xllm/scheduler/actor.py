"""The scheduler actor: one per instance. Plans steps, fans them out, folds results in.

With async scheduling it keeps two steps in flight: while the workers run step N it
has already sent step N+1 (with placeholders for the tokens step N samples), so the
CPU work of planning hides behind the model's compute. Without it, one step at a time.

Requests come from the router; each step's outputs go straight to the frontend each
request names (``TokenizedRequest.reply_to``), one ``TokenBatch`` per frontend. A prefill
or decode instance also talks to its KV agent and to the schedulers of the instances it
pairs with (``disagg``: what the core decides, this actor sends). A prefill or
decode instance changes role when a router orders it (``roles``): it lets the old role's
requests finish, switches, and says so in the store and to every router. Its record
in the store also carries the service times its workers measured at start (the
``profile`` control call to rank 0), which the routers predict with. The
router hears the instance's load about twice a second and its prefix-cache changes
as they happen (``InstanceLoad``, ``KVEventBatch``), and asks it control calls.

Migration (``migration``): told to move its decoding requests (the ``migrate`` control
call of a drain, or a role change away from decode), it hands each to another instance,
which pulls its KV. Before a clean stop its launcher sends SIGUSR1: it tells the routers it
is leaving (they drain it) and tells the launcher once it holds no request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
import uuid

import msgspec
import zmq
import zmq.asyncio

from ..bus.actor import Actor
from ..bus.channel import Channel
from ..bus.codec import DecodeError
from ..deploy.plan import ActorSpec, DeploymentPlan
from ..metastore import keys, open_store
from ..metastore.registration import PrefixFollower, Registration
from ..protocol import (
    AbortRequest, ActorDrained, BlockRemoved, BlockStored, ControlCall, ControlReply, DisaggregatedRequest, InstanceLoad,
    InstanceLeaving, InstanceProfile, InstanceRecord, KVEventBatch, KVReceived, KVReleased, KVSendPlan, KVTierDone, KVTierInventory,
    MigratedRequest, MigrationTarget, PrefillLost, PrefillRequest, RequestRejected, RoleChange, RoleChanged,
    RouterRecord, SchedulerInput, StepResult, TokenizedRequest, WorkerError, WorkerOutput,
)
from .health import PING_INTERVAL_S, WorkerWatch
from .roles import RoleSwitch
from .outputs import StepOutputs
from .scheduler import Scheduler
from .stream import StreamBuffer

log = logging.getLogger(__name__)

LOAD_REPORT_S = 0.5  # load reports to the router
PROFILE_CALL = -1  # the call id of the profile asked of rank 0 (pings use 0)
KV_EVENTS_S = 0.01  # prefix-cache changes are batched over at most this long


class SchedulerActor(Actor):
    """Owns the request queues and the KV block bookkeeping of one instance."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan
        self.instance = plan.instance(spec.instance)
        self.cfg = cfg = plan.engine
        self.core = Scheduler(cfg.scheduler, cfg.cache, cfg.model.max_model_len, cfg.speculative)
        self.depth = 2 if cfg.scheduler.async_scheduling else 1
        self.in_flight = 0
        self.stream = StreamBuffer(cfg.scheduler.stream_interval)
        self.watch = WorkerWatch(self.instance.tp_size, cfg.scheduler.worker_stall_timeout_s)
        self.incarnation = uuid.uuid4().hex[:12]  # a restarted instance is a new incarnation
        self.routes: dict[str, Channel] = {}  # address -> PUSH (frontends, routers)
        self.routers: dict[bytes, str] = {}  # store key -> the router's reports address
        self._next_report = 0.0
        self._next_events = 0.0
        self._reported_idle = False  # the last load report said: nothing running or waiting
        self.roles = RoleSwitch(self.instance.role)  # what the routers send it; changed at run time
        self.profile: InstanceProfile | None = None  # measured by the workers, published in the record
        self._profile_asked = False
        self.drain_state = ""  # a clean stop is coming (SIGUSR1): "asked", then "announced", then "drained"

    async def setup(self) -> dict:
        plan, inst = self.plan, self.instance.id
        self.inputs = self.channel(zmq.PULL, plan.scheduler_in(inst), bind=True, union=SchedulerInput)
        self.results = self.channel(zmq.PULL, plan.results(inst), bind=True, union=WorkerOutput)
        self.plans = [self.channel(zmq.PUSH, plan.plan(inst, r), bind=True)
                      for r in range(self.instance.tp_size)]
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.inputs.sock, zmq.POLLIN)
        self.poller.register(self.results.sock, zmq.POLLIN)
        self.to_agent = None
        if plan.has_kv_agent(inst):
            self.to_agent = self.channel(zmq.PUSH, plan.kv_agent_in(inst), bind=False)
            self.core.agent_address = plan.kv_agent_in(inst)
            self.core.instance_id, self.core.address = inst, plan.scheduler_in(inst)
        self._register()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._leave)
        return {"num_blocks": self.cfg.cache.num_blocks, "incarnation": self.incarnation}

    def _leave(self) -> None:
        """SIGUSR1 from the launcher: a clean stop is coming. The routers are told (they send
        no new work and order the decoding requests moved); the launcher hears once nothing
        is left here."""
        self.drain_state = self.drain_state or "asked"

    async def _advance_leaving(self) -> None:
        if self.drain_state == "asked":
            self.drain_state = "announced"
            log.info("stopping: %d requests to move or finish first", len(self.core.requests))
            await self._to_routers(InstanceLeaving(self.instance.id, self.incarnation))
        if self.drain_state == "announced" and not self.core.requests:
            self.drain_state = "drained"
            log.info("stopping: no request left")
            self._next_report = 0.0  # the routers hear where its requests went before it goes
            await self._report()
            await self._notify(ActorDrained(self.name, os.getpid()))

    def _register(self) -> None:
        """Put this instance in the store (under a lease) and follow the routers there."""
        plan = self.plan
        self.store = open_store(plan.metastore, client_address=plan.store)
        self.registration = Registration(self.store, keys.instance_key(plan.deployment, self.instance.id),
                                         self._record())
        self.background(self.registration.run())
        self.background(PrefixFollower(self.store, keys.routers_prefix(plan.deployment),
                                       self._router_put, self._router_delete).run())

    def _record(self) -> bytes:
        """This instance's registration as it stands (its role may change while it runs)."""
        plan, cfg = self.plan, self.cfg
        return msgspec.json.encode(InstanceRecord(
            self.instance.id, self.incarnation, plan.scheduler_in(self.instance.id), self.roles.role,
            cfg.model.served_name, cfg.cache.num_blocks, cfg.cache.block_size, cfg.scheduler.max_num_seqs,
            next_role=self.roles.next_role, profile=self.profile))

    async def _router_put(self, key: bytes, value: bytes) -> None:
        self.routers[key] = msgspec.json.decode(value, type=RouterRecord).reports
        self._next_report = 0.0  # tell the new router about this instance now

    async def _router_delete(self, key: bytes) -> None:
        self.routers.pop(key, None)

    async def teardown(self) -> None:
        await self.registration.withdraw()
        await self.store.close()

    async def run(self) -> None:
        while True:
            while self.results.poll_now():
                await self._on_result(await self._recv(self.results))
            while self.inputs.poll_now():
                await self._on_input(await self._recv(self.inputs))
            if self.core.receiving or self.core.sending:
                self.core.expire_transfers(time.monotonic())
            if self.core.leaving or self.core.migrate_targets:
                self.core.advance_migrations(time.monotonic())
            if self.drain_state:
                await self._advance_leaving()
            await self._flush_kv()
            await self._report()
            if self.roles.pending is not None and self.roles.due(self.core.requests.values()):
                await self._switch_role()
            if self.in_flight < self.depth and self.core.has_work():
                plan = self.core.schedule()
                await self._flush_kv(plan.step_id if plan is not None else None)
                if plan is not None:
                    for ch in self.plans:
                        await ch.send(plan)
                    self.in_flight += 1
                    self.watch.step_sent()
                    continue
            if self.watch.ping_due():
                for ch in self.plans:
                    await ch.send(ControlCall(0, "ping"))
                if not self._profile_asked:  # answered once rank 0 is ready (it measures first)
                    await self.plans[0].send(ControlCall(PROFILE_CALL, "profile"))
                    self._profile_asked = True
            if self.stream and (not self.in_flight or self.stream.due(time.monotonic())):
                await self._send_outputs(self.stream.step_id, self.stream.take())  # nothing more is coming soon
            wait = LOAD_REPORT_S if self.in_flight else min(LOAD_REPORT_S, PING_INTERVAL_S)
            if (deadline := self.stream.deadline()) is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if self.core.blocks.events:  # prefix-cache changes wait at most KV_EVENTS_S, idle or not
                wait = min(wait, max(0.001, self._next_events - time.monotonic()))
            await self.poller.poll(math.ceil(wait * 1000))

    async def _flush_kv(self, step_id: int | None = None) -> None:
        """Send what the core decided about transfers: tier orders and the step's blocks to
        push (before the step goes to the workers), orders to the agent, aborts to prefill
        instances, failures to decode instances."""
        if self.to_agent is not None:
            for order in self.core.take_tier_orders():
                await self.to_agent.send(order)
        handed = self.core.take_handed()
        if handed and self.stream:  # what the source streamed goes out before the target streams more
            await self._send_outputs(self.stream.step_id, self.stream.take())
        for address, msg in handed:
            ch = self._route(address)
            if ch is None:  # nowhere to go: it stays
                self.core.migration_refused(msg.request.req_id)
            else:
                await ch.send(msg)
        expired = StepOutputs()
        for req in self.core.take_expired():
            log.warning("request %s ended: the instance it moved to did not take its KV in time", req.req_id)
            expired.add(req, [], "abort")
        if expired.rows:
            await self._emit(-1, expired)
        out = self.core.take_outbox()
        if out.sends and step_id is not None:
            await self.to_agent.send(KVSendPlan(step_id, out.sends))
        if out.moves:  # stored by steps already planned: sent once the last of them has run
            await self.to_agent.send(KVSendPlan(self.core.last_step_id, out.moves))
        for msg in out.to_agent:
            await self.to_agent.send(msg)
        for address, rid in out.aborts:
            ch = self._route(address)
            if ch is not None:
                await ch.send(AbortRequest(rid))
        for address, rid, why in out.lost:
            ch = self._route(address)
            if ch is not None:
                await ch.send(PrefillLost(self.instance.id, [rid], why))

    async def _recv(self, ch):
        try:
            return await ch.recv()
        except DecodeError as exc:
            log.error("rejected a malformed message: %s", exc)
            return None

    # -- the router's view ------------------------------------------------------------------
    async def _report(self) -> None:
        """Push prefix-cache changes (batched briefly) and, twice a second, the load."""
        now = time.monotonic()
        if now >= self._next_events and self.core.blocks.events:
            self._next_events = now + KV_EVENTS_S
            ev = self.core.blocks.drain_events()
            await self._to_routers(KVEventBatch(
                self.instance.id, self.incarnation, [BlockStored(h, p, t, tier) for h, p, t, tier in ev.stored],
                [BlockRemoved(h, tier) for h, tier in ev.removed], ev.cleared))
        idle = not (self.core.running or self.core.waiting or self.core.receiving)
        if not idle:
            self._reported_idle = False
        if now >= self._next_report or (idle and not self._reported_idle):
            # NOTE: besides the periodic report, one as soon as the instance runs dry: a
            # router still seeing the last busy report would send the next turn of a
            # conversation away from the cache that holds it
            self._next_report = now + LOAD_REPORT_S
            self._reported_idle = idle
            core, blocks = self.core, self.core.blocks
            finished, core.finished_since_report = core.finished_since_report, []
            await self._to_routers(InstanceLoad(
                self.instance.id, self.incarnation, len(core.waiting), len(core.running) + len(core.receiving),
                blocks.num_free_blocks, blocks.num_blocks, core.stats.ttft_s, core.stats.tpot_s, finished,
                sum(-(-r.num_tokens // blocks.block_size) for r in core.waiting), core.stats.output_tokens,
                core.take_moved(),
                sum(max(len(r.prompt_token_ids) - r.num_computed_tokens, 0) for r in core.running)))

    async def _to_routers(self, msg) -> None:
        # NOTE: every router keeps its own view, so each hears everything
        for address in self.routers.values():
            ch = self._route(address)
            if ch is not None:
                await ch.send(msg)

    # -- steps ------------------------------------------------------------------------------
    async def _on_result(self, msg) -> None:
        match msg:
            case StepResult():
                self.in_flight -= 1
                self.watch.step_done()
                await self._emit(msg.step_id, self.core.update(msg))
            case WorkerError():
                raise RuntimeError(f"a worker failed in step {msg.step_id}: {msg.message}")
            case ControlReply(result={"rank": int(rank)}):
                self.watch.heard_from(rank)
            case ControlReply(call_id=-1, ok=True, result={"profile": dict(profile)}):  # PROFILE_CALL
                self.profile = msgspec.convert(profile, InstanceProfile)
                await self.registration.update(self._record())
            case ControlReply():
                pass

    async def _on_input(self, msg) -> None:
        if isinstance(msg, (TokenizedRequest, ControlCall)) and msg.reply_to and self._route(msg.reply_to) is None:
            return  # nowhere to answer: dropped (and logged)
        match msg:
            case TokenizedRequest() if not msg.reply_to:
                log.error("dropped request %s: it names no route for its outputs", msg.req_id)
            case TokenizedRequest():
                try:
                    self.core.add_request(msg)
                except ValueError as exc:
                    await self._route(msg.reply_to).send(RequestRejected(msg.req_id, str(exc)))
                except OverflowError as exc:
                    await self._route(msg.reply_to).send(RequestRejected(msg.req_id, str(exc), "overloaded"))
            case DisaggregatedRequest():
                await self._on_disaggregated(msg)
            case MigratedRequest():
                await self._on_migrated(msg)
            case PrefillRequest():
                await self._on_prefill(msg)
            case PrefillLost():
                self.core.prefill_lost(msg.req_ids, msg.reason)
            case KVReleased():
                self.core.kv_released(msg)
            case KVReceived():
                await self._emit(-1, self.core.deliver(msg))
            case KVTierDone():
                self.core.tier_done(msg)
            case KVTierInventory():
                self.core.tier_inventory(msg)
            case AbortRequest():
                req = self.core.abort(msg.req_id)
                if req is not None and req.remote_decode is None:  # a prefill for others streams nothing
                    out = StepOutputs()
                    out.add(req, [], "abort")
                    await self._emit(-1, out)
            case RoleChange():
                await self._on_role_change(msg)
            case ControlCall():
                if msg.reply_to:
                    await self._route(msg.reply_to).send(self._control(msg))

    # -- role changes ---------------------------------------------------------------------------
    async def _on_role_change(self, order: RoleChange) -> None:
        """Start draining towards the ordered role (announced in the store at once, so every
        router stops sending work of the old one), or refuse the order."""
        error = self.roles.begin(order)
        if error:
            log.warning("refused a role change to %r: %s", order.role, error)
            await self._to_routers(RoleChanged(self.instance.id, self.incarnation, order.change_id,
                                               self.roles.role, ok=False, error=error))
            return
        if self.roles.next_role != self.roles.role:
            log.info("role change %d: %s -> %s, draining (%d requests of the old role)", order.change_id,
                     self.roles.role, order.role, self.roles.old_work(self.core.requests.values()))
            if self.roles.role == "decode" and order.migrate_to and self.to_agent is not None:
                self.core.start_migrating([t for t in order.migrate_to if t.instance_id != self.instance.id])
            await self.registration.update(self._record())

    def _migrate(self, call: ControlCall) -> ControlReply:
        """Move every decoding request, now and from now on, to the given instances (a drain)."""
        try:
            targets = msgspec.convert(call.args.get("targets", []), list[MigrationTarget])
        except msgspec.ValidationError as exc:
            return ControlReply(call.call_id, False, error=f"bad migration targets: {exc}")
        if self.to_agent is None:
            return ControlReply(call.call_id, False, error=(
                f"instance {self.instance.id} has no KV agent, so its requests cannot move (give it a "
                "prefill or decode role, or KV tiers)"))
        if not targets or any(t.instance_id == self.instance.id for t in targets):
            return ControlReply(call.call_id, False, error="migration needs other instances to move to")
        moving = self.core.start_migrating(targets)
        log.info("moving every decoding request to %s (%d now)", ", ".join(t.instance_id for t in targets), moving)
        return ControlReply(call.call_id, True, {"instance_id": self.instance.id, "moving": moving,
                                                 "left": len(self.core.requests)})

    async def _switch_role(self) -> None:
        self.roles.release(self.core)
        old = self.roles.role
        done = self.roles.finish(self.instance.id, self.incarnation, self.core.requests.values())
        log.info("role change %d: %s -> %s after %.2f s of draining (%d requests of the old role left)",
                 done.change_id, old, done.role, done.drain_s, done.left_over)
        await self.registration.update(self._record())
        await self._to_routers(done)

    async def _on_disaggregated(self, msg: DisaggregatedRequest) -> None:
        req = msg.request
        ch = self._route(req.reply_to) if req.reply_to else None
        if ch is None:
            log.error("dropped request %s: no route for its outputs", req.req_id)
            return
        if self.to_agent is None:  # NOTE: any role with a KV agent serves both kinds (roles.py)
            await ch.send(RequestRejected(req.req_id, f"instance {self.instance.id} does not decode for others"))
            return
        try:
            self.core.add_disaggregated(msg)
        except ValueError as exc:
            await ch.send(RequestRejected(req.req_id, str(exc)))
        except OverflowError as exc:
            await ch.send(RequestRejected(req.req_id, str(exc), "overloaded"))

    async def _on_migrated(self, msg: MigratedRequest) -> None:
        """A running request moves here; a refusal goes back to its source (it stays there)."""
        back = self._route(msg.source_address)
        if back is None:
            return
        rid = msg.request.req_id
        if self.to_agent is None:
            why = f"instance {self.instance.id} has no KV agent to receive a moving request"
        elif self._route(msg.request.reply_to) is None:
            why = "the request names no route for its outputs"
        else:
            try:
                self.core.add_migrated(msg)
                log.info("request %s moves here from %s (%d tokens of KV)", rid, msg.source_instance,
                         msg.num_computed_tokens)
                return
            except (ValueError, OverflowError) as exc:
                why = str(exc)
        log.warning("refused request %s moving from %s: %s", rid, msg.source_instance, why)
        await back.send(PrefillLost(self.instance.id, [rid], why))

    async def _on_prefill(self, msg: PrefillRequest) -> None:
        """A decode instance asks for a prefill; a refusal goes back to it at once."""
        back = self._route(msg.decode_address)
        if back is None:
            return
        if self.to_agent is None:
            why = f"instance {self.instance.id} does not prefill for others"
        else:
            try:
                self.core.add_prefill(msg)
                return
            except (ValueError, OverflowError) as exc:
                why = str(exc)
        await back.send(PrefillLost(self.instance.id, [msg.request.req_id], why))

    def _route(self, address: str) -> Channel | None:
        """The PUSH socket to one frontend, opened the first time a request names it; None
        (logged) for an address ZeroMQ cannot connect to."""
        ch = self.routes.get(address)
        if ch is None:
            try:
                ch = self.routes[address] = self.channel(zmq.PUSH, address, bind=False)
            except (zmq.ZMQError, ValueError) as exc:
                log.error("cannot answer on %r: %s", address[:200], exc)
                return None
        return ch

    async def _emit(self, step_id: int, out: StepOutputs) -> None:
        """A step's outputs: to the frontends now, or held for the stream interval."""
        await self._send_outputs(step_id, self.stream.add(step_id, out, time.monotonic()))

    async def _send_outputs(self, step_id: int, out: StepOutputs) -> None:
        if out.rows:
            for route, batch in out.to_batches(step_id, self.instance.id).items():
                ch = self._route(route)  # checked when the request came
                if ch is not None:
                    await ch.send(batch)

    def _control(self, call: ControlCall) -> ControlReply:
        core = self.core
        match call.method:
            case "stats":
                return ControlReply(call.call_id, True, {**core.snapshot(), "instance_id": self.instance.id,
                                                         "role": self.roles.role, "next_role": self.roles.next_role,
                                                         "role_changes": self.roles.num_changes,
                                                         "profile": msgspec.to_builtins(self.profile)})
            case "health":
                problem = self.watch.problem()
                if problem is not None:
                    return ControlReply(call.call_id, False, error=f"unavailable: {problem}")
                return ControlReply(call.call_id, True, {"in_flight": self.in_flight})
            case "reset_prefix_cache":
                return ControlReply(call.call_id, True, core.reset_prefix_cache())
            case "check_integrity":
                return ControlReply(call.call_id, True, core.check_integrity())
            case "migrate":
                return self._migrate(call)
        return ControlReply(call.call_id, False, error=f"unknown method {call.method!r}")
