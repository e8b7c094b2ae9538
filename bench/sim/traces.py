"""Workloads for the simulator (and the real runs it is checked against): arrivals and
prompt/output lengths, as plain data.

- arrivals: Poisson (``burstiness`` 1) or bursty (gamma gaps with shape ``burstiness`` < 1,
  the same mean rate: ``vllm bench serve``'s convention);
- phases: prompt and output length mixes that shift over time (prompt-heavy, then
  output-heavy, ...), each with its own rate;
- conversations: families share a system prompt; each conversation's next turn resends
  its history (its prompt, its answer, a new message) after a think time.

A request's KV blocks are named without tokens: block ``i`` of a conversation's history is
``conv_block(c, i)``, of a family's system prompt ``family_block(f, i)``; so two requests
share a block exactly when they share that prefix, as chained hashes do.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class SimRequest:
    """One request of a trace."""

    arrival: float  # seconds from the start
    prompt: int  # prompt tokens
    output: int  # output tokens (greedy, EOS ignored: exactly this many)
    conv: int  # its history's name (a new one per request outside conversations)
    family: int = -1  # the system prompt it starts with (-1: none)
    system_blocks: int = 0  # blocks of that system prompt
    phase: int = 0  # which phase of the trace it belongs to

    def block_hashes(self, block_size: int, tokens: int | None = None) -> list[int]:
        """The names of the full blocks of its first ``tokens`` tokens (default: the prompt)."""
        n = (self.prompt if tokens is None else tokens) // block_size
        s = min(self.system_blocks, n)
        return [family_block(self.family, i) for i in range(s)] + [conv_block(self.conv, i) for i in range(s, n)]


def family_block(family: int, i: int) -> int:
    return -(((family + 1) << 20) | i)


def conv_block(conv: int, i: int) -> int:
    return ((conv + 1) << 20) | i


@dataclass(frozen=True)
class Phase:
    """A stretch of a trace: ``seconds`` long, ``rate`` requests a second, lengths uniform
    in the (inclusive) ranges."""

    seconds: float
    rate: float
    prompt: tuple[int, int]
    output: tuple[int, int]


def gaps(rng: random.Random, rate: float, burstiness: float):
    """Inter-arrival times: exponential (``burstiness`` 1) or gamma with that shape."""
    while True:
        yield rng.expovariate(rate) if burstiness == 1.0 else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


def phased(phases: list[Phase], seed: int = 0, burstiness: float = 1.0) -> list[SimRequest]:
    """Requests whose rate and length mix change phase by phase; no two share a prefix."""
    _check(phases)
    rng = random.Random(seed)
    out, start = [], 0.0
    for k, ph in enumerate(phases):
        t = start
        for gap in gaps(rng, ph.rate, burstiness):
            t += gap
            if t >= start + ph.seconds:
                break
            out.append(SimRequest(t, rng.randint(*ph.prompt), rng.randint(*ph.output), len(out), phase=k))
        start += ph.seconds
    return out


@dataclass(frozen=True)
class Chat:
    """Shared-prefix conversations: ``conversations`` of ``turns`` turns in ``families``
    families (each with a ``system`` token system prompt), starting at ``rate`` new
    conversations a second; a turn adds ``user`` tokens to the history, answers ``output``
    tokens, and the next turn comes ``think`` seconds (mean, exponential) after the answer
    would have been read: here, after the arrival plus ``think``."""

    conversations: int
    turns: int = 4
    families: int = 8
    system: int = 256
    user: tuple[int, int] = (32, 128)
    output: tuple[int, int] = (32, 128)
    rate: float = 1.0
    think: float = 10.0
    max_prompt: int = 4000


def chat(spec: Chat, block_size: int, seed: int = 0, burstiness: float = 1.0) -> list[SimRequest]:
    """The turns of every conversation, in arrival order."""
    rng = random.Random(seed)
    out: list[SimRequest] = []
    t = 0.0
    starts = gaps(rng, spec.rate, burstiness)
    for c in range(spec.conversations):
        t += next(starts)
        family = rng.randrange(spec.families)
        history, at = spec.system, t
        for _ in range(spec.turns):
            prompt = history + rng.randint(*spec.user)
            if prompt >= spec.max_prompt:
                break
            answer = rng.randint(*spec.output)
            out.append(SimRequest(at, prompt, answer, c, family, spec.system // block_size))
            history = prompt + answer
            at += rng.expovariate(1.0 / spec.think)
    out.sort(key=lambda r: r.arrival)
    return out


def describe(reqs: list[SimRequest]) -> str:
    """One line: how many, over how long, mean lengths."""
    if not reqs:
        return "no requests"
    span = reqs[-1].arrival - reqs[0].arrival
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (f"{len(reqs)} requests over {span:.0f} s ({len(reqs) / max(span, 1e-9):.1f}/s), prompt "
            f"{mean([r.prompt for r in reqs]):.0f} tokens, output {mean([r.output for r in reqs]):.0f} tokens "
            f"(means)")


@dataclass
class Trace:
    """A named workload and its requests."""

    name: str
    requests: list[SimRequest] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0

    def phases(self) -> int:
        return 1 + max((r.phase for r in self.requests), default=0)


def scale_phases(phases: list[Phase], factor: float) -> list[Phase]:
    """The same phases with ``factor`` times the rate (for ``factor`` times the instances)."""
    return [Phase(p.seconds, p.rate * factor, p.prompt, p.output) for p in phases]


def _check(phases: list[Phase]) -> None:
    for p in phases:
        if p.rate <= 0 or p.seconds <= 0 or not math.isfinite(p.rate):
            raise ValueError(f"a phase needs a positive rate and length: {p}")
