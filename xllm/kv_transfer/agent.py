"""The KV agent actor: one per prefill or decode instance. Moves requests' KV blocks
between instances, reading and writing the workers' pools in shared memory
(``pool.SharedKVPool``), never through the worker.

Prefill side: its scheduler sends a ``KVSendPlan`` with every step that computes KV for
a disaggregated request (which blocks, where they go). The agent watches the workers'
layer progress and pushes each layer's blocks (``KVLayer``, one per rank and layer) as
soon as that layer is stored, so the transfer runs beside the rest of the forward pass.
When the scheduler reports the prefill complete (``KVSendDone``, with the first token)
and every block is out, it sends ``KVComplete``; the decode agent's ``KVAck`` ends the
transfer, and only then does the scheduler get the blocks back (``KVReleased``).

Decode side: its scheduler names the blocks a request's KV may go to (``KVExpect``). The
agent writes arriving layers there (refusing any other block), and on ``KVComplete``
with every message received tells its scheduler the request can decode
(``KVReceived``) and acknowledges.

Either scheduler may cancel (``KVCancel``: a client abort, a timeout, a lost peer); the
agent stops touching the request's blocks at once and answers with the release. It
keeps no clock of its own: a scheduler decides when to give up, the agent obeys in
order, so no block is written after its scheduler may have reused it.

KV tiers (any role, with ``--kv-host-memory``): the agent owns the instance's host tier
(memory) and disk tier (files), and runs its scheduler's ``KVTierOrder``s strictly in
order (``tier_mover``), answering each with ``KVTierDone``. At start it tells its
scheduler what the disk tier holds from an earlier run (``KVTierInventory``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from ..bus.actor import Actor
from ..bus.channel import Channel
from ..bus.codec import DecodeError
from ..deploy.plan import ActorSpec, DeploymentPlan
from ..protocol import (
    BlockStored, KVAck, KVAgentInput, KVCancel, KVComplete, KVExpect, KVLayer, KVReceived, KVReleased, KVSend,
    KVSendDone, KVSendPlan, KVTierInventory, KVTierOrder, KV_TIERS,
)
from .disk_tier import DiskTier
from .host_tier import HostTier
from .pool import SharedKVPool
from .tier_mover import TierMover

log = logging.getLogger(__name__)

ATTACH_TIMEOUT_S = 600.0  # the workers create the pools while they load (a bound, not a wait)
POLL_MS = 1  # how often layer progress is looked at while a send is pending
FLUSH_S = 2.0  # a clean stop writes host blocks to the disk tier for at most this long


@dataclass
class Outgoing:
    """One request this agent is sending."""

    dst_agent: str
    started: float
    num_messages: int = 0
    num_bytes: int = 0
    done: KVSendDone | None = None  # the prefill is complete
    completed: bool = False  # KVComplete is out; waiting for the ack
    stored_at: float = 0.0  # time.time() its latest step was seen stored in full


@dataclass
class Incoming:
    """One request this agent receives."""

    blocks: set[int]
    started: float
    num_messages: int = 0
    num_bytes: int = 0
    error: str = ""
    last_write: float = 0.0  # time.time() of its last KV written


@dataclass
class PendingStep:
    step_id: int
    sends: list[KVSend]
    next_layer: int = 0


class KVAgentActor(Actor):
    """Pushes and receives the KV of disaggregated requests for one instance."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan
        self.instance = plan.instance(spec.instance)
        self.pools: list[SharedKVPool] = []
        self.steps: deque[PendingStep] = deque()
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.peers: dict[str, Channel] = {}  # other agents' inputs, prefill schedulers' inputs
        self.layerwise = plan.engine.scheduler.kv_layerwise
        self.tiers: TierMover | None = None  # with KV tiers
        self.inventory: list[tuple[int, int, tuple[int, ...]]] = []  # the disk tier's blocks at start

    async def setup(self) -> dict:
        plan, inst = self.plan, self.instance.id
        self.inbox = self.channel(zmq.PULL, plan.kv_agent_in(inst), bind=True, union=KVAgentInput)
        self.to_scheduler = self.channel(zmq.PUSH, plan.scheduler_in(inst), bind=False)
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        for rank in range(self.instance.tp_size):
            path = Path(plan.kv_pool(inst, rank))
            while True:
                try:
                    self.pools.append(SharedKVPool.attach(path))
                    break
                except (FileNotFoundError, ValueError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no KV pool at {path} after {ATTACH_TIMEOUT_S:.0f} s") from None
                    await asyncio.sleep(0.05)
        pool = self.pools[0]
        if self.plan.engine.cache.tiers:
            self._open_tiers()
        return {"layers": pool.num_layers, "blocks": pool.num_blocks, "block_bytes": pool.block_bytes,
                "disk_blocks_found": len(self.inventory)}

    def _open_tiers(self) -> None:
        """The host tier's memory, the disk tier's directory (this instance's own), and what
        that directory holds from an earlier run."""
        engine, pool = self.plan.engine, self.pools[0]
        cache = engine.cache
        disk = None
        if cache.disk_dir:
            layout = {"format": 1, "model": engine.model.path, "dtype": engine.model.dtype,
                      "block_size": cache.block_size, "ranks": len(self.pools), "layers": pool.num_layers,
                      "block_bytes": pool.block_bytes}
            disk = DiskTier(Path(cache.disk_dir) / self.instance.id, layout)
            self.inventory = disk.scan()
        self.tiers = TierMover(self.pools, HostTier(cache.host_blocks, self.pools), disk, cache.block_size)

    async def teardown(self) -> None:
        if self.tiers is not None:
            n = self.tiers.flush(FLUSH_S)
            if n:
                log.info("the disk tier keeps %d blocks of the host tier", n)

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.inbox.sock, zmq.POLLIN)
        if self.inventory:
            disk = KV_TIERS.index("disk")
            await self.to_scheduler.send(KVTierInventory([BlockStored(h, p, list(t), disk)
                                                          for h, p, t in self.inventory]))
        while True:
            while self.inbox.poll_now():
                try:
                    msg = await self.inbox.recv()
                except DecodeError as exc:
                    log.error("rejected a malformed message: %s", exc)
                    continue
                await self._on_message(msg)
            await self._push_ready_layers()
            await self._complete_finished()
            look = None  # seconds until progress is worth looking at again; None: a message wakes us
            if self.tiers is not None:
                for done in self.tiers.advance():
                    await self.to_scheduler.send(done)
                look = self.tiers.next_look()
            if self.steps:
                look = min(look or POLL_MS / 1000, POLL_MS / 1000)
            if look is not None and look < 1e-3:
                time.sleep(look)  # NOTE: finer than the event loop's millisecond timers
                await asyncio.sleep(0)
                continue
            await poller.poll(None if look is None else round(look * 1000))

    # -- messages ---------------------------------------------------------------------------
    async def _on_message(self, msg) -> None:
        match msg:
            case KVSendPlan():
                for s in msg.sends:
                    if s.req_id not in self.outgoing:
                        self.outgoing[s.req_id] = Outgoing(s.dst_agent, time.perf_counter())
                self.steps.append(PendingStep(msg.step_id, list(msg.sends)))
            case KVSendDone():
                out = self.outgoing.get(msg.req_id)
                if out is None:  # nothing to send (an empty prompt cannot happen; be safe)
                    await self.to_scheduler.send(KVReleased(msg.req_id, False, "no transfer for it"))
                else:
                    out.done = msg
            case KVExpect():
                prefill = self._peer(msg.prefill_address)
                if prefill is None:
                    await self.to_scheduler.send(KVReceived(msg.req_id, False, error="cannot reach the prefill instance"))
                    return
                self.incoming[msg.req_id] = Incoming(set(msg.block_ids), time.perf_counter())
                await prefill.send(msg.prefill)
            case KVCancel():
                await self._cancel(msg.req_id)
            case KVLayer():
                self._on_layer(msg)
            case KVComplete():
                await self._on_complete(msg)
            case KVTierOrder():
                if self.tiers is None:
                    log.error("refused tier order %d: this instance has no KV tiers", msg.job_id)
                else:
                    self.tiers.accept(msg)  # a refusal is logged; nothing of it runs
            case KVAck():
                out = self.outgoing.pop(msg.req_id, None)
                if out is not None:
                    await self.to_scheduler.send(KVReleased(msg.req_id, msg.ok, msg.error, out.num_bytes,
                                                            time.perf_counter() - out.started))

    async def _cancel(self, req_id: str) -> None:
        """Stop moving ``req_id``'s KV and give its blocks back to the scheduler."""
        if self.outgoing.pop(req_id, None) is not None:
            for step in self.steps:
                step.sends = [s for s in step.sends if s.req_id != req_id]
            await self.to_scheduler.send(KVReleased(req_id, False, "cancelled"))
        if self.incoming.pop(req_id, None) is not None:
            await self.to_scheduler.send(KVReceived(req_id, False, error="cancelled"))

    # -- sending ------------------------------------------------------------------------------
    async def _push_ready_layers(self) -> None:
        """Send every layer the workers have stored of the oldest pending steps."""
        while self.steps:
            step = self.steps[0]
            num_layers = self.pools[0].num_layers
            while step.next_layer < num_layers:
                # layer-wise: as soon as the layer is stored; else once the whole step is
                wait_for = step.next_layer if self.layerwise else num_layers - 1
                if not all(p.written(step.step_id, wait_for) for p in self.pools):
                    break
                if step.next_layer == (num_layers - 1 if self.layerwise else 0):
                    self._mark_stored(step)  # the step's last layer is stored
                for send in step.sends:
                    await self._send_layer(send, step.next_layer)
                step.next_layer += 1
            if step.next_layer < num_layers:
                return  # the workers are still on this step
            self.steps.popleft()

    def _mark_stored(self, step: PendingStep) -> None:
        """Note when the step's KV was stored in full: the latest step of a request is the
        end of its prefill, from which the decode side measures what was left to move."""
        now = time.time()
        for send in step.sends:
            out = self.outgoing.get(send.req_id)
            if out is not None:
                out.stored_at = now

    async def _send_layer(self, send: KVSend, layer: int) -> None:
        out = self.outgoing.get(send.req_id)
        if out is None:
            return
        peer = self._peer(send.dst_agent)
        if peer is None:
            return  # no KVComplete will match: the decode side times out and recomputes
        for rank, pool in enumerate(self.pools):
            k, v = pool.read(layer, send.src_blocks)
            await peer.send(KVLayer(send.req_id, rank, layer, send.dst_blocks, k, v))
            out.num_messages += 1
            out.num_bytes += k.nbytes + v.nbytes

    async def _complete_finished(self) -> None:
        """Send ``KVComplete`` for each finished prefill whose blocks are all out."""
        pending = {s.req_id for step in self.steps for s in step.sends}
        for req_id, out in self.outgoing.items():
            if out.done is None or out.completed or req_id in pending:
                continue
            out.completed = True
            d = out.done
            peer = self._peer(out.dst_agent)
            if peer is None:
                continue
            await peer.send(KVComplete(
                req_id, out.num_messages, d.first_token, self.plan.kv_agent_in(self.instance.id),
                d.first_logprobs, d.num_cached_tokens, out.stored_at))

    def _peer(self, address: str) -> Channel | None:
        """The PUSH socket to another agent or a prefill scheduler; None (logged) for an
        address ZeroMQ cannot connect to."""
        ch = self.peers.get(address)
        if ch is None:
            try:
                ch = self.peers[address] = self.channel(zmq.PUSH, address, bind=False)
            except (zmq.ZMQError, ValueError) as exc:
                log.error("cannot reach %r: %s", address[:200], exc)
                return None
        return ch

    # -- receiving ----------------------------------------------------------------------------
    def _on_layer(self, msg: KVLayer) -> None:
        inc = self.incoming.get(msg.req_id)
        if inc is None or inc.error:
            return  # cancelled, never expected, or already failed: dropped
        problem = self._check_layer(msg, inc)
        if problem:
            log.error("refused KV for %s: %s", msg.req_id, problem)
            inc.error = problem
            return
        self.pools[msg.rank].write(msg.layer, msg.dst_blocks, msg.k, msg.v)
        inc.last_write = time.time()
        inc.num_messages += 1
        inc.num_bytes += msg.k.nbytes + msg.v.nbytes

    def _check_layer(self, msg: KVLayer, inc: Incoming) -> str:
        if not 0 <= msg.rank < len(self.pools):
            return f"rank {msg.rank} (this instance has {len(self.pools)})"
        pool = self.pools[msg.rank]
        if not 0 <= msg.layer < pool.num_layers:
            return f"layer {msg.layer} (the model has {pool.num_layers})"
        if not set(msg.dst_blocks) <= inc.blocks:
            return "blocks that are not the request's"
        shape = (len(msg.dst_blocks), pool.block_bytes)
        if msg.k.shape != shape or msg.v.shape != shape or msg.k.dtype.itemsize != 1 or msg.v.dtype.itemsize != 1:
            return f"arrays of shape {msg.k.shape}/{msg.v.shape}, not {shape} bytes"
        return ""

    async def _on_complete(self, msg: KVComplete) -> None:
        inc = self.incoming.get(msg.req_id)
        ack = self._peer(msg.reply_to)
        if ack is None:
            return  # from nowhere anyone can be answered: not a prefill agent's
        self.incoming.pop(msg.req_id, None)
        if inc is None:
            await ack.send(KVAck(msg.req_id, False, "the decode side no longer expects it"))
            return
        error = inc.error or ("" if inc.num_messages == msg.num_messages else
                              f"{inc.num_messages} of {msg.num_messages} KV messages arrived")
        exposed = max(0.0, inc.last_write - msg.stored_at) if msg.stored_at and inc.last_write else 0.0
        await self.to_scheduler.send(KVReceived(msg.req_id, not error, msg.first_token, msg.first_logprobs,
                                                msg.num_cached_tokens, error,
                                                inc.num_bytes, time.perf_counter() - inc.started, exposed))
        await ack.send(KVAck(msg.req_id, not error, error))
