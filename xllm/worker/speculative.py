"""A speculative step on the worker: drafts into each request's planned room, one target
forward over them, verification, and the kept tokens committed.

The scheduler planned each decoding request ``1 + k`` positions (``xllm.spec``). Here the
proposer fills up to k of them; the forward pass returns the logits of the request's last
known token and of every draft; ``xllm.spec.verify`` keeps a prefix of the drafts plus
one token of the target's own. A request with no drafts samples one token as usual.

Every sampling parameter applies to each draft row as it would had the earlier drafts
been sampled: processors see the history up to that row, and a seeded request's row j
draws its randomness from (seed, its output index + j).

With a step-time model (``set_cost``: ``StepCost``) a step verifies only the drafts that
raise its expected tokens per second: draft j of a request is kept with probability a^j
(a: the fraction of its drafts the request kept lately), drafts are ranked by that
probability (a request's in their order), and the step takes the number of them whose
(tokens + expected drafts kept) / (its predicted time) is highest. On a CPU the cost of a
row is a step function: with compiled graphs a step runs at its batch bucket (rows padded
up), and up to 8 rows the decode kernel reads the weights once for all of them, so one
stream verifies its drafts nearly for free while at batch 8 a row costs what it yields.

NOTE: structured-output requests get no drafts (their grammar would have to walk the
drafts; ``grammar.py`` says how that would go).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..perf_model import ServiceModel
from ..spec import Proposer
from ..spec.verify import verify_greedy, verify_sampled
from .logits_processors import apply_processors
from .sampler import SamplingBatch, seed_for_token

log = logging.getLogger(__name__)

EXPLORE_AFTER = 8  # steps without a verified draft before a request's first draft is priced as certain

if TYPE_CHECKING:
    from .model_runner import ModelRunner, RequestState, _LogprobRows


@dataclass
class SpecStats:
    """Per step: draft tokens proposed and kept, by request."""

    proposed: dict[str, int]
    accepted: dict[str, int]


class Speculator:
    """Proposes, verifies and commits one speculative step of a ``ModelRunner``."""

    def __init__(self, proposer: Proposer) -> None:
        self.proposer = proposer
        self.accepted: dict[str, float] = {}  # req id -> recent drafts kept per step (moving mean)
        self.rate: dict[str, float] = {}  # req id -> recent fraction of its drafts kept (moving mean)
        self.mean_rate = 0.5  # the same over every request: a new request's prior
        self.cost: StepCost | None = None  # predicted step times; None: every draft is verified
        self.dropped = 0  # drafts proposed but not worth verifying
        self.skipped = 0  # steps where no draft could pay: the proposer was not asked
        self.steps = 0
        self.idle: dict[str, int] = {}  # req id -> steps in a row it wanted drafts and verified none

    def set_cost(self, cost: "StepCost | None") -> None:
        """The step-time model drafts are weighed with."""
        self.cost = cost

    def _limit(self, rid: str, room: int) -> int:
        """Drafts to ask for: one more than the request kept lately, within its room (a
        request whose drafts keep failing verifies one draft, not k)."""
        recent = self.accepted.get(rid)
        return room if recent is None else max(1, min(room, int(recent) + 2))

    def _observe(self, rid: str, kept: int, proposed: int) -> None:
        recent = self.accepted.get(rid)
        self.accepted[rid] = kept if recent is None else 0.5 * recent + 0.5 * kept
        frac = kept / proposed
        self.rate[rid] = 0.7 * self.rate.get(rid, self.mean_rate) + 0.3 * frac  # from the mean at first
        self.mean_rate = 0.95 * self.mean_rate + 0.05 * frac

    def drop(self, rid: str) -> None:
        self.accepted.pop(rid, None)
        self.rate.pop(rid, None)
        self.idle.pop(rid, None)

    def _gain(self, rid: str, j: int, rate: float | None = None) -> float:
        """The chance draft ``j`` (from 1) of ``rid`` is kept: its estimate to the power j;
        a request that has verified no draft for ``EXPLORE_AFTER`` steps prices its first
        draft as certain, so estimates that are too low (its own, or the mean, which only
        verified drafts move) are checked again where a row is cheap."""
        if j == 1 and self.idle.get(rid, 0) >= EXPLORE_AFTER:
            return 1.0
        return (self.rate.get(rid, self.mean_rate) if rate is None else rate) ** j

    def worth_verifying(self, drafts: dict[str, list[int]], rows: int, samplers: int,
                        context: dict[str, int]) -> dict[str, list[int]]:
        """``drafts`` cut to those that raise the step's expected tokens per second. The step
        without drafts computes ``rows`` tokens attending to ``sum(context)`` in all and yields
        ``samplers`` tokens; each of a request's draft rows attends to ``context[rid]``."""
        if self.cost is None or not any(drafts.values()):
            return drafts
        # most probable first; a request's drafts in their order (a^j never grows with j)
        ranked = sorted(((self._gain(rid, j), j, rid) for rid, d in drafts.items() for j in range(1, len(d) + 1)),
                        key=lambda g: (-g[0], g[1]))
        best = self._best_count(ranked, rows, samplers, context)
        keep = {rid: 0 for rid in drafts}
        for _, j, rid in ranked[:best]:
            keep[rid] = max(keep[rid], j)
        self.dropped += len(ranked) - best
        self._relax(rid for rid, d in drafts.items() if d and not keep[rid])
        return {rid: d[:keep[rid]] for rid, d in drafts.items()}

    def _relax(self, rids) -> None:
        """Requests whose drafts were not verified are not observed: their estimates drift
        back towards the mean, or one whose drafts failed a few times in a row would never
        be tried again."""
        for rid in rids:
            if rid in self.rate:
                self.rate[rid] += 0.25 * (self.mean_rate - self.rate[rid])

    def _best_count(self, ranked: list[tuple[float, int, str]], rows: int, samplers: int,
                    context: dict[str, int]) -> int:
        """How many of the ``ranked`` drafts (gain, index, request) give the step the most
        expected tokens per second."""
        cost = self.cost
        ctx = sum(context.values())
        tokens = float(samplers)
        best, best_rate = 0, tokens / cost.step_s(rows, ctx)
        for n, (gain, _, rid) in enumerate(ranked, start=1):
            tokens += gain
            ctx += context.get(rid, 0)
            rate = tokens / cost.step_s(rows + n, ctx)
            if rate > best_rate:
                best, best_rate = n, rate
        return best

    def may_pay(self, wanted: dict[str, int], rows: int, samplers: int, context: dict[str, int]) -> bool:
        """Whether any draft could be worth verifying in this step, were every one as likely
        as the likeliest request's: if not, the proposer is not even asked (its time is the
        worker's too)."""
        if self.cost is None or not wanted:
            return bool(wanted)
        a = max(self.rate.get(rid, self.mean_rate) for rid in wanted)
        ranked = sorted(((self._gain(rid, j, max(a, self.rate.get(rid, a))), j, rid)
                         for rid, n in wanted.items() for j in range(1, n + 1)), key=lambda g: (-g[0], g[1]))
        return self._best_count(ranked, rows, samplers, context) > 0

    def execute(self, runner: "ModelRunner", step_id: int, ranges: list[tuple[str, int, int]],
                logprobs: "_LogprobRows") -> tuple[list[str], list[int], SpecStats]:
        """Run the step; (request id per token, tokens) in order, and the draft counts."""
        known = {rid: len(runner.requests[rid].token_ids) for rid, _, _ in ranges}
        wanted = {rid: self._limit(rid, end - known[rid]) for rid, _, end in ranges
                  if end > known[rid] and runner.requests[rid].sampling.structured is None}
        rows = sum(min(end, known[rid]) - start for rid, start, end in ranges)
        samplers = sum(1 for rid, _, end in ranges if end >= known[rid])
        self.steps += 1
        if self.steps % 500 == 0:
            log.info("speculation: %d steps, %d without asking for drafts (none could pay), %d drafts dropped "
                     "as not worth verifying, mean share of drafts kept %.2f", self.steps, self.skipped,
                     self.dropped, self.mean_rate)
        asked = list(wanted)
        if not self.may_pay(wanted, rows, samplers, known):
            self.skipped += 1
            self._relax(wanted)
            wanted = {}
        drafts = {rid: [] for rid in known} | self.proposer.propose(wanted) if wanted else {rid: [] for rid in known}
        drafts = self.worth_verifying(drafts, rows, samplers, known)
        for rid, d in drafts.items():
            runner.requests[rid].token_ids.extend(d)
        try:
            rows = [len(drafts[rid]) + 1 for rid, _, _ in ranges]
            row_ids, logits = runner.forward_ranges(step_id, ranges, rows)
        finally:
            for rid, n in known.items():
                del runner.requests[rid].token_ids[n:]
        order = list(dict.fromkeys(row_ids))  # the sampling requests, each once, in row order
        first = {rid: i for i, rid in reversed(list(enumerate(row_ids)))}
        plain = [rid for rid in order if not drafts[rid]]
        out_ids: list[str] = []
        out_tokens: list[int] = []
        if plain:
            idx = torch.tensor([first[rid] for rid in plain])
            out_tokens += runner._sample(plain, logits[idx], logprobs)
            out_ids += plain
        stats = SpecStats({}, {})
        for rid in order:
            if not drafts[rid]:
                continue
            d = drafts[rid]
            rows_logits = logits[first[rid]: first[rid] + len(d) + 1]
            raw = rows_logits.clone() if runner.requests[rid].sampling.logprobs is not None else None
            kept = self._verify(runner, rid, rows_logits, d)
            n = runner.commit(rid, kept)
            out_ids += [rid] * n
            out_tokens += kept[:n]
            stats.proposed[rid] = len(d)
            stats.accepted[rid] = len(kept) - 1
            self._observe(rid, len(kept) - 1, len(d))
            if raw is not None:
                logprobs.add([rid] * n, raw[:n], torch.tensor(kept[:n]))
        for rid in asked:
            self.idle[rid] = 0 if rid in stats.proposed else self.idle.get(rid, 0) + 1
        return out_ids, out_tokens, stats

    def _verify(self, runner: "ModelRunner", rid: str, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        """Tokens kept of ``drafts`` by the target's rows ``logits`` ((k+1), V)."""
        state = runner.requests[rid]
        if state.has_processors:
            views = [_history(state, drafts[:j]) for j in range(len(drafts) + 1)]
            apply_processors(logits, views)
        sp = state.sampling
        if sp.temperature == 0.0 or sp.top_k == 1:
            return verify_greedy(logits.argmax(dim=-1).tolist(), drafts)
        batch = SamplingBatch.build([sp] * len(logits), [None] * len(logits), runner.spec.vocab_size)
        probs = runner.sampler.probs(logits, batch)
        n_out = len(state.token_ids) - state.num_prompt_tokens

        def generator(j: int) -> torch.Generator:
            if state.generator is None:
                return runner.sampler.generator
            seed_for_token(state.generator, sp.seed, n_out + j)
            return state.generator

        return verify_sampled(probs, drafts, generator)


def _history(state: "RequestState", drafts: list[int]) -> "RequestState":
    """The request as it would stand after ``drafts`` (what the processors read)."""
    return replace(state, token_ids=state.token_ids + drafts) if drafts else state


class StepCost:
    """Predicted seconds of a step of ``rows`` tokens attending to ``context`` tokens in
    all: with compiled decode graphs, the time measured for the bucket the rows pad to (at
    start, ``DecodeGraphs.step_seconds``) plus the profile's cost per context token;
    otherwise the profile's law ``d0 + d1·rows + d2·context``."""

    def __init__(self, law: ServiceModel, graphs=None) -> None:
        self.law = law
        self.graphs = graphs

    def step_s(self, rows: int, context: int) -> float:
        graphs = self.graphs
        if graphs is not None and graphs.step_seconds:
            b = graphs.bucket_for(rows)
            if b is not None and b in graphs.step_seconds:
                return graphs.step_seconds[b] + self.law.d2 * context
        return self.law.decode_step_s(rows, context)
