"""The scheduler core: requests in, one ``StepPlan`` per step out, ``StepResult`` back.

No sockets and no torch here: the actor (``actor.py``) feeds it messages, and unit
tests feed it fabricated ``StepResult``s.

One rule fills every step: a request gets ``num_tokens - num_computed_tokens`` tokens
(its whole prompt, a chunk of it, or the one token of a decode) as far as the step's
token budget and its KV blocks allow. Prefill, chunked prefill, decode and prefix-cache
hits are all this rule.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter

from ..config import CacheConfig, SchedulerConfig, SpeculativeConfig
from ..protocol import NewRequestData, StepPlan, StepResult, TokenizedRequest
from .block_manager import BlockManager
from .disagg import Disaggregation
from .migration import Migration
from .outputs import StepOutputs
from .policy import Policy
from .request import Request, Status
from .stats import SchedulerStats
from .tiers import KVTiers, TierVerbs


class Scheduler(Disaggregation, Migration, TierVerbs):
    """Continuous batching over a paged KV cache. Verbs: add, abort, schedule, update;
    the hooks of prefill/decode disaggregation (``disagg``), migration (``migration``) and
    the KV tiers' (``tiers``)."""

    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, max_model_len: int,
                 speculative: SpeculativeConfig = SpeculativeConfig()) -> None:
        self.cfg = sched
        self.spec = speculative
        self.max_model_len = max_model_len
        self.policy = Policy(sched.policy)
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching,
                                   keep_new_cached=cache.tiers)
        self.tiers = KVTiers(self.blocks, cache)  # host and disk below the device pool (when configured)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # kept sorted by policy rank
        self.running: list[Request] = []
        self._drop_on_worker: list[str] = []  # finished/preempted ids the workers still hold
        self.finished_since_report: list[str] = []  # ended requests, for the router's load view
        self._step_id = 0
        # step id -> (request, tokens it may sample, its preemptions then) of steps in flight
        self._planned: dict[int, list[tuple[Request, int, int]]] = {}
        self.stats = SchedulerStats()
        self._init_disaggregation(sched.kv_transfer_timeout_s)
        self._init_migration()

    # -- requests in ------------------------------------------------------------------------
    def add_request(self, msg: TokenizedRequest) -> None:
        """Queue a request. Raises ``ValueError`` for one that can never run."""
        if msg.req_id in self.requests:
            raise ValueError(f"request id {msg.req_id!r} is already in use")
        n = len(msg.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens; the model's context is {self.max_model_len} "
                "and at least one must be left for the output")
        blocks_needed = -(-min(n + msg.sampling.max_tokens, self.max_model_len) // self.blocks.block_size)
        if blocks_needed > self.blocks.num_blocks:
            raise ValueError(
                f"the request needs {blocks_needed} KV blocks and the cache has "
                f"{self.blocks.num_blocks}; lower max_tokens or the prompt length")
        if len(self.waiting) >= self.cfg.max_queued_requests:
            raise OverflowError(f"the queue is full ({self.cfg.max_queued_requests} waiting)")
        req = Request(msg)
        if msg.block_size == self.blocks.block_size:
            req.block_hashes = list(msg.block_hashes)  # computed by the frontend
        self.requests[req.req_id] = req
        self._enqueue(req)
        self.stats.total_prompt_tokens += n

    def abort(self, req_id: str) -> Request | None:
        """End a request now and free its blocks; returns it, or None if unknown."""
        req = self.requests.get(req_id)
        if req is None or (req.status is Status.FINISHED and req_id not in self.sending):
            if req is None:
                self.forward_abort(req_id)  # it moved on from here
            return None
        if self.abort_leaving(req):
            return None  # it is the target's now: the target ends it
        self.stats.num_aborted += 1
        if not self.abort_transfer(req):
            self._finish(req, "abort")
        return req

    # -- planning ---------------------------------------------------------------------------
    @property
    def last_step_id(self) -> int:
        """The id of the last step planned (0: none yet)."""
        return self._step_id

    def has_work(self) -> bool:
        """True if a step could be planned now."""
        return any(self._tokens_to_compute(r) for r in self.running) or any(
            r.num_placeholders == 0 and not r.tier_job for r in self.waiting)

    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None if nothing can run."""
        budget = self.cfg.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        if self.policy.prefill_first:
            budget = self._admit_waiting(chosen, budget, preempted=False)
            budget, preempted = self._schedule_running(chosen, budget)
        else:
            budget, preempted = self._schedule_running(chosen, budget)
            budget = self._admit_waiting(chosen, budget, preempted)
        if not chosen and not self._drop_on_worker:
            return None
        if self.spec.method:
            chosen = self._speculate(chosen, budget)
        elif self.cfg.continuous_decode_steps > 1 and not self.waiting:
            chosen = self._continue_decodes(chosen, self.cfg.max_num_batched_tokens)
        return self._make_plan(chosen)

    def _speculate(self, chosen: list[tuple[Request, int]], budget: int) -> list[tuple[Request, int]]:
        """Room for ``num_tokens`` drafts after each decoding request's token (the worker's
        proposer fills what it can), unless the step decodes more requests than
        ``max_batch``: there verifying costs more than it saves."""
        decoding = [r for r, n in chosen if n == 1 and r.num_computed_tokens + 1 == r.num_tokens
                    and r.remote_decode is None]
        if not decoding or len(decoding) > self.spec.max_batch:
            return chosen
        chosen_set = {id(r) for r in decoding}
        out = []
        for req, n in chosen:
            if id(req) in chosen_set and budget > 0:
                steps = req.decode_steps(min(1 + self.spec.num_tokens, budget + 1), self.max_model_len)
                if steps > 1 and self.blocks.allocate(req, req.num_computed_tokens + steps):
                    budget -= steps - 1
                    n = steps
            out.append((req, n))
        return out

    def _continue_decodes(self, chosen: list[tuple[Request, int]], budget: int) -> list[tuple[Request, int]]:
        """A step of decodes alone, with no request waiting, becomes a multi-step decode:
        each request samples up to ``continuous_decode_steps`` tokens in a row, so the
        scheduler, the frontend and the HTTP shim wake once for them (on a small machine
        their wake-ups take cores from the worker). A new request waits at most for the
        steps in flight."""
        if any(n != 1 or r.num_computed_tokens + 1 != r.num_tokens or r.remote_decode is not None
               for r, n in chosen):
            return chosen  # a prompt (or a prefill for another instance) is in the step
        budget -= len(chosen)
        out = []
        for req, n in chosen:
            steps = req.decode_steps(min(self.cfg.continuous_decode_steps, budget + 1), self.max_model_len)
            if steps > 1 and self.blocks.allocate(req, req.num_computed_tokens + steps):
                budget -= steps - 1
                n = steps
            out.append((req, n))
        self.stats.num_continued_steps += max((n for _, n in out), default=1) - 1
        return out

    def _tokens_to_compute(self, req: Request) -> int:
        if not req.wants_more or req.num_tokens >= self.max_model_len:
            # NOTE: only an in-flight token can take a request to its limits; that token
            # ends the request when it lands, so its KV is never needed.
            return 0
        return req.num_tokens - req.num_computed_tokens

    def _schedule_running(self, chosen: list[tuple[Request, int]], budget: int) -> tuple[int, bool]:
        preempted = False
        if self.policy.name == "priority":
            self.running.sort(key=self.policy.rank)
        order = self.running
        if self.policy.name == "decode_first":  # decodes, then unfinished prompt chunks
            order = sorted(order, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        in_step = {id(r) for r, _ in chosen}
        for req in list(order):
            if budget <= 0:
                break
            if req.status is not Status.RUNNING or id(req) in in_step:
                continue
            n = min(self._tokens_to_compute(req), budget)
            if n <= 0:
                continue
            while not self.blocks.allocate(req, req.num_computed_tokens + n):
                victim = self.policy.pick_victim(
                    r for r in self.running if id(r) not in in_step and r.status is Status.RUNNING)
                assert victim is not None
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                chosen.append((req, n))
                in_step.add(id(req))
                budget -= n
        return budget, preempted

    def _admit_waiting(self, chosen: list[tuple[Request, int]], budget: int, preempted: bool) -> int:
        if preempted:
            return budget  # memory is short: let the running requests finish first
        bs = self.blocks.block_size
        admitted: list[Request] = []
        for req in self.waiting:
            if budget <= 0 or len(self.running) + len(self.receiving) + len(admitted) >= self.cfg.max_num_seqs:
                break
            if req.num_placeholders or req.tier_job:
                continue  # a token for it is still in flight, or its prefix is coming up from disk
            if req.offline and self._online_waiting(admitted):
                break  # offline work only takes capacity online work leaves
            external = self.external_tokens(req)
            if external:  # its prompt's KV comes from elsewhere: blocks now, no compute
                if not self.blocks.allocate(req, external):
                    break
                admitted.append(req)
                continue
            hits = self.blocks.match_prefix(req, req.num_known_tokens - 1)
            lower = self.tiers.match(req, len(hits), (req.num_known_tokens - 1) // bs)
            if lower is None:
                continue  # its prefix goes on on disk: it waits while that comes up to host memory
            num_computed = (len(hits) + len(lower)) * bs  # NOTE: blocks loaded back count as computed
            n = min(req.num_tokens - num_computed, budget)
            self.blocks.take_prefix(req, hits)
            if not self.blocks.allocate(req, num_computed + n):
                self.blocks.free(req)
                break
            self.tiers.load(lower, req.block_ids[len(hits):len(hits) + len(lower)])
            self.tiers.release(req)  # the loads are ordered: the host blocks may go after them
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
                self.blocks.record_lookup(len(req.prompt_token_ids), num_computed)
            req.num_computed_tokens = num_computed
            req.status = Status.RUNNING
            admitted.append(req)
            chosen.append((req, n))
            budget -= n
        if admitted:
            gone = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in gone]
            for req in admitted:
                if req.status is Status.RUNNING:
                    self.running.append(req)
                else:
                    self.after_allocate(req)
        return budget

    def _online_waiting(self, admitted: list[Request]) -> bool:
        return any(not r.offline and r.num_placeholders == 0 and r not in admitted for r in self.waiting)

    def _make_plan(self, chosen: list[tuple[Request, int]]) -> StepPlan:
        self._step_id += 1
        new_requests: list[NewRequestData] = []
        new_blocks: dict[str, list[int]] = {}
        ids, n_sched, n_comp = [], [], []
        planned: list[tuple[Request, int, int]] = []
        now = time.time()
        for req, n in chosen:
            if not req.on_worker:
                new_requests.append(NewRequestData(
                    req.req_id, list(req.known_token_ids()), list(req.block_ids), req.sampling,
                    len(req.prompt_token_ids), list(req.eos_token_ids)))
                req.on_worker = True
            elif len(req.block_ids) > req.num_blocks_sent:
                new_blocks[req.req_id] = req.block_ids[req.num_blocks_sent:]
            req.num_blocks_sent = len(req.block_ids)
            if req.queue_time is None:
                req.queue_time = max(0.0, now - req.arrival_time)
            ids.append(req.req_id)
            n_sched.append(n)
            n_comp.append(req.num_computed_tokens)
            num_tokens = req.num_tokens
            req.num_computed_tokens += n
            if req.remote_decode is not None:
                self.on_step(req)
            if req.num_computed_tokens >= num_tokens:  # this step samples its next token(s)
                req.num_placeholders += req.num_computed_tokens - num_tokens + 1
                planned.append((req, req.num_computed_tokens - num_tokens + 1, req.num_preemptions))
            self.blocks.cache_blocks(req, min(req.num_computed_tokens, req.num_known_tokens))
        drop, self._drop_on_worker = self._drop_on_worker, []
        if planned:
            self._planned[self._step_id] = planned
        total = sum(n_sched)
        self.stats.num_steps += 1
        self.stats.last_step_tokens = total
        self.stats.last_step_seqs = len(ids)
        self.stats.total_scheduled_tokens += total
        self.tiers.store_new()
        loads_kv = self.tiers.seal(self._step_id)
        return StepPlan(self._step_id, new_requests, new_blocks, ids, n_sched, n_comp, drop, loads_kv)

    # -- results in -------------------------------------------------------------------------
    def update(self, result: StepResult) -> StepOutputs:
        """Fold sampled tokens in; returns what the frontend must hear."""
        rows: dict[str, list] = {}  # req id -> [request, tokens, finish reason, logprobs]
        lp_rows: dict[str, list[int]] = {}  # req id -> its logprob rows, in token order
        for i, rid in enumerate(result.logprob_req_ids):
            lp_rows.setdefault(rid, []).append(i)
        received: dict[str, int] = {}  # req id -> tokens it got in this step
        now = time.time()
        self.tiers.stats.kv_load_wait_seconds += result.kv_load_wait_s
        self.stats.forward_seconds += result.forward_s
        for req_id, token in zip(result.req_ids, result.token_ids):
            req = self.requests.get(req_id)
            if req is None or req.num_placeholders == 0:
                continue  # finished or aborted since the step was planned (or ended in it)
            req.num_placeholders -= 1
            received[req_id] = received.get(req_id, 0) + 1
            reason = req.append_token(token, self.max_model_len)
            row = rows.setdefault(req_id, [req, [], None, None])
            lp_row = lp_rows[req_id][len(row[1])] if req_id in lp_rows else None
            lps = _logprobs(result, lp_row, req.sampling.logprobs, token)
            row[1].append(token)
            if lps is not None:
                row[3] = (row[3] or []) + lps
            if req.remote_decode is not None:  # a prefill for another instance: it streams there
                if reason is not None and not self.on_finish(req, token, lps):
                    del rows[req_id]
                    continue
            self.stats.total_output_tokens += 1
            self.stats.observe_token(req, now)
            if reason is not None:
                row[2] = reason
                self._finish(req, reason)
        self._settle(result.step_id, received)
        if result.spec_counts:
            self.stats.observe_drafts(result.spec_counts)
        out = StepOutputs()
        for req, tokens, reason, lps in rows.values():
            out.add(req, tokens, reason, lps)
        return out

    def _settle(self, step_id: int, received: dict[str, int]) -> None:
        """A step may bring a request fewer tokens than planned (speculative tokens that
        were rejected): the placeholders never sampled go, and the positions computed for
        them count as not computed (their KV is written again by the next step).

        NOTE: a step planned on top of this one (async scheduling) assumed every planned
        token; the worker starts it from the request's true last token instead."""
        for req, planned, preemptions in self._planned.pop(step_id, ()):
            if req.status is Status.FINISHED:
                continue
            short = planned - received.get(req.req_id, 0)
            if short > 0:
                req.num_placeholders -= short
                if req.num_preemptions == preemptions:  # else it restarts from 0 anyway
                    req.num_computed_tokens -= short

    def deliver(self, msg) -> StepOutputs:
        """Decode side: a transfer ended (``KVReceived``); the first token, if it came."""
        out = StepOutputs()
        req = self.kv_received(msg)
        if req is not None:
            token = msg.first_token
            reason = req.append_token(token, self.max_model_len)
            self.stats.total_output_tokens += 1
            self.stats.observe_token(req, time.time())
            if req.queue_time is None:
                req.queue_time = max(0.0, time.time() - req.arrival_time)
            if reason is not None:
                self._finish(req, reason)
            out.add(req, [token], reason, msg.first_logprobs)
        return out

    # -- internals --------------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        req.status = Status.WAITING
        rank = self.policy.rank
        self.waiting.insert(bisect.bisect(self.waiting, rank(req), key=rank), req)

    def _preempt(self, req: Request) -> None:
        if req.remote_decode is not None and self.cancel_prefill(req, notify_decode=True):
            self.stats.num_preemptions += 1  # its agent may read its blocks: it ends instead
            return
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.running.remove(req)
        self._forget_on_worker(req)
        self._enqueue(req)

    def _finish(self, req: Request, reason: str) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
            self.tiers.release(req)
        elif req.status is Status.MOVING:  # ended by a token in flight before it left
            self.leaving.pop(req.req_id, None)
            self._leaving.pop(req.req_id, None)
        self.blocks.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self._forget_on_worker(req)
        del self.requests[req.req_id]
        self.finished_since_report.append(req.req_id)
        self.stats.num_finished += 1
        self.stats.observe_finished(req)

    def _forget_on_worker(self, req: Request) -> None:
        if req.on_worker:
            self._drop_on_worker.append(req.req_id)
            req.on_worker = False
            req.num_blocks_sent = 0

    # -- introspection ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Gauges and counters for the ``stats`` control call and metrics."""
        b = self.blocks
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_usage": b.usage,
            "num_blocks": b.num_blocks,
            "num_free_blocks": b.num_free_blocks,
            "prefix_cache_queries": b.num_queries,
            "prefix_cache_hits": b.num_hits,
            "prefix_cache_hit_rate": b.num_hits / b.num_queries if b.num_queries else 0.0,
            **self.stats.__dict__,
            **self.transfer_snapshot(),
            **self.migration_snapshot(),
            **self.tiers.snapshot(),
        }

    def check_integrity(self) -> dict[str, int]:
        """Assert the bookkeeping of every tier is consistent, and that each device block's
        references are exactly its requests' and the agent's; returns the counts."""
        counts = self.blocks.check_integrity()
        refs = Counter(b for r in self.requests.values() for b in r.block_ids) + self.tiers.held()
        assert all(self.blocks.ref_counts[b] == refs[b] for b in range(self.blocks.num_blocks)), \
            "a device block's references are not its requests' and the agent's"
        pins = Counter(h for r in self.waiting for h in r.tier_pins)
        assert pins == self.tiers.host.pins, "host tier pins are not exactly the waiting requests'"
        assert not any(r.tier_pins for r in self.running), "a running request still pins host blocks"
        return {**counts, **self.tiers.check_integrity()}


def _logprobs(result: StepResult, row: int | None, k: int | None, token: int) -> list | None:
    """One token's (id, logprob, top ids, top logprobs) from the result's arrays."""
    if row is None or k is None:
        return None
    top_ids = result.top_ids[row, :k].tolist() if k else []
    top_lp = result.top_logprobs[row, :k].tolist() if k else []
    return [(token, float(result.logprobs[row]), top_ids, top_lp)]
