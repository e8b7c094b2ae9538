"""The scheduler core alone, fed fabricated step results (W5 part B).

``N`` requests are prefilled in one step, then every step decodes all of them; the time
of ``schedule()``, of ``update()`` and of encoding the plan for the wire is recorded per
decode step. Two modes: ``sync`` (plan, update, plan...) and ``async`` (the next step is
planned before the previous result is folded in, as the actor does with two in flight).
"""

from __future__ import annotations

import random
import time

from xllm.bus.codec import Encoder
from xllm.config import CacheConfig, SchedulerConfig
from xllm.protocol import SamplingParams, StepPlan, StepResult, TokenizedRequest
from xllm.scheduler.scheduler import Scheduler

from .common import stats


def _scheduler(num_requests: int, prompt_len: int, steps: int, block_size: int = 16) -> Scheduler:
    per_req = -(-(prompt_len + steps + 8) // block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_requests, max_num_batched_tokens=num_requests * prompt_len),
                      CacheConfig(block_size, num_requests * per_req + 16), prompt_len + steps + 64)
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=steps + 8, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    for i in range(num_requests):
        prompt = [rng.randrange(100, 30000) for _ in range(prompt_len)]
        sched.add_request(TokenizedRequest(f"req-{i}", prompt, sampling, [], time.time()))
    return sched


def _result(plan: StepPlan) -> StepResult:
    """Every scheduled request samples (whole prompts and decodes only)."""
    return StepResult(plan.step_id, list(plan.scheduled_req_ids),
                      [100 + i % 1000 for i in range(len(plan.scheduled_req_ids))], 0.0)


def scheduler_step_times(num_requests: int = 1000, prompt_len: int = 128, steps: int = 200,
                         mode: str = "sync") -> dict:
    """Per decode step statistics (seconds) of ``schedule``, ``update``, both, and plan encoding."""
    sched = _scheduler(num_requests, prompt_len, steps)
    enc = Encoder()
    t_sched, t_update, t_enc = [], [], []
    prefill = sched.schedule()
    assert prefill is not None and len(prefill.scheduled_req_ids) == num_requests
    pending = prefill
    if mode == "sync":
        sched.update(_result(prefill))
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        enc.encode(plan)
        t2 = time.perf_counter()
        if mode == "sync":
            sched.update(_result(plan))
        else:
            sched.update(_result(pending))
            pending = plan
        t3 = time.perf_counter()
        if len(plan.scheduled_req_ids) != num_requests or any(n != 1 for n in plan.num_scheduled):
            raise RuntimeError("the benchmark expects every step to decode every request")
        t_sched.append(t1 - t0)
        t_enc.append(t2 - t1)
        t_update.append(t3 - t2)
    return {"schedule": stats(t_sched), "update": stats(t_update),
            "total": stats([a + b for a, b in zip(t_sched, t_update)]), "encode": stats(t_enc)}
