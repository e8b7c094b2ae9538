"""The scheduler actor: one per instance. Plans steps, fans them out, folds results in.

With async scheduling it keeps two steps in flight: while the workers run step N it
has already sent step N+1 (with placeholders for the tokens step N samples), so the
CPU work of planning hides behind the model's compute. Without it, one step at a time.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from ..bus.actor import Actor
from ..bus.codec import DecodeError
from ..config import EngineConfig
from ..protocol import (
    AbortRequest, ControlCall, ControlReply, RequestRejected, SchedulerInput, StepResult,
    TokenizedRequest, WorkerError, WorkerOutput,
)
from .health import PING_INTERVAL_S, WorkerWatch
from .scheduler import Scheduler, StepOutputs

log = logging.getLogger(__name__)


class SchedulerActor(Actor):
    """Owns the request queues and the KV block bookkeeping of one instance."""

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__("scheduler", cfg.addresses.launcher, cfg.addresses.run_dir)
        self.cfg = cfg
        self.core = Scheduler(cfg.scheduler, cfg.cache, cfg.model.max_model_len)
        self.depth = 2 if cfg.scheduler.async_scheduling else 1
        self.in_flight = 0
        self.watch = WorkerWatch(cfg.parallel.tp_size, cfg.scheduler.worker_stall_timeout_s)

    async def setup(self) -> dict:
        a = self.cfg.addresses
        self.inputs = self.channel(zmq.PULL, a.scheduler_in, bind=True, union=SchedulerInput)
        self.to_frontend = self.channel(zmq.PUSH, a.frontend_in, bind=False)
        self.results = self.channel(zmq.PULL, a.results, bind=True, union=WorkerOutput)
        self.plans = [self.channel(zmq.PUSH, a.plan(r), bind=True) for r in range(self.cfg.parallel.tp_size)]
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.inputs.sock, zmq.POLLIN)
        self.poller.register(self.results.sock, zmq.POLLIN)
        return {"num_blocks": self.cfg.cache.num_blocks}

    async def run(self) -> None:
        while True:
            while self.results.poll_now():
                await self._on_result(await self._recv(self.results))
            while self.inputs.poll_now():
                await self._on_input(await self._recv(self.inputs))
            if self.in_flight < self.depth and self.core.has_work():
                plan = self.core.schedule()
                if plan is not None:
                    for ch in self.plans:
                        await ch.send(plan)
                    self.in_flight += 1
                    self.watch.step_sent()
                    continue
            if self.watch.ping_due():
                for ch in self.plans:
                    await ch.send(ControlCall(0, "ping"))
            await self.poller.poll(None if self.in_flight else int(PING_INTERVAL_S * 1000))

    async def _recv(self, ch):
        try:
            return await ch.recv()
        except DecodeError as exc:
            log.error("rejected a malformed message: %s", exc)
            return None

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
            case ControlReply():
                pass

    async def _on_input(self, msg) -> None:
        match msg:
            case TokenizedRequest():
                try:
                    self.core.add_request(msg)
                except ValueError as exc:
                    await self.to_frontend.send(RequestRejected(msg.req_id, str(exc)))
                except OverflowError as exc:
                    await self.to_frontend.send(RequestRejected(msg.req_id, str(exc), "overloaded"))
            case AbortRequest():
                req = self.core.abort(msg.req_id)
                if req is not None:
                    out = StepOutputs()
                    out.add(req, [], "abort")
                    await self._emit(-1, out)
            case ControlCall():
                await self.to_frontend.send(self._control(msg))

    async def _emit(self, step_id: int, out: StepOutputs) -> None:
        if out.rows:
            await self.to_frontend.send(out.to_batch(step_id))

    def _control(self, call: ControlCall) -> ControlReply:
        core = self.core
        match call.method:
            case "stats":
                return ControlReply(call.call_id, True, core.snapshot())
            case "health":
                problem = self.watch.problem()
                if problem is not None:
                    return ControlReply(call.call_id, False, error=f"unavailable: {problem}")
                return ControlReply(call.call_id, True, {"in_flight": self.in_flight})
            case "reset_prefix_cache":
                return ControlReply(call.call_id, True, core.blocks.reset_prefix_cache())
            case "check_integrity":
                return ControlReply(call.call_id, True, core.blocks.check_integrity())
            case "kv_events":
                ev = core.blocks.drain_events()
                return ControlReply(call.call_id, True,
                                    {"stored": ev.stored, "removed": ev.removed, "cleared": ev.cleared})
        return ControlReply(call.call_id, False, error=f"unknown method {call.method!r}")
