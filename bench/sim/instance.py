"""One simulated instance: the scheduler's rule, with step times from a measured profile.

It keeps what a real instance keeps: a queue of prompts to prefill (chunked under the
token budget, first come first served, each admitted when its KV blocks and a batch slot
are free), a decode batch, requests it expects KV for (PD), a prefix cache (LRU over block
names, in the space the running requests leave), and its role. Its time:

- a step with prompt tokens takes ``overhead + p1·n + p2·(b² − a²)`` per chunk ``a..b``
  (``overhead`` is the larger of ``p0`` and the decode step's ``d0``: one forward reads the
  weights once) plus ``d1·B + d2·C`` for its ``B`` decoding requests, which each gain a token;
- with no prompt to run, the batch decodes steps of ``d0 + d1·B + d2·C`` back to back. The
  simulator does not step through them: a counter of steps done runs with time, a request
  that joins at count ``k`` with ``r`` tokens to go ends at ``k + r`` (a heap), so the next
  event is the next request to end, and the context ``C`` is kept from two sums.

Instances that share too few cores (``SimConfig.cores``) run slower while more of them are
busy than there are cores: every step takes ``slow = busy / cores`` times its profiled
time (processor sharing), set by the engine whenever an instance starts or stops working;
a step under way stretches or shrinks by what is left of it.

Events are the engine's (``engine.Simulation``): it wakes an instance at the time the
instance asks for (``next_time``) and hears from it through ``Simulation`` callbacks.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque

from xllm.perf_model import ServiceModel

from .traces import SimRequest


class Job:
    """A request on its way through one or two instances."""

    __slots__ = ("req", "hashes", "cached", "done", "decode_to", "prefill_at", "first_at", "finish_at",
                 "admitted", "finish_tok", "join_tok", "seq", "blocks")

    def __init__(self, req: SimRequest, hashes: list[int], seq: int) -> None:
        self.req = req
        self.hashes = hashes  # the prompt's full blocks
        self.cached = 0  # prompt tokens found in the prefix cache where it prefills
        self.done = 0  # prompt tokens computed after those
        self.decode_to = None  # SimInstance: PD, where it decodes (None: where it prefills)
        self.prefill_at = None  # SimInstance that prefills it
        self.first_at = -1.0  # first token
        self.finish_at = -1.0
        self.admitted = False
        self.finish_tok = 0.0
        self.join_tok = 0.0
        self.seq = seq
        self.blocks = 0  # blocks it holds where it prefills (PD: until its KV is sent)


class SimInstance:
    """Queues, batch, cache and clock of one instance (see the module docstring)."""

    def __init__(self, sim, iid: str, role: str, model: ServiceModel, num_blocks: int, block_size: int,
                 max_seqs: int, budget: int) -> None:
        self.sim, self.id, self.role, self.model = sim, iid, role, model
        self.next_role, self.drain_deadline = "", 0.0
        self.num_blocks, self.bs, self.max_seqs, self.budget = num_blocks, block_size, max_seqs, budget
        self.used = 0  # blocks held by requests
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix cache, least recently used first
        self.prefill_q: deque[Job] = deque()  # prompts to compute here, in order
        self.prefilling = 0  # of them admitted (holding blocks and a slot)
        self.sending: set[Job] = set()  # PD prefill side: prefilled, blocks held until the KV is sent
        self.expect_q: deque[Job] = deque()  # PD decode side: waiting for a slot and blocks
        self.receiving = 0  # PD decode side: admitted, KV on its way
        self.batch: list[tuple[float, int, Job]] = []  # decoding: (finish count, seq, job) heap
        self.tok = 0.0  # decode steps done (the batch's shared counter)
        self.ctx_prompt = 0  # sum of the batch's prompt tokens
        self.ctx_join = 0.0  # sum of the batch's join counts: context = ctx_prompt + B·tok − ctx_join
        self.last = 0.0  # when ``tok`` was last brought up to date
        self.step_end = -1.0  # the end of the prompt step under way (-1: none)
        self.step_chunks: list[tuple[Job, int]] = []
        self.busy_s = 0.0
        self.version = 0  # the engine's wake-ups for older plans are stale
        self.ttft_mean = 0.0  # as the scheduler reports them: moving means
        self.tpot_mean = 0.0
        self.output_mean = 0.0
        self.slow = 1.0  # step times over the profile's (cores shared with other busy instances)
        self.busy = False  # a step or a decode batch under way (what the engine counts for ``slow``)

    # -- what the engine hands it ---------------------------------------------------------------
    def prefill(self, job: Job, now: float) -> None:
        """Compute ``job``'s prompt here (then decode it here, or send its KV to ``decode_to``)."""
        job.prefill_at = self
        self.prefill_q.append(job)
        self._replan(now)

    def expect(self, job: Job, now: float) -> bool:
        """PD decode side: take ``job`` (a slot and its blocks) if there is room now; else it
        waits here. True when taken (its prefill may start)."""
        if not self.expect_q and self._room(job.req.prompt + job.req.output, 1):
            self.used += self._blocks(job.req.prompt + job.req.output)
            self.receiving += 1
            self._evict()
            return True
        self.expect_q.append(job)
        return False

    def received(self, job: Job, now: float) -> None:
        """PD decode side: ``job``'s KV and first token arrived: it decodes from here."""
        self._advance(now)
        self.receiving -= 1
        job.first_at = now
        self._observe_ttft(job)
        self._join(job)
        self._replan(now)

    def sent(self, job: Job, now: float) -> None:
        """PD prefill side: ``job``'s KV reached its decode instance: its blocks are free."""
        self.sending.discard(job)
        self.used -= job.blocks
        self._cache(job.hashes)
        self._replan(now)

    # -- the clock ------------------------------------------------------------------------------
    def next_time(self) -> float | None:
        """When this instance next needs the engine (None: idle)."""
        if self.step_end >= 0:
            return self.step_end
        if self.batch:
            return self.last + max(self.batch[0][0] - self.tok, 0.0) * self._decode_step()
        return None

    def wake(self, now: float) -> None:
        """The time it asked for has come."""
        if self.step_end >= 0 and now >= self.step_end:
            self._end_step(now)
        else:
            self._advance(now)
            self._finish_decodes(now)
        self._replan(now)

    # -- internals --------------------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _running(self) -> int:
        return len(self.batch) + self.receiving + self.prefilling

    def _room(self, tokens: int, slots: int) -> bool:
        return self.used + self._blocks(tokens) <= self.num_blocks and self._running() + slots <= self.max_seqs

    def _context(self) -> float:
        return self.ctx_prompt + len(self.batch) * self.tok - self.ctx_join

    def _decode_step(self) -> float:
        return self.slow * self.model.decode_step_s(len(self.batch), int(self._context()))

    def set_slow(self, slow: float, now: float) -> None:
        """Cores shared differently from now on: what is left of a step under way, and the
        decode steps after it, run at the new pace."""
        if slow != self.slow:
            if self.step_end >= 0:
                self.step_end = now + (self.step_end - now) * slow / self.slow
            else:
                self._advance(now)
            self.slow = slow
            self._replan(now)

    def _advance(self, now: float) -> None:
        """Bring the decode counter up to ``now`` (no prompt step is running)."""
        if self.batch and self.step_end < 0 and now > self.last:
            step = self._decode_step()
            self.tok += (now - self.last) / step
            self.busy_s += now - self.last
        self.last = now

    def _join(self, job: Job) -> None:
        job.join_tok = self.tok
        job.finish_tok = self.tok + job.req.output - 1
        self.ctx_prompt += job.req.prompt
        self.ctx_join += job.join_tok
        heapq.heappush(self.batch, (job.finish_tok, job.seq, job))

    def _finish_decodes(self, now: float) -> None:
        while self.batch and self.batch[0][0] <= self.tok + 1e-9:
            _, _, job = heapq.heappop(self.batch)
            self.ctx_prompt -= job.req.prompt
            self.ctx_join -= job.join_tok
            self._end(job, now)

    def _end(self, job: Job, now: float) -> None:
        job.finish_at = now
        r = job.req
        self.used -= self._blocks(r.prompt + r.output)
        if r.output > 1:
            tpot = (now - job.first_at) / (r.output - 1)
            self.tpot_mean = tpot if not self.tpot_mean else self.tpot_mean + (tpot - self.tpot_mean) / 16
        self.output_mean = r.output if not self.output_mean else self.output_mean + (r.output - self.output_mean) / 16
        self._cache(r.block_hashes(self.bs, r.prompt + r.output - 1))
        self.sim.finished(job, self, now)

    def _observe_ttft(self, job: Job) -> None:
        ttft = job.first_at - job.req.arrival
        self.ttft_mean = ttft if not self.ttft_mean else self.ttft_mean + (ttft - self.ttft_mean) / 16

    def _replan(self, now: float) -> None:
        """Admit what fits, start the next prompt step if there is prompt work, and tell the
        engine when to come back."""
        while self.expect_q:
            job = self.expect_q[0]
            if not self._room(job.req.prompt + job.req.output, 1):
                break
            self.expect_q.popleft()
            self.used += self._blocks(job.req.prompt + job.req.output)
            self.receiving += 1
            self._evict()
            self.sim.start_prefill(job, now)
        if self.step_end < 0:
            self._start_step(now)
        self.version += 1
        t = self.next_time()
        if t is not None:
            self.sim.wake_at(self, max(t, now))
        busy = self.step_end >= 0 or bool(self.batch)
        if busy != self.busy:
            self.busy = busy
            self.sim.busy_changed(self, now)
        self.sim.maybe_switch(self, now)

    def _start_step(self, now: float) -> None:
        budget = self.budget - len(self.batch)
        chunks = []
        for job in self.prefill_q:
            if budget <= 0:
                break
            if not job.admitted and not self._admit(job):
                break
            n = min(job.req.prompt - job.cached - job.done, budget)
            chunks.append((job, n))
            budget -= n
        if not chunks:
            return
        self._advance(now)
        m, b = self.model, len(self.batch)
        t = max(m.p0, m.d0 if b else 0.0) + m.d1 * b + m.d2 * self._context()
        for job, n in chunks:
            a = job.cached + job.done
            t += m.p1 * n + m.p2 * ((a + n) ** 2 - a * a)
        self.step_chunks, self.step_end = chunks, now + self.slow * t

    def _admit(self, job: Job) -> bool:
        r = job.req
        here = job.decode_to is None  # it decodes here too: blocks for its output as well
        if not self._room(r.prompt + (r.output if here else 0), 1):
            return False
        job.blocks = self._blocks(r.prompt + (r.output if here else 0))
        self.used += job.blocks
        job.cached = self._hit(job.hashes, (r.prompt - 1) // self.bs) * self.bs
        self.sim.looked_up(job, self)
        job.admitted = True
        self.prefilling += 1
        self._evict()
        return True

    def _end_step(self, now: float) -> None:
        self.busy_s += now - self.last  # the step ran from ``last`` (set when it started)
        self.last = now
        if self.batch:
            self.tok += 1.0
        chunks, self.step_chunks, self.step_end = self.step_chunks, [], -1.0
        self._finish_decodes(now)
        for job, n in chunks:
            job.done += n
            if job.cached + job.done < job.req.prompt:
                continue
            self.prefill_q.remove(job)
            self.prefilling -= 1
            if job.decode_to is not None:  # PD: its KV goes to the decode instance
                self.sending.add(job)
                self.sim.prefilled(job, self, now)
                continue
            job.first_at = now
            self._observe_ttft(job)
            if job.req.output > 1:
                self._join(job)
            else:
                self._end(job, now)

    def _hit(self, hashes: list[int], limit: int) -> int:
        """Leading blocks of ``hashes`` in the cache (at most ``limit``), touched as used."""
        n = 0
        for h in hashes[:limit]:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            n += 1
        return n

    def _cache(self, hashes: list[int]) -> None:
        new = []
        for h in hashes:
            if h in self.cache:
                self.cache.move_to_end(h)
            else:
                self.cache[h] = None
                new.append(h)
        if new:
            self.sim.index.stored(self.id, new)
        self._evict()

    def _evict(self) -> None:
        room = self.num_blocks - self.used
        if len(self.cache) > room:
            gone = [self.cache.popitem(last=False)[0] for _ in range(len(self.cache) - max(room, 0))]
            self.sim.index.removed(self.id, gone)

    # -- the router's view -----------------------------------------------------------------------
    def load(self) -> tuple[int, int, int, int, int]:
        """(waiting, running, free blocks, blocks of the waiting requests' tokens, prompt
        tokens the admitted ones have yet to compute)."""
        waiting = [j for j in self.prefill_q if not j.admitted] + list(self.expect_q)
        blocks = sum(self._blocks(j.req.prompt) for j in waiting)
        left = sum(j.req.prompt - j.cached - j.done for j in self.prefill_q if j.admitted)
        return len(waiting), self._running(), self.num_blocks - self.used, blocks, left

    def old_work(self) -> int:
        """Requests of the role it is leaving (see ``xllm.scheduler.roles``)."""
        prefill_for_others = len(self.sending) + sum(1 for j in self.prefill_q if j.decode_to is not None)
        if self.role == "prefill":
            return prefill_for_others
        return len(self.batch) + self.receiving + len(self.expect_q) + len(self.prefill_q) - (
            prefill_for_others - len(self.sending))

    @property
    def idle(self) -> bool:
        return not (self.prefill_q or self.batch or self.receiving or self.expect_q or self.sending)
