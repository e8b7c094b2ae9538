"""The worker actor: one per device (rank). Runs each ``StepPlan`` it is sent.

Rank 0 answers every plan with a ``StepResult``; other ranks run the same plan for
their collectives and stay silent. A failure inside a step is reported (``WorkerError``
to the scheduler, ``ActorFailed`` to the launcher) and ends the process: a worker whose
KV state may be half-updated must not keep serving.

Before it reports ready, every rank measures the instance's service times on the model
(``profiler``: the same plans on every rank, so collectives meet) unless a cached profile
for the same checkpoint, dtype, threads and limits exists; rank 0 gives it to the
scheduler on the ``profile`` control call.
"""

from __future__ import annotations

import logging

import msgspec
import zmq

from ..bus.actor import Actor
from ..bus.codec import DecodeError
from ..config import read_hf_config
from ..deploy.plan import ActorSpec, DeploymentPlan
from ..layers.parallel import SINGLE, ProcessGroupComm, TPGroup
from ..perf_model import ServiceModel
from ..protocol import ControlCall, ControlReply, StepPlan, WorkerError, WorkerInput
from .graph_runner import default_buckets
from .model_runner import ModelRunner
from .profiler import Profiler, cache_key, load_or_measure
from .speculative import StepCost

log = logging.getLogger(__name__)


class WorkerActor(Actor):
    """Holds the weights and KV cache of one rank and executes step plans."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan
        self.spec = spec
        self.instance = plan.instance(spec.instance)
        self.cfg = plan.engine
        self.rank = spec.rank
        self.runner: ModelRunner | None = None
        self.profile = None  # InstanceProfile, once measured (or read from the cache)

    async def setup(self) -> dict:
        import torch

        par = self.cfg.parallel
        threads = self.spec.threads
        torch.set_num_threads(threads)
        tp = self._init_tp()
        inst = self.instance.id
        self.plans = self.channel(zmq.PULL, self.plan.plan(inst, self.rank), bind=False, union=WorkerInput)
        # every rank answers heartbeats; only rank 0 sends step results
        self.results = self.channel(zmq.PUSH, self.plan.results(inst), bind=False)
        hf = read_hf_config(self.cfg.model.path)
        # NOTE: graphs are single-rank for now: collectives stay eager (tp > 1 runs eagerly)
        eager = self.cfg.model.enforce_eager or self.instance.tp_size > 1
        rows = self.cfg.scheduler.max_num_seqs
        spec = self.cfg.speculative
        if spec.method:  # verification steps run as decode rows: every draft is a row
            rows = max(rows, min(rows, spec.max_batch) * (spec.num_tokens + 1))
        buckets = None if eager else default_buckets(rows)
        # NOTE: built and compiled on this (the main) thread, the one that runs the steps:
        # thread counts and packed-weight choices are per thread, and a compiled graph keeps
        # the thread count it was compiled with.
        # an instance with a KV agent (PD, KV tiers) keeps its pool where the agent can reach it
        shared = self.plan.kv_pool(inst, self.rank) if self.plan.has_kv_agent(inst) else ""
        self.runner = ModelRunner(self.cfg.model, self.cfg.cache, hf, tp, par.micro_batch_overlap, buckets,
                                  shared_kv=shared, speculative=self.cfg.speculative)
        if self.runner.graphs is not None:
            self.runner.graphs.warm_up(progress=self.rank == 0)
        if self.cfg.model.profile:
            cfg = self.cfg
            key = cache_key(cfg.model, cfg.scheduler, cfg.cache, threads, self.instance.tp_size, not eager)
            profiler = Profiler(self.runner, cfg.scheduler, cfg.cache, cfg.model.max_model_len,
                                decide=lambda flag: _rank0s(tp, flag))
            self.profile = load_or_measure(profiler, key, write=self.rank == 0,
                                           agree=lambda cached: _everyone(tp, cached))
            if self.runner.speculator is not None:  # drafts are weighed against this step-time law
                self.runner.speculator.set_cost(StepCost(ServiceModel(self.profile), self.runner.graphs))
        return {"rank": self.rank, "threads": threads}

    def _init_tp(self) -> TPGroup:
        size = self.instance.tp_size
        if size == 1:
            return SINGLE
        import torch.distributed as dist

        from ..platform import current
        from ..platform.shm_comm import ShmCommunicator

        dist.init_process_group(current().dist_backend, init_method=self.plan.dist_init(self.instance.id),
                                rank=self.rank, world_size=size)
        comm = ProcessGroupComm(dist.group.WORLD)
        if current().name == "cpu" and self.cfg.parallel.shm_collectives and ShmCommunicator.available():
            hf = read_hf_config(self.cfg.model.path)
            sched = self.cfg.scheduler
            hidden = sched.max_num_batched_tokens * hf["hidden_size"]  # a step's hidden states
            logits = sched.max_num_seqs * -(-hf["vocab_size"] // size)  # its sampled rows' logits
            comm = ShmCommunicator(self.plan.shm_key(self.instance.id), self.rank, size, max(hidden, logits) * 4,
                                   dist.barrier, fallback=comm)
        log.info("rank %d of %d: collectives through %s", self.rank, size,
                 "shared memory" if isinstance(comm, ShmCommunicator) else current().dist_backend)
        return TPGroup(self.rank, size, comm)

    async def run(self) -> None:
        while True:
            try:
                msg = await self.plans.recv()
            except DecodeError as exc:
                log.error("rejected a malformed message: %s", exc)
                continue
            match msg:
                case StepPlan():
                    await self._step(msg)
                case ControlCall():
                    await self._control(msg)

    async def _step(self, plan: StepPlan) -> None:
        try:
            result = self.runner.execute(plan)
        except Exception as exc:
            if self.rank == 0:
                await self.results.send(WorkerError(plan.step_id, f"{type(exc).__name__}: {exc}"))
            raise
        if self.rank == 0:
            await self.results.send(result)

    async def _control(self, call: ControlCall) -> None:
        if call.method == "ping":  # the scheduler's heartbeat: this rank can take a step
            await self.results.send(ControlReply(call.call_id, True, {"rank": self.rank}))
        elif self.rank == 0:
            if call.method == "stats":
                reply = ControlReply(call.call_id, True,
                                     {"rank": self.rank, "num_requests": len(self.runner.requests)})
            elif call.method == "profile":
                profile = msgspec.to_builtins(self.profile) if self.profile is not None else None
                reply = ControlReply(call.call_id, True, {"profile": profile})
            else:
                reply = ControlReply(call.call_id, False, error=f"unknown method {call.method!r}")
            await self.results.send(reply)


def _rank0s(tp: TPGroup, flag: bool) -> bool:
    """Rank 0's ``flag``, on every rank."""
    import torch

    return bool(tp.broadcast(torch.tensor([1.0 if flag else 0.0]))[0])


def _everyone(tp: TPGroup, flag: bool) -> bool:
    """True if ``flag`` holds on every rank of the instance."""
    import torch

    return int(tp.all_reduce(torch.tensor([1.0 if flag else 0.0]))[0]) == tp.size
