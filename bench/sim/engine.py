"""The simulator's engine: a discrete-event run of simulated instances behind the router's
own code.

What is the real thing, imported: the registry and its role pools (``xllm.router.registry``:
``Registries``, ``placement``), the prefix index fed by the instances' cache events, every
policy (``make_policy``; ``slo_aware``'s pair choice), load reports as ``InstanceLoad``
every half second (and when an instance runs dry), and the adaptive PD controller
(``RoleController``) looked at once an interval with the same registry. What is modelled:
the instances (``instance.SimInstance``: the scheduler's rule on a measured profile's
clock) and the transfer of a prompt's KV from a prefill to a decode instance (its bytes
over the agents' bandwidth, of which a share is hidden behind the prefill, plus the
messages' hops).

Events sit in one heap (time, sequence, kind, object, version); an instance's wake-up
carries the version of its plan, so a re-planned instance's older wake-ups are skipped.
Each event costs O(log n) in the heap plus the instance's own work, and a routing
decision costs what the policy costs (timed: the router's CPU per decision).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from xllm.config import AdaptivePDConfig, SloConfig
from xllm.perf_model import ServiceModel
from xllm.protocol import InstanceLoad, InstanceProfile, SamplingParams, TokenizedRequest
from xllm.router.adaptive import RoleController
from xllm.router.policies import make_policy
from xllm.router.prefix_index import PrefixIndex
from xllm.router.registry import InstanceState, Registries, placement
from xllm.router.slo import SloAware, SloRefused

from .instance import Job, SimInstance
from .traces import SimRequest

WAKE, XFER, REPORT, CONTROL, DRAIN = range(5)


@dataclass(frozen=True)
class SimConfig:
    """A simulated deployment."""

    roles: tuple[str, ...]  # one per instance: "mixed", "prefill" or "decode"
    policy: str = "prefix_cache_aware"
    slo: SloConfig = SloConfig(ttft_s=2.0, tpot_s=0.1)
    adaptive: AdaptivePDConfig = AdaptivePDConfig()
    num_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 64
    budget: int = 2048  # --max-num-batched-tokens
    pd_short_prompt: int = 0
    kv_bytes_per_token: int = 2 * 12 * 4 * 64 * 4  # llama-110m in float32: K and V, 12 layers, 4 KV heads of 64
    transfer_bytes_s: float = 0.96e9  # the KV agents' measured rate over ipc (bench.kv_transfer)
    transfer_hidden: float = 0.85  # the share of a transfer that runs beside the prefill (bench.kv_transfer)
    hop_s: float = 0.002  # the PD hand-off's messages (decode scheduler -> agents -> prefill scheduler, back)
    report_s: float = 0.5  # load reports
    cores: float = 0  # CPU cores the instances share (0: each has its own device, none waits for another)


@dataclass
class SimResult:
    """What a run gives back."""

    jobs: list[Job]
    refused: int
    busy_s: dict[str, float]
    decision_us: list[float]
    hit_tokens: int
    prompt_tokens: int
    role_changes: list[tuple[float, str, str]] = field(default_factory=list)  # (time, instance, new role)
    end: float = 0.0
    wall_s: float = 0.0
    events: int = 0


class Simulation:
    """Runs a trace through simulated instances and the router's real code."""

    def __init__(self, cfg: SimConfig, profiles: list[InstanceProfile]) -> None:
        self.cfg = cfg
        self.registry = Registries()
        self.index = PrefixIndex()
        self.policies = {role: make_policy(cfg.policy, self.index, cfg.slo) for role in ("mixed", "prefill", "decode")}
        self.instances: dict[str, SimInstance] = {}
        for k, role in enumerate(cfg.roles):
            model = ServiceModel(profiles[k % len(profiles)])
            iid = f"i{k}"
            self.instances[iid] = SimInstance(self, iid, role, model, cfg.num_blocks, cfg.block_size,
                                              cfg.max_num_seqs, cfg.budget)
            state = InstanceState(iid, f"sim://{iid}", "sim", role, "", cfg.num_blocks, cfg.block_size,
                                  cfg.max_num_seqs)
            state.model = model
            self.registry.add(state)
        self.controller = RoleController(cfg.slo, cfg.adaptive, 0.0) if cfg.adaptive.enabled else None
        self.heap: list = []
        self.seq = 0
        self.zeros: dict[int, list[int]] = {}
        self.busy = 0  # instances working now (for ``cores``)
        self.result = SimResult([], 0, {}, [], 0, 0)

    # -- running ----------------------------------------------------------------------------------
    def run(self, requests: list[SimRequest], limit_s: float = 3600.0) -> SimResult:
        wall = time.perf_counter()
        for k, inst in enumerate(self.instances.values()):  # reports staggered over the period
            self._push(self.cfg.report_s * k / len(self.instances), REPORT, inst)
        if self.controller is not None:
            self._push(self.cfg.adaptive.interval_s, CONTROL, None)
        end = (requests[-1].arrival if requests else 0.0) + limit_s
        pending = len(requests)
        i, events = 0, 0
        while pending > 0:
            next_arrival = requests[i].arrival if i < len(requests) else end
            if self.heap and self.heap[0][0] <= next_arrival:
                t, _, kind, obj, version = heapq.heappop(self.heap)
                if t > end:
                    break
                events += 1
                pending -= self._event(t, kind, obj, version)
            elif i < len(requests):
                events += 1
                pending -= self._arrive(requests[i], i)
                i += 1
            else:
                break
        r = self.result
        r.end = max((j.finish_at for j in r.jobs), default=0.0)
        r.busy_s = {iid: inst.busy_s for iid, inst in self.instances.items()}
        r.wall_s, r.events = time.perf_counter() - wall, events
        return r

    def _push(self, t: float, kind: int, obj, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj, version))

    def _event(self, t: float, kind: int, obj, version: int) -> int:
        """Handle one event; how many requests it finished."""
        before = len(self.result.jobs)
        if kind == WAKE:
            if version == obj.version:
                obj.wake(t)
        elif kind == XFER:
            obj.prefill_at.sent(obj, t)
            obj.decode_to.received(obj, t)
        elif kind == REPORT:
            self._report(obj)
            self._push(t + self.cfg.report_s, REPORT, obj)
        elif kind == CONTROL:
            self._control(t)
            self._push(t + self.cfg.adaptive.interval_s, CONTROL, None)
        elif kind == DRAIN:
            self.maybe_switch(obj, t)
        return len(self.result.jobs) - before

    # -- the router ---------------------------------------------------------------------------------
    def _arrive(self, req: SimRequest, n: int) -> int:
        """Place one request with the router's code; 1 if it was refused (it is over)."""
        cfg = self.cfg
        hashes = req.block_hashes(cfg.block_size)
        zeros = self.zeros.get(req.prompt)
        if zeros is None:
            zeros = self.zeros[req.prompt] = [0] * req.prompt
        msg = TokenizedRequest(f"r{n}", zeros, SamplingParams(max_tokens=req.output), [], req.arrival,
                               block_hashes=hashes, block_size=cfg.block_size)
        t0 = time.perf_counter_ns()
        try:
            pre, dec = self._choose(msg, len(hashes))
        except SloRefused:
            self.result.refused += 1
            return 1
        self.result.decision_us.append((time.perf_counter_ns() - t0) / 1000)
        if pre is None:
            self.result.refused += 1
            return 1
        job = Job(req, hashes, n)
        if self.controller is not None:
            hit = self.index.deepest(pre.id, hashes) * cfg.block_size
            self.controller.observe(req.arrival, req.prompt, min(hit, req.prompt - 1), req.output)
        job.prefill_at = self.instances[pre.id]
        if dec is None:
            job.prefill_at.prefill(job, req.arrival)
            return 0
        job.decode_to = self.instances[dec.id]
        if job.decode_to.expect(job, req.arrival):
            self.start_prefill(job, req.arrival)
        return 0

    def _choose(self, msg: TokenizedRequest, blocks: int):
        """(the instance that prefills, the one that decodes or None), as ``RouterActor._place``
        chooses them, with the same bookkeeping (``routed``)."""
        role = placement(self.registry, len(msg.prompt_token_ids), self.cfg.pd_short_prompt)
        if role != "pair":
            inst = self.policies[role].choose(msg, self.registry.pool(role))
            if inst is not None:
                self.registry.routed(inst, blocks - self.index.deepest(inst.id, msg.block_hashes))
            return inst, None
        policy = self.policies["decode"]
        if isinstance(policy, SloAware):
            pre, dec = policy.choose_pair(msg, self.registry.pool("prefill"), self.registry.pool("decode"))
        else:
            pre = self.policies["prefill"].choose(msg, self.registry.pool("prefill"))
            dec = policy.choose(msg, self.registry.pool("decode"))
        self.registry.routed(pre, blocks - self.index.deepest(pre.id, msg.block_hashes))
        self.registry.routed(dec, 0)
        return pre, dec

    def _report(self, inst: SimInstance) -> None:
        waiting, running, free, waiting_blocks, left = inst.load()
        self.registry.report(InstanceLoad(inst.id, "sim", waiting, running, free, inst.num_blocks, inst.ttft_mean,
                                          inst.tpot_mean, num_waiting_blocks=waiting_blocks,
                                          mean_output_tokens=inst.output_mean, num_prefill_tokens=left))

    def _control(self, t: float) -> None:
        ctl = self.controller
        for iid in ctl.expired(t):
            ctl.finished(t, iid)
        for flip in ctl.step(self.registry, t):
            inst = self.instances[flip.instance_id]
            self.registry.set_role(inst.id, inst.role, flip.role)
            inst.next_role, inst.drain_deadline = flip.role, t + self.cfg.adaptive.drain_timeout_s
            self._push(inst.drain_deadline, DRAIN, inst)
            self.maybe_switch(inst, t)

    # -- what instances tell the engine -------------------------------------------------------------
    def busy_changed(self, inst: SimInstance, t: float) -> None:
        """``inst`` started or stopped working: with shared cores, everyone's pace changes."""
        self.busy += 1 if inst.busy else -1
        if self.cfg.cores:
            slow = max(1.0, self.busy / self.cfg.cores)
            for other in self.instances.values():
                other.set_slow(slow, t)

    def wake_at(self, inst: SimInstance, t: float) -> None:
        self._push(t, WAKE, inst, inst.version)

    def start_prefill(self, job: Job, t: float) -> None:
        """PD: the decode side has room for ``job``: its prefill instance may start."""
        job.prefill_at.prefill(job, t)

    def prefilled(self, job: Job, inst: SimInstance, t: float) -> None:
        """PD: ``job``'s prompt is computed; its KV reaches the decode side after the part
        of the transfer the prefill did not hide."""
        cfg = self.cfg
        moving = job.req.prompt * cfg.kv_bytes_per_token / cfg.transfer_bytes_s
        self._push(t + (1.0 - cfg.transfer_hidden) * moving + cfg.hop_s, XFER, job)

    def looked_up(self, job: Job, inst: SimInstance) -> None:
        self.result.prompt_tokens += job.req.prompt
        self.result.hit_tokens += job.cached

    def finished(self, job: Job, inst: SimInstance, t: float) -> None:
        self.result.jobs.append(job)
        if inst.idle:  # the scheduler reports as soon as it runs dry
            self._report(inst)

    def maybe_switch(self, inst: SimInstance, t: float) -> None:
        """An instance draining towards another role switches once its old role's work is
        done (or its drain timeout has passed)."""
        if not inst.next_role or (inst.old_work() and t < inst.drain_deadline):
            return
        inst.role, inst.next_role = inst.next_role, ""
        self.registry.set_role(inst.id, inst.role)
        self.result.role_changes.append((t, inst.id, inst.role))
        if self.controller is not None:
            self.controller.finished(t, inst.id)
