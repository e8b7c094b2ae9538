"""The router actor (global scheduler): places every request on one instance.

Frontends send it requests, aborts and control calls (their DEALER to its ROUTER);
instances send it load reports, KV events and control replies (PUSH to its PULL). It
keeps the registry of instances, their load, and the global prefix index, asks its
policy where each request goes, and forwards the request there. Outputs do not pass
through it: schedulers send them straight to the frontend each request names.

A control call is asked of every instance and answered once, merged (``merge``). The
router remembers which instance holds each request until that instance reports it
finished, so an abort reaches the right instance.

The registry follows the metadata store: instances come with their registration and
leave with it (a lease that expired, a clean stop), or when their load reports stop
for ``SILENCE_S``. A lost instance gets no new request; the frontends of the requests
it held hear of them (``InstanceLost``) and re-send or end each one.

An instance's role can change while it runs (``role_changes``): it leaves its pool at once
(no new work), drains, switches, and comes back in the pool of its new role. With
``--adaptive-pd`` the first router of a host runs the controller (``adaptive``) that
decides those changes: it hears of every request placed and looks at the split once a
second.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from ..bus.actor import Actor
from ..bus.channel import Channel
from ..bus.codec import DecodeError
from ..deploy.plan import ROLES, ActorSpec, DeploymentPlan
from ..metastore import keys, open_store
from ..metastore.registration import PrefixFollower, Registration
from ..perf_model import ServiceModel
from ..protocol import (
    AbortRequest, ControlCall, ControlReply, DisaggregatedRequest, ErrorReply, InstanceLoad, InstanceLost,
    InstanceLeaving, InstanceRecord, InstanceReport, KVEventBatch, MigrationTarget, PrefillLost, RequestRejected,
    RoleChanged, RouterInput, RouterRecord, TokenizedRequest,
)
from .merge import FANNED_OUT, merge
from .policies import make_policy
from .slo import SloAware, SloRefused
from .prefix_index import PrefixIndex
from .registry import STOPPING, InstanceState, Registries, placement
from .role_changes import RoleChanges

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 1.5  # an instance that has not answered a control call by then is left out
SILENCE_S = 3.0  # an instance that sent no load report for this long is taken for lost


@dataclass
class Gather:
    """A control call asked of every instance, waiting for their replies."""

    frontend: bytes
    call_id: int  # the frontend's call id
    method: str
    deadline: float
    replies: dict[str, ControlReply | None] = field(default_factory=dict)


class RouterActor(Actor):
    """Registry, load view, prefix index and policy of one deployment."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan
        self.cfg = plan.engine
        self.registry = Registries()
        self.index = PrefixIndex()
        # one policy per role, so round robin takes turns within each
        self.weights = self.cfg.router.weights  # per tier: a held block's cost in blocks of prefill
        self.policies = {role: make_policy(self.cfg.router.policy, self.index, slo=self.cfg.router.slo,
                                           tier_weights=self.weights) for role in ROLES}
        self.placed: dict[str, tuple[str, bytes]] = {}  # request -> (instance, frontend)
        self.prefill_of: dict[str, str] = {}  # disaggregated request -> its prefill instance
        self.channels_to: dict[str, Channel] = {}  # instance -> its scheduler's input
        self.gathers: dict[int, Gather] = {}
        self.asked: dict[int, tuple[int, str]] = {}  # call id sent to an instance -> (gather, instance)
        self._ids = itertools.count(1)
        self.records: dict[str, InstanceRecord] = {}  # what the store says, lost or not
        self.drained: dict[str, str] = {}  # instance -> the incarnation drained (no new work for it)
        control = self.cfg.router.adaptive.enabled and plan.of_kind("router")[0].name == spec.name
        self.roles = RoleChanges(self.registry, self.cfg.router, self._to_instance, time.monotonic(), control)
        self.stats = {"routed": 0, "routed_disaggregated": 0, "rejected": 0, "rejected_slo": 0, "instances_lost": 0,
                      "requests_lost": 0}

    async def setup(self) -> dict:
        plan = self.plan
        self.frontends = self.channel(zmq.ROUTER, plan.router_in(self.name), bind=True, union=RouterInput)
        self.reports_address = plan.router_reports(self.name)
        self.reports = self.channel(zmq.PULL, self.reports_address, bind=True, union=InstanceReport)
        self.store = open_store(plan.metastore, client_address=plan.store)
        self.registration = Registration(self.store, keys.router_key(plan.deployment, self.name),
                                         msgspec.json.encode(RouterRecord(self.name, self.reports_address)))
        self.background(self.registration.run())
        follower = PrefixFollower(self.store, keys.instances_prefix(plan.deployment),
                                  self._instance_put, self._instance_delete)
        self.background(follower.run())
        # NOTE: ready means this host's instances can be reached; other hosts' come when they do
        await follower.synced.wait()
        while len(self.registry) < len(plan.instances):
            await asyncio.sleep(0.05)
        return {"policy": self.cfg.router.policy, "instances": len(self.registry)}

    async def teardown(self) -> None:
        await self.registration.withdraw()
        await self.store.close()

    # -- the registry ---------------------------------------------------------------------------
    async def _instance_put(self, key: bytes, value: bytes) -> None:
        rec = msgspec.json.decode(value, type=InstanceRecord)
        old = self.registry.get(rec.instance_id)
        if old is not None and old.incarnation not in ("", rec.incarnation):
            await self._lost(rec.instance_id, "it restarted")
        self.records[rec.instance_id] = rec
        self._admit(rec)

    def _admit(self, rec: InstanceRecord) -> None:
        inst = self.registry.get(rec.instance_id)
        if inst is None or inst.address != rec.address or inst.incarnation not in ("", rec.incarnation):
            log.info("instance %s joined (%s, %s)", rec.instance_id, rec.address, rec.role)
            inst = InstanceState(rec.instance_id, rec.address, rec.incarnation, rec.role, rec.next_role,
                                 rec.num_blocks, rec.block_size, rec.max_num_seqs)
        # NOTE: a record that changed (role, profile) keeps the instance's load view
        inst.role, inst.next_role = rec.role, rec.next_role
        if self.drained.get(rec.instance_id) == rec.incarnation:
            inst.next_role = inst.next_role or STOPPING  # drained: no new work until it restarts
        inst.model = ServiceModel(rec.profile) if rec.profile is not None else None
        self.registry.add(inst)

    async def _instance_delete(self, key: bytes) -> None:
        iid = key.rsplit(b"/", 1)[-1].decode()
        self.records.pop(iid, None)
        await self._lost(iid, "its registration ended")

    async def _lost(self, instance_id: str, why: str) -> None:
        """Take ``instance_id`` out of service; tell each frontend which of its requests it held."""
        inst = self.registry.remove(instance_id)
        if inst is None:
            return
        self.index.clear(instance_id)
        self.roles.lost(instance_id, time.monotonic())
        held: dict[bytes, list[str]] = {}
        for rid, (iid, frontend) in list(self.placed.items()):
            if iid == instance_id:
                held.setdefault(frontend, []).append(rid)
                del self.placed[rid]
        ch = self.channels_to.pop(instance_id, None)
        if ch is not None:  # it may only be frozen: it must not go on with them
            for rids in held.values():
                for rid in rids:
                    await ch.send(AbortRequest(rid))
            ch.close()
            self.channels.remove(ch)
        await self._prefills_lost(instance_id, [rid for rids in held.values() for rid in rids])
        self.stats["instances_lost"] += 1
        self.stats["requests_lost"] += sum(map(len, held.values()))
        log.warning("instance %s lost (%s) with %d requests", instance_id, why, sum(map(len, held.values())))
        for frontend, rids in held.items():
            await self.frontends.send_to(frontend, InstanceLost(instance_id, rids))
        for gid, gather in list(self.gathers.items()):  # it will not answer
            gather.replies.pop(instance_id, None)
            await self._finish_if_complete(gid)

    async def _prefills_lost(self, instance_id: str, decoded_there: list[str]) -> None:
        """PD bookkeeping when ``instance_id`` is lost: the prefills of requests it decoded
        are aborted; requests it prefilled for others are computed by their decode side."""
        for rid in decoded_there:
            pre = self.prefill_of.pop(rid, None)
            if pre is not None:
                await self._to_instance(pre, AbortRequest(rid))
        by_decode: dict[str, list[str]] = {}
        for rid, pre in list(self.prefill_of.items()):
            if pre == instance_id:
                del self.prefill_of[rid]
                where = self.placed.get(rid)
                if where is not None:
                    by_decode.setdefault(where[0], []).append(rid)
        for dec, rids in by_decode.items():
            await self._to_instance(dec, PrefillLost(instance_id, rids, f"instance {instance_id} was lost"))

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.frontends.sock, zmq.POLLIN)
        poller.register(self.reports.sock, zmq.POLLIN)
        while True:
            while self.reports.poll_now():
                try:
                    await self._on_report(await self.reports.recv())
                except DecodeError as exc:
                    log.error("rejected a malformed report: %s", exc)
            while self.frontends.poll_now():
                frontend, msg = await self.frontends.recv_from()
                await self._on_frontend(frontend, msg)
            await self._expire_gathers()
            for inst in self.registry.silent(SILENCE_S):
                await self._lost(inst.id, f"no load report for {SILENCE_S:g} s")
            await self.roles.tick(time.monotonic())
            await poller.poll(100 if self.gathers else 500)

    # -- from frontends -----------------------------------------------------------------------
    async def _on_frontend(self, frontend: bytes, msg) -> None:
        match msg:
            case TokenizedRequest():
                await self._place(frontend, msg)
            case AbortRequest():
                where = self.placed.pop(msg.req_id, None)
                self.prefill_of.pop(msg.req_id, None)  # its decode side tells the prefill side
                if where is not None:
                    await self._to_instance(where[0], msg)
            case ControlCall(method="drain"):
                await self._drain(frontend, msg)
            case ControlCall():
                await self._fan_out(frontend, msg)
            case DecodeError():
                log.error("rejected a malformed message from a frontend: %s", msg)
                await self.frontends.send_to(frontend, ErrorReply("bad_request", f"malformed message: {msg}"))

    async def _place(self, frontend: bytes, req: TokenizedRequest) -> None:
        role = placement(self.registry, len(req.prompt_token_ids), self.cfg.router.pd_short_prompt)
        try:
            if role == "pair":
                await self._place_pair(frontend, req)
                return
            inst = self.policies[role].choose(req, self.registry.pool(role))
        except SloRefused as exc:
            self.stats["rejected_slo"] += 1
            await self.frontends.send_to(frontend, RequestRejected(req.req_id, str(exc), "overloaded"))
            return
        if inst is None:
            self.stats["rejected"] += 1
            await self.frontends.send_to(frontend, RequestRejected(
                req.req_id, "no instance is serving this deployment", "unavailable"))
            return
        hashes = req.block_hashes
        hit = self.index.deepest(inst.id, hashes)
        self.registry.routed(inst, self.index.prefill_cost(inst.id, hashes, self.weights, hit))
        self.roles.observe(req, hit * inst.block_size, time.monotonic())
        self.placed[req.req_id] = (inst.id, frontend)
        self.stats["routed"] += 1
        await self._to_instance(inst.id, req)

    async def _place_pair(self, frontend: bytes, req: TokenizedRequest) -> None:
        """A prefill instance (by the policy: the prefix-aware one scores cache hits there)
        and a decode instance (by the policy over the decode pool) for ``req``."""
        policy = self.policies["decode"]
        if isinstance(policy, SloAware):  # the pair is judged as one: TTFT on one side, TPOT on the other
            pre, dec = policy.choose_pair(req, self.registry.pool("prefill"), self.registry.pool("decode"))
        else:
            pre = self.policies["prefill"].choose(req, self.registry.pool("prefill"))
            dec = policy.choose(req, self.registry.pool("decode"))
        hashes = req.block_hashes
        hit = self.index.deepest(pre.id, hashes)
        self.registry.routed(pre, self.index.prefill_cost(pre.id, hashes, self.weights, hit))
        self.registry.routed(dec, 0)
        self.roles.observe(req, hit * pre.block_size, time.monotonic())
        self.placed[req.req_id] = (dec.id, frontend)
        self.prefill_of[req.req_id] = pre.id
        self.stats["routed"] += 1
        self.stats["routed_disaggregated"] += 1
        await self._to_instance(dec.id, DisaggregatedRequest(req, pre.id, pre.address))

    async def _to_instance(self, instance_id: str, msg) -> None:
        ch = self.channels_to.get(instance_id)
        if ch is None:
            inst = self.registry.get(instance_id)
            if inst is None:
                return
            ch = self.channels_to[instance_id] = self.channel(zmq.PUSH, inst.address, bind=False)
        await ch.send(msg)

    # -- control calls --------------------------------------------------------------------------
    async def _fan_out(self, frontend: bytes, call: ControlCall) -> None:
        if call.method not in FANNED_OUT:
            await self.frontends.send_to(frontend, ControlReply(call.call_id, False,
                                                                error=f"unknown method {call.method!r}"))
            return
        gid = next(self._ids)
        gather = self.gathers[gid] = Gather(frontend, call.call_id, call.method,
                                            time.monotonic() + CALL_TIMEOUT_S)
        for iid in list(self.registry.instances):
            own = next(self._ids)
            self.asked[own] = (gid, iid)
            gather.replies[iid] = None
            await self._to_instance(iid, ControlCall(own, call.method, reply_to=self.reports_address))
        await self._finish_if_complete(gid)

    async def _drain(self, frontend: bytes, call: ControlCall) -> None:
        """``drain`` (args: ``instance``): the instance gets no new work from this router and
        moves its decoding requests to the other instances of its role (migration), so it
        can be stopped without ending any; answered with the instance's own answer."""
        iid = call.args.get("instance")
        inst = self.registry.get(iid) if isinstance(iid, str) else None
        if inst is None:
            error = f"drain needs the id of a registered instance, got {iid!r}"
        else:
            error = await self._start_drain(inst, frontend, call.call_id)
        if error:
            await self.frontends.send_to(frontend, ControlReply(call.call_id, False, error=error))

    async def _start_drain(self, inst: InstanceState, frontend: bytes | None = None, call_id: int = 0) -> str:
        """Take ``inst`` out of service and order its requests moved; "" or why not. With a
        ``frontend``, the instance's answer goes there (else it is not waited for)."""
        peers = self.registry.pool(inst.role).instances.values()
        targets = [MigrationTarget(other.id, other.address) for other in peers if other.id != inst.id]
        if frontend is None or targets:  # NOTE: a stopping instance leaves service with or without peers
            self.drained[inst.id] = inst.incarnation
            self.registry.set_role(inst.id, inst.role, STOPPING)
        if not targets:
            return f"no other {inst.role} instance to move the requests of {inst.id} to"
        log.info("draining instance %s: its requests move to %s", inst.id, ", ".join(t.instance_id for t in targets))
        own = next(self._ids)
        if frontend is not None:
            gid = next(self._ids)
            gather = self.gathers[gid] = Gather(frontend, call_id, "drain", time.monotonic() + CALL_TIMEOUT_S)
            self.asked[own] = (gid, inst.id)
            gather.replies[inst.id] = None
        await self._to_instance(inst.id, ControlCall(own, "migrate", {"targets": msgspec.to_builtins(targets)},
                                                     reply_to=self.reports_address))
        return ""

    async def _finish_if_complete(self, gid: int, force: bool = False) -> None:
        gather = self.gathers.get(gid)
        if gather is None or not (force or all(r is not None for r in gather.replies.values())):
            return
        del self.gathers[gid]
        self.asked = {k: v for k, v in self.asked.items() if v[0] != gid} if force else self.asked
        reply = merge(gather.call_id, gather.method, gather.replies)
        if gather.method == "stats" and reply.ok:
            reply.result["router"] = {**self.stats, "num_instances": len(self.registry),
                                      "prefix_index_blocks": len(self.index), **self.roles.snapshot()}
        await self.frontends.send_to(gather.frontend, reply)

    async def _expire_gathers(self) -> None:
        now = time.monotonic()
        for gid in [g for g, gather in self.gathers.items() if gather.deadline <= now]:
            await self._finish_if_complete(gid, force=True)

    # -- from instances -------------------------------------------------------------------------
    async def _on_report(self, msg) -> None:
        match msg:
            case InstanceLoad():
                if self.registry.get(msg.instance_id) is None:
                    rec = self.records.get(msg.instance_id)
                    if rec is None or rec.incarnation != msg.incarnation:
                        return  # not registered (or an old incarnation): not ours to route to
                    self._admit(rec)  # it was silent, and is back
                inst = self.registry.report(msg)
                if inst is not None and inst.incarnation != msg.incarnation:
                    if inst.incarnation:
                        log.info("instance %s restarted (incarnation %s)", inst.id, msg.incarnation)
                    inst.incarnation = msg.incarnation
                    self.index.clear(inst.id)
                for rid in msg.finished_req_ids:
                    if self.placed.get(rid, ("",))[0] == msg.instance_id:  # not its prefill side
                        del self.placed[rid]
                        self.prefill_of.pop(rid, None)
                for rid, target in msg.moved.items():  # migration: aborts go where it went
                    where = self.placed.get(rid)
                    if where is not None and where[0] == msg.instance_id:
                        self.placed[rid] = (target, where[1])
                        self.prefill_of.pop(rid, None)
            case KVEventBatch():
                inst = self.registry.get(msg.instance_id)
                if inst is None or (inst.incarnation and inst.incarnation != msg.incarnation):
                    return  # from an incarnation the router no longer counts
                if msg.cleared:
                    self.index.clear(msg.instance_id)
                self._index_events(msg)
            case RoleChanged():
                self.roles.changed(msg, time.monotonic())
            case InstanceLeaving():  # it stops soon: as a drain (its requests finish there without peers)
                inst = self.registry.get(msg.instance_id)
                if inst is not None and inst.incarnation in ("", msg.incarnation) \
                        and self.drained.get(msg.instance_id) != msg.incarnation:
                    why = await self._start_drain(inst)
                    log.info("instance %s is stopping%s", msg.instance_id, f" ({why})" if why else "")
            case ControlReply():
                gid, iid = self.asked.pop(msg.call_id, (None, None))
                if gid is not None and gid in self.gathers:
                    self.gathers[gid].replies[iid] = msg
                    await self._finish_if_complete(gid)

    def _index_events(self, msg: KVEventBatch) -> None:
        """Fold an instance's KV events into the prefix index, tier by tier; a tier
        weighed like recomputing (weight 1: the device-only view) is not kept at all."""
        for block in msg.stored:
            if 0 <= block.tier < len(self.weights) and self.weights[block.tier] < 1.0:
                self.index.stored(msg.instance_id, (block.block_hash,), block.tier)
        for block in msg.removed:
            if 0 <= block.tier < len(self.weights):
                self.index.removed(msg.instance_id, (block.block_hash,), block.tier)
